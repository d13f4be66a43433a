"""Planned model FLOPs (4N frozen, 6N trained, plus attention) against torch's FlopCounterMode on a forward and
backward of tiny models of every family: within 5%."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moetune.models.load.factory import build_model
from moetune.plan.compute import model_flops, steps_per_hour
from moetune.plan.model import build_planned_model

from .conftest import MODEL_TYPES, VOCAB

BATCH, SEQ = 2, 64
CASES = [(t, ()) for t in MODEL_TYPES] + [
    ("mpt", ("moe.upcycling.enabled=true",)),
    ("mixtral", ("moe.expert_training=lora",)),
    ("mixtral", ("moe.expert_training=full", "moe.freeze_router=false")),
    ("qwen2_moe", ("lora.enabled=false", "moe.expert_training=full")),
]


@pytest.mark.parametrize(("model_type", "overrides"), CASES, ids=[f"{t}-{'-'.join(o) or 'default'}" for t, o in CASES])
def test_planned_flops_are_within_five_percent_of_flop_counter_mode(config_for, model_type, overrides):
    # Eager kernels, whose matmuls FlopCounterMode counts (it has no formula for CPU sdpa or grouped_mm).
    config = config_for(model_type, "model.experts_implementation=eager", "model.attn_implementation=eager", *overrides)
    planned = build_planned_model(config)
    plan = model_flops(planned.model, planned.family, SEQ, planned.routed_share).step(BATCH * SEQ)
    model = build_model(config, seed=0)
    model.train()
    # What PEFT does for a run with gradient checkpointing: the embedding's output requires grad, so every
    # layer's input gradient is computed.
    (model.get_base_model() if hasattr(model, "get_base_model") else model).enable_input_require_grads()
    tokens = torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=tokens).logits.float().logsumexp(-1).mean().backward()
    assert plan == pytest.approx(counter.get_total_flops(), rel=0.05)


def test_steps_per_hour_follow_from_flops_peak_and_mfu():
    from moetune.plan.compute import Flops

    flops = Flops(weights_per_token=6e9, attention_per_token=0.0)
    # 1e15 FLOP/s at 40% on 4 GPUs = 1.6e15 useful FLOP/s; a step of 1e6 tokens is 6e15 FLOPs: 3.75 s.
    assert steps_per_hour(flops, tokens_per_step=1_000_000, micro_batches_per_step=16, gpus=4, peak_flops=1e15,
                          mfu=0.4) == pytest.approx(3600 / 3.75)
