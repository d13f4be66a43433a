"""Out of memory anywhere in a run: the remedies, and with auto_find_batch_size a retry with half the batch
that removes only what the failed attempt wrote."""

import hashlib
from pathlib import Path

import accelerate
import pytest
import torch

from moetune.cli import main
from moetune.config import load_config
from moetune.train.out_of_memory import AttemptFiles

from .conftest import read_metrics

QUIET = ["training.eval_steps=100", "logging.tensorboard=false"]


def fingerprints(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def trained_steps(out: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out) if "loss" in r]


def first_prepare_runs_out_of_memory(monkeypatch) -> list[int]:
    """``accelerator.prepare`` fails on its first call; returns the per-device batch size of every call."""
    real, calls = accelerate.Accelerator.prepare, []

    def prepare(self, model, optimizer, train_loader, *rest):
        calls.append(train_loader.batch_size)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return real(self, model, optimizer, train_loader, *rest)

    monkeypatch.setattr(accelerate.Accelerator, "prepare", prepare)
    return calls


def steps_run_out_of_memory_after(monkeypatch, micro_batches: int, then=None) -> None:
    """Micro-batches of more than one row run out of memory once ``micro_batches`` of them went through."""
    import moetune.train.loop as loop

    real, calls = loop.compute_losses, []

    def compute_losses(model, batch, cfg, reference=None):
        if batch["input_ids"].shape[0] > 1:
            calls.append(1)
            if len(calls) > micro_batches:
                if then is not None:
                    then()
                raise torch.OutOfMemoryError("CUDA out of memory.")
        return real(model, batch, cfg, reference)

    monkeypatch.setattr(loop, "compute_losses", compute_losses)


@pytest.mark.parametrize("where", ["build", "prepare"])
def test_out_of_memory_while_building_or_preparing_exits_1_with_remedies(tiny_run, monkeypatch, capsys, where):
    import moetune.train.loop as loop

    if where == "build":
        def out_of_memory(*args):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        monkeypatch.setattr(loop, "build_training_inputs", out_of_memory)
    else:
        first_prepare_runs_out_of_memory(monkeypatch)
    config, _ = tiny_run
    assert main(["train", "--config", str(config), *QUIET]) == 1
    err = capsys.readouterr().err
    assert "failed: Out of memory at per_device_train_batch_size=4, model.max_seq_length=128." in err
    assert "raise training.gradient_accumulation_steps" in err and "Traceback" not in err


def test_an_out_of_memory_prepare_is_retried_with_half_the_batch(tiny_run, monkeypatch, capsys):
    calls = first_prepare_runs_out_of_memory(monkeypatch)
    config, out = tiny_run
    assert main(["train", "--config", str(config), *QUIET, "training.auto_find_batch_size=true", "training.max_steps=4",
                 "training.per_device_train_batch_size=2", "training.save_steps=2"]) == 0
    assert calls == [2, 1]
    assert ("moetune: out of memory at per_device_train_batch_size=2; retrying with 1 x 4 accumulation"
            in capsys.readouterr().err)
    resolved = load_config(out / "config.yaml").training
    assert (resolved.per_device_train_batch_size, resolved.gradient_accumulation_steps) == (1, 4)
    assert resolved.overwrite_output_dir is False  # the retry needed no licence to replace anything
    assert trained_steps(out) == [1, 2, 3, 4]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_a_retry_removes_the_failed_attempts_checkpoints_and_log_lines(tiny_run, monkeypatch):
    config, out = tiny_run
    # Batch 2 x 2: steps 1 and 2 (checkpoint-2 saved) go through, step 3 runs out of memory.
    steps_run_out_of_memory_after(monkeypatch, micro_batches=4)
    assert main(["train", "--config", str(config), *QUIET, "training.auto_find_batch_size=true", "training.max_steps=4",
                 "training.per_device_train_batch_size=2", "training.save_steps=2"]) == 0
    assert trained_steps(out) == [1, 2, 3, 4]  # the failed attempt's lines for steps 1 and 2 are gone
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert load_config(out / "config.yaml").training.per_device_train_batch_size == 1


