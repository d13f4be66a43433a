"""Optimizer groups and learning-rate schedules."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from moetune.config import TrainingConfig
from moetune.train.optim import build_optimizer, build_scheduler, decay_groups, warmup_steps


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_biases_and_norms_get_no_weight_decay():
    model = Tiny()
    decay, no_decay = decay_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and decay["params"] == [model.proj.weight]
    assert no_decay["weight_decay"] == 0.0
    assert {id(p) for p in no_decay["params"]} == {id(model.proj.bias), id(model.norm.weight), id(model.norm.bias)}


def test_a_model_without_deepspeed_moe_blocks_keeps_its_groups_and_deepspeed_stays_unimported():
    # In a fresh process: other tests import DeepSpeed.
    script = textwrap.dedent("""
        import sys
        import torch
        from moetune.config import TrainingConfig
        from moetune.train.optim import build_optimizer, decay_groups, split_expert_parallel_groups

        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        groups = decay_groups(model, 0.1)
        assert split_expert_parallel_groups(groups, model) is groups
        assert len(build_optimizer(model, TrainingConfig()).param_groups) == 2
        assert "deepspeed" not in sys.modules, "deepspeed was imported"
        """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", ["adamw_torch", "adamw_torch_fused", "adafactor", "sgd"])
def test_each_optimizer_steps(name):
    model = Tiny()
    optimizer = build_optimizer(model, TrainingConfig(optim=name, learning_rate=0.1))
    before = model.proj.weight.detach().clone()
    model.proj(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    assert not torch.equal(before, model.proj.weight)


def lrs(cfg, total):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    scheduler = build_scheduler(optimizer, cfg, total)
    out = []
    for _ in range(total):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_cosine_warms_up_then_decays_to_min_learning_rate():
    cfg = TrainingConfig(learning_rate=1e-3, min_learning_rate=1e-5, warmup_ratio=0.1)
    assert warmup_steps(cfg, 100) == 10
    values = lrs(cfg, 100)
    assert values[0] == 0.0 and values[5] == pytest.approx(5e-4)
    assert values[10] == pytest.approx(1e-3)
    assert values[-1] == pytest.approx(1e-5, rel=0.05)
    assert min(values[10:]) >= 1e-5 - 1e-12


def test_linear_and_constant_schedules():
    linear = lrs(TrainingConfig(learning_rate=1.0, lr_scheduler_type="linear", warmup_steps=2), 12)
    assert linear[:3] == [0.0, 0.5, 1.0] and linear[7] == pytest.approx(0.5)
    constant = lrs(TrainingConfig(learning_rate=1.0, lr_scheduler_type="constant", warmup_steps=4), 10)
    assert constant[2] == 0.5 and constant[4:] == [1.0] * 6
