"""What a preference objective adds to the plan: two rows per pair, the reference's forward passes, and a frozen
copy of the weights when no adapter trains; checked against FlopCounterMode on the real preference step."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moetune.models.load.factory import build_model
from moetune.models.loss.objective import compute_losses, step_token_counts
from moetune.models.loss.reference import AdapterOff, FrozenCopy
from moetune.plan.compute import model_flops
from moetune.plan.gpus import Gpu
from moetune.plan.launch import Launch
from moetune.plan.model import build_planned_model
from moetune.plan.report import make_plan, preference_costs

from .conftest import VOCAB

PAIRS, SEQ = 2, 64


@pytest.mark.parametrize(("objective", "adapter", "precompute", "expected"), [
    ("sft", True, False, (1, 0.0, False)),
    ("dpo", True, False, (2, 1.0, False)),
    ("dpo", False, False, (2, 1.0, True)),
    ("dpo", False, True, (2, 0.0, False)),
    ("orpo", False, False, (2, 0.0, False)),
    ("kto", True, False, (1, 3.0, False)),  # the reference on its rows, the policy and the reference on the KL rows
    ("kto", False, True, (1, 1.0, False)),  # only the policy on the KL rows
])
def test_preference_costs_by_objective(config_for, objective, adapter, precompute, expected):
    config = config_for("mixtral", f"training.objective={objective}", f"lora.enabled={str(adapter).lower()}",
                        f"training.precompute_ref_logps={str(precompute).lower()}",
                        *(() if adapter else ("moe.freeze_router=false",)))
    planned = build_planned_model(config)
    rows, forwards, copy = preference_costs(config.training, planned.model, weight_bytes=1234)
    assert (rows, forwards, copy == 1234) == expected


def test_a_pair_plans_two_rows_and_a_copy_its_weights(config_for):
    sft = make_plan(config_for("mixtral"), launch=Launch(), gpu=Gpu("test", 80 * 2**30, None))
    dpo = make_plan(config_for("mixtral", "training.objective=dpo", "lora.enabled=false", "moe.freeze_router=false"),
                    launch=Launch(), gpu=Gpu("test", 80 * 2**30, None))
    assert dpo.rows_per_sample == 2 and dpo.reference == dpo.states.weights > 0
    rows = 2 * dpo.batch
    assert dpo.allocated() == (dpo.states.total + dpo.states.weights + dpo.activations.at(rows, dpo.checkpointing)
                               + dpo.loss.at(rows))
    assert dpo.tokens_per_step == 2 * sft.tokens_per_step


@pytest.mark.parametrize("adapter", [True, False], ids=["adapter-off-reference", "frozen-copy-reference"])
def test_planned_dpo_flops_are_within_five_percent_of_flop_counter_mode(config_for, adapter):
    overrides = ("lora.enabled=false", "moe.expert_training=full") if not adapter else ()
    config = config_for("mixtral", "model.experts_implementation=eager", "model.attn_implementation=eager",
                        "training.objective=dpo", *overrides)
    planned = build_planned_model(config)
    _, forwards, _ = preference_costs(config.training, planned.model, 0)
    plan = model_flops(planned.model, planned.family, SEQ, planned.routed_share, forwards).step(2 * PAIRS * SEQ)

    model = build_model(config, seed=0)
    model.train()
    (model.get_base_model() if hasattr(model, "get_base_model") else model).enable_input_require_grads()
    reference = AdapterOff() if adapter else FrozenCopy(build_model(config, seed=0).requires_grad_(False))
    ids = torch.randint(3, VOCAB, (2 * PAIRS, SEQ), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :8] = -100  # a short prompt: the completions are scored
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "pair_index": torch.arange(PAIRS)}
    compute_losses(model, batch, config, reference)  # the first batch decides the LM-head path, outside the count
    with FlopCounterMode(display=False) as counter:
        parts = compute_losses(model, batch, config, reference)
        parts.objective(step_token_counts(batch)).backward()
    assert plan == pytest.approx(counter.get_total_flops(), rel=0.05)
