"""What a run does with bad folders, a second run, a full disk, damaged checkpoints, divergence and signals."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moetune.cli import main
from moetune.errors import UserError
from moetune.run_dir import LOCK_FILE, RUN_FILE, list_checkpoints
from moetune.train.checkpoint import TrainerState, resolve_resume, save_checkpoint
from moetune.train.output_dir import check_output_dir
from moetune.train.run_lock import RunLock

from .conftest import read_metrics, write_tiny_run

SHORT = ["training.max_steps=4", "training.save_steps=2", "training.eval_steps=100", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """(config, output dir) of a finished 4-step run with checkpoint-2 and checkpoint-4; copy it before changing it."""
    config, out = write_tiny_run(tmp_path_factory.mktemp("short"))
    assert main(["train", "--config", str(config), *SHORT]) == 0
    return config, out


def copy_run(short_run, tmp_path):
    config, out = short_run
    return config, Path(shutil.copytree(out, tmp_path / "copy"))


def lrs(out):
    return {r["step"]: r["lr"] for r in read_metrics(out) if "loss" in r}


def no_model_build(monkeypatch):
    import moetune.train.loop as loop

    def refuse(*args):
        raise AssertionError("the model was built")

    monkeypatch.setattr(loop, "build_training_inputs", refuse)


# ----------------------------------------------------------------------------------------- the lock


def test_a_second_run_into_a_locked_output_dir_names_the_holder(tiny_run, monkeypatch, capsys):
    config, out = tiny_run
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from moetune.train.run_lock import RunLock
        lock = RunLock({str(out)!r})
        lock.acquire()
        print("locked", flush=True)
        time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        no_model_build(monkeypatch)
        assert main(["train", "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert f"is in use by another moetune run (pid {holder.pid} on host {os.uname().nodename}" in err
        assert "Traceback" not in err and not (out / "config.yaml").exists()
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait()
    lock = RunLock(out)
    lock.acquire()  # nothing is left held
    assert json.loads((out / RUN_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_the_lock_is_exclusive_reentrant_for_its_run_and_released(tmp_path):
    first, second = RunLock(tmp_path / "run"), RunLock(tmp_path / "run")
    first.acquire()
    first.acquire()  # the auto_find_batch_size retry takes it again
    with pytest.raises(UserError, match=f"in use by another moetune run \\(pid {os.getpid()} on host"):
        second.acquire()
    first.release()
    second.acquire()
    second.release()


# ------------------------------------------------------------------------------ which folders are refused


def test_a_folder_holding_user_files_is_refused_and_left_as_it_was(tiny_run, tmp_path, monkeypatch, capsys):
    config, _ = tiny_run
    project = tmp_path / "project"
    project.mkdir()
    files = {"config.yaml": "# my settings\nlora: {r: 4}\n", "README.md": "# My project\n"}
    for name, text in files.items():
        (project / name).write_text(text)
    monkeypatch.chdir(project)
    no_model_build(monkeypatch)
    for flags in ([], ["training.overwrite_output_dir=true"]):
        assert main(["train", "--config", str(config), "training.output_dir=.", *flags]) == 2
        err = capsys.readouterr().err
        assert "training.output_dir . holds files moetune did not write (README.md, config.yaml)" in err
        assert "not even with training.overwrite_output_dir=true" in err
    assert sorted(p.name for p in project.iterdir()) == sorted(files)
    assert all((project / name).read_text() == text for name, text in files.items())


def test_root_and_home_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UserError, match="is the root folder"):
        check_output_dir("/")
    with pytest.raises(UserError, match="is your home folder"):
        check_output_dir(tmp_path)
    with pytest.raises(UserError, match="is your home folder"):
        check_output_dir("~")


def test_a_run_folder_of_moetune_files_and_an_empty_folder_are_accepted(short_run, tmp_path):
    _, out = short_run
    check_output_dir(out)  # a finished run: resumable and replaceable as before
    assert {RUN_FILE, LOCK_FILE, "config.yaml", "README.md", "checkpoint-4"} <= {p.name for p in out.iterdir()}
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty")
    check_output_dir(tmp_path / "not" / "yet")
    older = tmp_path / "older"  # a run folder of a version that wrote no RUN_FILE
    (older / "checkpoint-10").mkdir(parents=True)
    (older / "metrics.jsonl").write_text("{}\n")
    (older / "config.yaml").write_text("lora: {r: 4}\n")
    check_output_dir(older)
    (older / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"holds files moetune did not write \(notes.txt\)"):
        check_output_dir(older)


@pytest.mark.parametrize("case, message", [
    ("under_a_file", "cannot be created: {file} is a file"),
    ("a_file", "is a file, not a folder"),
    ("read_only", "is not writable (read-only or no permission)"),
])
def test_an_unwritable_output_dir_is_reported_by_validate_and_train(tiny_run, tmp_path, monkeypatch, capsys, case, message):
    config, _ = tiny_run
    file = tmp_path / "a-file"
    file.write_text("x")
    target = {"under_a_file": file / "run", "a_file": file, "read_only": tmp_path / "ro"}[case]
    if case == "read_only":
        target.mkdir()
        real_access = os.access
        # A read-only mount: root passes permission bits, so the filesystem's answer is simulated.
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == target else real_access(p, mode))
    before = sorted(tmp_path.rglob("*"))
    assert main(["validate", "--config", str(config), f"training.output_dir={target}"]) == 2
    assert message.format(file=file) in capsys.readouterr().err
    no_model_build(monkeypatch)
    assert main(["train", "--config", str(config), f"training.output_dir={target}"]) == 2
    err = capsys.readouterr().err
    assert f"training.output_dir {target}" in err and message.format(file=file) in err and "Traceback" not in err
    assert sorted(tmp_path.rglob("*")) == before  # nothing was created


# ------------------------------------------------------------------------------------------ divergence


def test_a_nan_stop_names_the_last_checkpoint_saved_before_the_first_bad_step(tiny_run, monkeypatch, capsys):
    import moetune.train.loop as loop

    config, out = tiny_run
    real, calls = loop.compute_losses, []

    def diverging_after_step_4(model, batch, cfg, reference=None):  # 2 micro-batches per step
        calls.append(1)
        parts = real(model, batch, cfg, reference)
        if len(calls) > 8:
            parts.lm_loss_sum = parts.lm_loss_sum * float("inf")
        return parts

    monkeypatch.setattr(loop, "compute_losses", diverging_after_step_4)
    assert main(["train", "--config", str(config), "advanced.max_bad_steps=3", "training.save_steps=2",
                 "logging.tensorboard=false"]) == 1
    err = capsys.readouterr().err
    assert "stopping at step 7 after 3 NaN/inf steps in a row (the first at step 5)" in err
    assert (f"The last checkpoint saved before step 5 is {out / 'checkpoint-4'}: resume from it with a lower rate, "
            f"training.resume_from_checkpoint={out / 'checkpoint-4'} training.learning_rate=<lower> "
            "training.reset_lr_schedule=true") in err
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert resolve_resume("latest", out).name == "checkpoint-4"


def test_resuming_with_another_learning_rate_warns_and_reset_lr_schedule_applies_it(short_run, tmp_path, capsys):
    config, out = copy_run(short_run, tmp_path)
    trained = lrs(out)
    resume = ["training.resume_from_checkpoint=" + str(out / "checkpoint-2"), "training.learning_rate=1.0e-3",
              f"training.output_dir={out}"]
    assert main(["train", "--config", str(config), *SHORT, *resume]) == 0
    err = capsys.readouterr().err
    assert ("warning: the config's learning-rate schedule (learning_rate 0.001, cosine, 2 warmup steps, 4 steps, "
            "min_learning_rate 0) differs from the checkpoint's (learning_rate 0.003, cosine") in err
    assert "Add training.reset_lr_schedule=true to switch to the config's." in err
    kept = lrs(out)
    assert (kept[3], kept[4]) == (pytest.approx(trained[3]), pytest.approx(trained[4]))  # the checkpoint's rate
    assert trained[3] == pytest.approx(3e-3) and trained[4] == pytest.approx(1.5e-3)  # cosine from 3e-3 after warmup

    assert main(["train", "--config", str(config), *SHORT, *resume, "training.reset_lr_schedule=true"]) == 0
    err = capsys.readouterr().err
    assert "training.reset_lr_schedule: the learning-rate schedule is the config's (learning_rate 0.001" in err
    assert "from step 2" in err and "differs" not in err
    reset = lrs(out)
    assert (reset[3], reset[4]) == (pytest.approx(1e-3), pytest.approx(5e-4))  # the config's schedule at steps 3, 4
    assert TrainerState.load(out / "checkpoint-4").lr_schedule["learning_rate"] == 1e-3

    # A resume from the reset run's checkpoint follows its new schedule without a warning.
    resume[0] = "training.resume_from_checkpoint=" + str(out / "checkpoint-4")
    assert main(["train", "--config", str(config), *SHORT, *resume]) == 0
    assert "differs from the checkpoint's" not in capsys.readouterr().err


# ----------------------------------------------------------------------------------- damaged checkpoints


def test_a_truncated_adapter_in_the_latest_checkpoint_offers_the_previous_one(short_run, tmp_path, capsys):
    config, out = copy_run(short_run, tmp_path)
    adapter = out / "checkpoint-4" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])
    assert main(["train", "--config", str(config), *SHORT, f"training.output_dir={out}",
                 "training.resume_from_checkpoint=latest"]) == 2
    err = capsys.readouterr().err
    assert f"Cannot resume from {out / 'checkpoint-4'}: {adapter} is truncated or corrupt" in err
    assert f"Resume from checkpoint-2 instead, with training.resume_from_checkpoint={out / 'checkpoint-2'}." in err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------- full disk


def test_a_full_disk_while_saving_says_so_and_keeps_earlier_checkpoints(tiny_run, monkeypatch, capsys):
    config, out = tiny_run
    real_save = TrainerState.save

    def disk_fills_at_step_4(self, directory):
        if self.global_step == 4:
            (directory / "half-written").write_bytes(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(self, directory)

    monkeypatch.setattr(TrainerState, "save", disk_fills_at_step_4)
    assert main(["train", "--config", str(config), *SHORT]) == 1
    err = capsys.readouterr().err
    assert f"failed: no space left on {out}: " in err and " MB needed, " in err and " MB free, while writing checkpoint-4 " in err
    assert "(checkpoint-2 and the checkpoints before it are intact)" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert TrainerState.load(out / "checkpoint-2").global_step == 2

    # Resuming in place on the still-full disk: the config cannot be written; nothing half-written is left.
    config_before = (out / "config.yaml").read_text()
    real_write = Path.write_text

    def full(self, text, *args, **kwargs):
        if self.name == "config.yaml.tmp":
            real_write(self, text[:10])
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    no_model_build(monkeypatch)
    assert main(["train", "--config", str(config), *SHORT, "training.resume_from_checkpoint=latest"]) == 1
    assert f"failed: no space left on {out}: 1 MB needed" in capsys.readouterr().err
    assert not (out / "config.yaml.tmp").exists() and (out / "config.yaml").read_text() == config_before


def test_a_full_disk_at_the_final_save_says_so_removes_the_half_written_adapter_and_resumes(tiny_run, monkeypatch,
                                                                                           capsys):
    from safetensors.torch import save_file as real_save_file

    config, out = tiny_run
    import peft.peft_model

    def disk_full(tensors, filename, *args, **kwargs):
        if Path(filename).parent != out:  # checkpoints save fine; the final adapter hits the full disk
            return real_save_file(tensors, filename, *args, **kwargs)
        Path(filename).write_bytes(b"half an adapter")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", disk_full)
    assert main(["train", "--config", str(config), *SHORT]) == 1
    err = capsys.readouterr().err
    assert f"no space left on {out}: " in err and "while writing the final adapter / model (the checkpoints are intact)" in err
    assert "Traceback" not in err
    assert not (out / "adapter_model.safetensors").exists()  # no truncated adapter for eval to trip on
    checkpoints = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints and (out / checkpoints[-1] / "adapter_model.safetensors").is_file()

    monkeypatch.setattr(peft.peft_model, "safe_save_file", real_save_file)
    assert main(["train", "--config", str(config), *SHORT, "training.resume_from_checkpoint=latest"]) == 0
    assert (out / "adapter_model.safetensors").is_file()


class _SavingAccelerator:
    """Just what save_checkpoint uses; ``save_state`` fails as torch's zip writer does on a full disk."""

    is_main_process = True
    distributed_type = type("D", (), {"name": "NO"})

    def wait_for_everyone(self):
        pass

    def save_state(self, directory, **kwargs):
        Path(directory).mkdir(parents=True)
        (Path(directory) / "optimizer.bin").write_bytes(b"x" * 2000)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1536 vs 1472")


