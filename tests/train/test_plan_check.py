"""``moetune train``'s pre-check on a GPU machine: a plan over the GPU's memory is one paragraph, a warning by
default and a refusal with ``training.plan_check: error``; on a CPU machine nothing is planned. The GPU is
stood in for (its memory given), the plan itself is the real one on a tiny model."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from moetune.config import load_config
from moetune.errors import UserError
from moetune.plan import gpus
from moetune.plan.gpus import GIB, Gpu
from moetune.train.plan_check import check_plan

ONE_PROCESS = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None, fsdp_plugin=None), num_processes=1)
TINY = ("{num_hidden_layers: 2, hidden_size: 64, intermediate_size: 128, num_attention_heads: 4, "
        "num_key_value_heads: 2, num_local_experts: 4, num_experts_per_tok: 2, vocab_size: 128, "
        "max_position_embeddings: 128}")


def tiny_config(*overrides: str):
    return load_config(None, ["model.architecture=mixtral", "model.random_init=true", "model.torch_dtype=float32",
                              "model.max_seq_length=128", f"model.config_overrides={TINY}", *overrides])


@pytest.fixture
def gpu(monkeypatch):
    """``gpu(gib)``: pretend a CUDA GPU with ``gib`` GiB is visible."""
    def visible(gib: float):
        monkeypatch.setattr(gpus, "visible_gpu", lambda: Gpu("Test GPU", int(gib * GIB), 1e14))
    return visible


def test_a_plan_over_the_gpu_memory_is_refused_with_plan_check_error(gpu):
    gpu(0.5)  # less than the allowance alone
    with pytest.raises(UserError) as refused:
        check_plan(tiny_config("training.plan_check=error"), ONE_PROCESS)
    message = str(refused.value)
    assert "Test GPU" in message and "not even micro-batch 1 fits" in message and "training.plan_check" in message
    assert "\n" not in message


def test_by_default_it_is_one_warning_and_the_run_goes_on(gpu, caplog):
    gpu(1.01)  # the allowance's 1 GiB and a little: a few rows of 128 tokens
    with caplog.at_level(logging.WARNING, logger="moetune"):
        check_plan(tiny_config("training.per_device_train_batch_size=4096"), ONE_PROCESS)
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "the largest micro-batch that fits is" in record.getMessage()
    assert "training.per_device_train_batch_size" in record.getMessage()


def test_a_plan_that_fits_says_nothing_alarming(gpu, caplog):
    gpu(80)
    with caplog.at_level(logging.INFO, logger="moetune"):
        check_plan(tiny_config("training.plan_check=error"), ONE_PROCESS)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_on_a_cpu_machine_nothing_is_planned(monkeypatch):
    assert not torch.cuda.is_available()
    monkeypatch.setattr("moetune.plan.report.make_plan", lambda *a, **k: pytest.fail("planned on a CPU machine"))
    check_plan(tiny_config("training.plan_check=error"), ONE_PROCESS)
