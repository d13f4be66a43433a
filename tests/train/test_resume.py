"""Exact resume: a run killed with SIGKILL and resumed logs the same losses as an uninterrupted one."""

import os
import signal
import subprocess
import sys
import time

import pytest

from moetune.cli import main

from .conftest import read_metrics


def train_losses(out):
    return {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}


def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_run, tmp_path):
    config, out = tiny_run
    assert main(["train", "--config", str(config), f"training.output_dir={tmp_path / 'whole'}"]) == 0
    expected = train_losses(tmp_path / "whole")
    assert sorted(expected) == list(range(1, 13))

    # Kill the second run right after its first checkpoint appears, wherever it is in between.
    process = subprocess.Popen([sys.executable, "-m", "moetune", "train", "--config", str(config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "checkpoint-4").is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert (out / "checkpoint-4").is_dir()

    assert main(["train", "--config", str(config), "training.resume_from_checkpoint=latest"]) == 0
    resumed = train_losses(out)
    assert sorted(resumed) == list(range(1, 13))  # no step missing, none logged twice
    for step in range(1, 13):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), f"step {step}"
