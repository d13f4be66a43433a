"""Checkpoint folder rules: output_dir safety, resume resolution, rotation; what a save of the weights writes."""

import contextlib
from pathlib import Path

import pytest
import torch

from moetune.errors import UserError
from moetune.run_dir import list_checkpoints
from moetune.train.checkpoint import (
    TrainerState,
    prepare_output_dir,
    resolve_resume,
    rotate_checkpoints,
    save_trainable_files,
)


def make_checkpoints(root, steps):
    for step in steps:
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        TrainerState(global_step=step).save(folder)


def test_checkpoints_sort_by_step_and_ignore_partial_saves(tmp_path):
    make_checkpoints(tmp_path, [100, 20, 3])
    (tmp_path / ".partial-checkpoint-200").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-20", "checkpoint-100"]
    assert resolve_resume("latest", tmp_path).name == "checkpoint-100"
    assert resolve_resume(str(tmp_path / "checkpoint-20"), tmp_path).name == "checkpoint-20"
    assert resolve_resume(None, tmp_path) is None


def test_resume_errors_are_clear(tmp_path):
    with pytest.raises(UserError, match="holds no checkpoint-<step> folder"):
        resolve_resume("latest", tmp_path)
    with pytest.raises(UserError, match="is not a directory"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)
    (tmp_path / "random").mkdir()
    with pytest.raises(UserError, match="is not a moetune checkpoint: it has no trainer_state.json"):
        resolve_resume(str(tmp_path / "random"), tmp_path)
    (tmp_path / "random" / "trainer_state.json").write_text("{not json")
    with pytest.raises(UserError, match="is corrupt"):
        resolve_resume(str(tmp_path / "random"), tmp_path)


def test_a_new_run_never_silently_replaces_another_runs_checkpoints(tmp_path):
    make_checkpoints(tmp_path, [10])
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match="already holds another run's checkpoints"):
        prepare_output_dir(tmp_path, resuming=False, overwrite=False)
    assert (tmp_path / "checkpoint-10").is_dir()
    prepare_output_dir(tmp_path, resuming=True, overwrite=False)
    assert (tmp_path / "checkpoint-10").is_dir()
    prepare_output_dir(tmp_path, resuming=False, overwrite=True)
    assert list_checkpoints(tmp_path) == [] and not (tmp_path / "metrics.jsonl").exists()


def test_rotation_keeps_the_newest_and_never_the_best(tmp_path):
    make_checkpoints(tmp_path, [10, 20, 30, 40, 50])
    removed = rotate_checkpoints(tmp_path, limit=2, keep="checkpoint-10")
    assert sorted(p.name for p in removed) == ["checkpoint-20", "checkpoint-30", "checkpoint-40"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-50"]
    assert rotate_checkpoints(tmp_path, limit=None, keep=None) == []


class _Model(torch.nn.Module):
    """Ten trainable float32 weights, a hundred frozen ones; records what ``save_pretrained`` was given."""

    def __init__(self):
        super().__init__()
        self.trained = torch.nn.Parameter(torch.zeros(10))
        self.frozen = torch.nn.Parameter(torch.zeros(100), requires_grad=False)
        self.saved = []

    def save_pretrained(self, directory, state_dict=None, safe_serialization=False):
        self.saved.append((directory, state_dict, safe_serialization))


class _Accelerator:
    def __init__(self, main: bool, engine: str):
        self.is_main_process = main
        self.distributed_type = type("D", (), {"name": engine})
        self.gathered = 0

    def unwrap_model(self, model):
        return model

    def get_state_dict(self, model):
        self.gathered += 1
        return {"trained": model.trained.detach()}


class _Tokenizer:
    def __init__(self):
        self.saved = []

    def save_pretrained(self, directory):
        self.saved.append(directory)


@pytest.mark.parametrize("main, engine", [(True, "NO"), (True, "DEEPSPEED"), (True, "FSDP"), (False, "DEEPSPEED"),
                                          (False, "NO")])
def test_saving_the_weights_gathers_on_every_rank_and_writes_on_the_main_one(tmp_path, main, engine):
    model, tokenizer, accelerator, events = _Model(), _Tokenizer(), _Accelerator(main, engine), []

    @contextlib.contextmanager
    def room(directory, needed):
        events.append(("room", directory, needed))
        yield
        events.append(("written", len(model.saved), len(tokenizer.saved)))

    save_trainable_files(accelerator, model, tmp_path, tokenizer, room=room, then=lambda m: events.append(("then", m)))
    sharded = engine != "NO"
    assert accelerator.gathered == (1 if sharded else 0)  # collective: the other ranks take part too
    if not main:
        assert model.saved == [] and tokenizer.saved == [] and events == []
        return
    [(directory, state_dict, safe)] = model.saved
    assert directory == tmp_path and safe and tokenizer.saved == [tmp_path]
    assert (state_dict is not None) == sharded
    assert events == [("room", Path(tmp_path), 40), ("written", 1, 1), ("then", model)]  # 10 trainable float32


def test_a_checkpoints_weights_are_written_without_tokenizer_or_room(tmp_path):
    model, accelerator = _Model(), _Accelerator(True, "NO")
    save_trainable_files(accelerator, model, tmp_path)
    assert model.saved == [(tmp_path, None, True)]