def test_a_torch_write_error_on_a_full_disk_is_a_disk_full_failure(tmp_path, monkeypatch):
    from moetune.errors import RunFailure

    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "adapter_model.safetensors").write_bytes(b"x" * 3_000_000)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 500_000, 500_000))
    with pytest.raises(RunFailure, match=f"no space left on {tmp_path}: 3 MB needed, 1 MB free"):
        save_checkpoint(_SavingAccelerator(), tmp_path, TrainerState(global_step=4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    # With room on the disk the same error is not called a full disk.
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 0, 10**12))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        save_checkpoint(_SavingAccelerator(), tmp_path, TrainerState(global_step=4))


# ---------------------------------------------------------------------------------------------- signals


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_start_up_is_one_line_and_128_plus_the_signal(tiny_run, monkeypatch, capsys, sig, code):
    import moetune.train.loop as loop

    config, out = tiny_run

    def signalled_while_building(*args):
        os.kill(os.getpid(), sig)
        raise AssertionError("the signal did not stop the start-up")

    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(loop, "build_training_inputs", signalled_while_building)
    assert main(["train", "--config", str(config)]) == code
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"moetune: {sig.name} during start-up; nothing was trained, nothing to resume."
    assert "Traceback" not in err
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    RunLock(out).acquire()  # the lock went with the run
