"""Checkpoint folder rules: output_dir safety, resume resolution, rotation."""

import pytest

from moetune.errors import UserError
from moetune.run_folder import list_checkpoints
from moetune.train.checkpoint import TrainerState, prepare_output_dir, resolve_resume, rotate_checkpoints


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