def test_an_out_of_memory_resume_retries_from_the_same_checkpoint_and_keeps_the_earlier_run(tiny_run, monkeypatch):
    import moetune.train.loop as loop

    config, out = tiny_run
    earlier = ["training.max_steps=4", "training.save_steps=2", "training.per_device_train_batch_size=2", *QUIET]
    assert main(["train", "--config", str(config), *earlier]) == 0
    kept = {name: fingerprints(out / name) for name in ("checkpoint-2", "checkpoint-4", "tokenizer")}
    assert all(kept.values())

    resumed_from = []
    real_load = loop.load_checkpoint
    monkeypatch.setattr(loop, "load_checkpoint", lambda acc, path: resumed_from.append(path) or real_load(acc, path))
    # The resumed attempt (batch 2 x 2) trains steps 5 and 6, saves checkpoint-6, then runs out of memory.
    steps_run_out_of_memory_after(monkeypatch, micro_batches=4)
    assert main(["train", "--config", str(config), *earlier, "training.max_steps=8",
                 "training.resume_from_checkpoint=latest", "training.auto_find_batch_size=true"]) == 0
    assert resumed_from == [out / "checkpoint-4", out / "checkpoint-4"]
    assert {name: fingerprints(out / name) for name in kept} == kept  # byte for byte
    assert trained_steps(out) == list(range(1, 9))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6",
                                                                 "checkpoint-8"]
    resolved = load_config(out / "config.yaml").training
    assert (resolved.per_device_train_batch_size, resolved.gradient_accumulation_steps) == (1, 4)


def test_a_file_of_the_user_that_appeared_during_the_failed_attempt_is_kept_and_the_retry_refuses(
        tiny_run, monkeypatch, capsys):
    config, out = tiny_run

    def user_writes_notes():
        (out / "notes.txt").write_text("mine")

    steps_run_out_of_memory_after(monkeypatch, micro_batches=2, then=user_writes_notes)
    assert main(["train", "--config", str(config), *QUIET, "training.auto_find_batch_size=true",
                 "training.per_device_train_batch_size=2"]) == 2
    assert "holds files moetune did not write (notes.txt)" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"


def test_a_folder_with_user_files_is_refused_before_anything_runs_out_of_memory(tiny_run, tmp_path, monkeypatch,
                                                                                capsys):
    calls = first_prepare_runs_out_of_memory(monkeypatch)
    config, _ = tiny_run
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("# My project\n")
    assert main(["train", "--config", str(config), f"training.output_dir={project}",
                 "training.auto_find_batch_size=true"]) == 2
    assert "holds files moetune did not write (README.md)" in capsys.readouterr().err
    assert calls == [] and [p.name for p in project.iterdir()] == ["README.md"]


def test_attempt_files_remove_what_was_added_and_restore_the_metrics(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (out / "runs").mkdir()
    (out / "runs" / "old.tfevents").write_text("old")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    files = AttemptFiles(out)
    files.record()
    # What an attempt writes: a lock, a checkpoint, a partial one, an event file, log lines.
    for name in (".moetune.lock", ".moetune-run.json"):
        (out / name).write_text("")
    (out / "checkpoint-4").mkdir()
    (out / "checkpoint-4" / "adapter_model.safetensors").write_bytes(b"x")
    (out / ".partial-checkpoint-6").mkdir()
    (out / "runs" / "new.tfevents").write_text("new")
    (out / "checkpoint-2" / "extra.bin").write_bytes(b"y")
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2}\n')
    (out / "notes.txt").write_text("the user's")
    files.record()  # a later attempt: the first record counts
    removed = files.remove_added()
    assert sorted(map(str, removed)) == [".partial-checkpoint-6", "checkpoint-2/extra.bin", "checkpoint-4",
                                         "runs/new.tfevents"]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        ".moetune-run.json", ".moetune.lock", "checkpoint-2", "checkpoint-2/trainer_state.json", "metrics.jsonl",
        "notes.txt", "runs", "runs/old.tfevents"]
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_attempt_files_of_a_new_folder_remove_everything_but_the_lock(tmp_path):
    out = tmp_path / "new"
    files = AttemptFiles(out)
    files.record()
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "tokenizer.json").write_text("{}")
    (out / ".moetune.lock").write_text("")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    files.remove_added()
    assert [p.name for p in out.iterdir()] == [".moetune.lock"]
