"""One tiny training run per test session, shared by the evaluation tests (see tests/train/conftest.py)."""

import pytest

from moetune.cli import main

from ..train.conftest import read_metrics, write_tiny_run

# Greedy and short: generation is deterministic and cheap, so reports can be compared value by value.
EVAL_OVERRIDES = ["inference.do_sample=false", "inference.max_new_tokens=8", "inference.repetition_penalty=1.0"]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """(config path, run output dir, metrics records) of a finished 12-step tiny run with checkpoints 4, 8, 12."""
    config, out = write_tiny_run(tmp_path_factory.mktemp("eval-run"))
    assert main(["train", "--config", str(config), "logging.tensorboard=false"]) == 0
    return config, out, read_metrics(out)
