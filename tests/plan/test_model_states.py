"""The planned bytes of weights, trainable parameters, gradients and optimizer states equal those of the
real tensors exactly: the real model is built and loaded as a run builds it, takes one backward pass and one
optimizer step, and its tensors are summed; the plan never loads a weight."""

from __future__ import annotations

import json

import pytest
import torch

from moetune.models.load.factory import build_model
from moetune.plan.launch import Launch
from moetune.plan.memory import model_states, optimizer_state_bytes, stored_bytes
from moetune.plan.model import build_planned_model
from moetune.train.optim import build_optimizer

from .conftest import MODEL_TYPES, VOCAB

ROUTER_TRAINS = "moe.freeze_router=false"
PLANS = [(model_type, (ROUTER_TRAINS,)) for model_type in MODEL_TYPES if model_type != "mpt"] + [
    ("mpt", ()),
    ("mpt", ("moe.upcycling.enabled=true",)),  # the upcycled architecture, its new router and experts train
    ("mixtral", (ROUTER_TRAINS, "model.torch_dtype=bfloat16")),  # bf16 base, float32 LoRA, bf16 router copy
    ("mixtral", ("moe.expert_training=lora",)),
    ("mixtral", ("moe.expert_training=full",)),  # a trained copy of the experts beside the frozen ones
    ("gpt_oss", ("lora.enabled=false", "moe.expert_training=full")),
    ("qwen2_moe", ("moe.shared_experts.train=true", "moe.shared_experts.method=lora")),
    ("deepseek_v3", ("moe.shared_experts.train=true",)),
    ("olmoe", ("training.optim=sgd",)),
    ("qwen3_moe", ("training.optim=adafactor",)),
]


def real_model_states(model, config) -> dict[str, int]:
    """Bytes of the real tensors after one backward pass and one optimizer step."""
    params = list({id(p): p for p in model.parameters()}.values())
    weights = sum(p.nbytes for p in params) + sum(b.nbytes for b in model.buffers())
    tokens = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=tokens).logits.float().logsumexp(-1).mean().backward()
    optimizer = build_optimizer(model, config.training)
    optimizer.step()
    states = sum(value.nbytes for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value))
    trainable = [p for p in params if p.requires_grad]
    return {"weights": weights, "trainable": sum(p.nbytes for p in trainable),
            "gradients": sum(p.grad.nbytes for p in trainable if p.grad is not None), "optimizer": states}


@pytest.mark.parametrize(("model_type", "overrides"), PLANS, ids=[f"{t}-{'-'.join(o) or 'default'}" for t, o in PLANS])
def test_planned_model_states_are_the_bytes_of_the_real_tensors(config_for, model_type, overrides):
    config = config_for(model_type, *overrides)
    planned = build_planned_model(config)
    states = model_states(planned.model, Launch(), config.training.optim, quantized=planned.quantized)
    real = real_model_states(build_model(config, seed=0), config)
    assert real["trainable"] > 0
    assert {"weights": states.weights, "trainable": states.trainable, "gradients": states.gradients,
            "optimizer": states.optimizer} == real


def test_esft_plans_the_selected_experts_states(config_for, tmp_path):
    (tmp_path / "experts.json").write_text(json.dumps({"selected": [[0, 3], [1]]}))
    config = config_for("qwen3_moe", "lora.enabled=false", "moe.expert_training=esft",
                        f"moe.esft.experts={tmp_path / 'experts.json'}")
    planned = build_planned_model(config)
    states = model_states(planned.model, Launch(), config.training.optim)
    assert planned.counts.trainable["experts"] == 3 * 3 * 64 * 32  # three experts, gate/up/down of 64 x 32
    real = real_model_states(build_model(config, seed=0), config)
    assert (states.weights, states.trainable, states.gradients, states.optimizer) == tuple(real.values())


def test_four_bit_weights_are_sized_as_bitsandbytes_stores_them(checkpoint):
    bnb = pytest.importorskip("bitsandbytes")
    for shape in [(128, 64), (100, 37), (4096, 224)]:
        weight = torch.randn(shape, dtype=torch.bfloat16)
        packed = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4")._quantize("cpu")
        state = packed.quant_state
        tensors = [packed, state.absmax, state.code, state.state2.absmax, state.state2.code, state.offset]
        assert stored_bytes(weight, bits=4) == sum(t.nbytes for t in tensors)


def test_deepspeed_shards_what_its_estimators_say():
    weight = torch.nn.Parameter(torch.zeros(1000, 100, device="meta"))
    frozen = torch.nn.Parameter(torch.zeros(1000, 1000, device="meta"), requires_grad=False)
    model = torch.nn.ParameterList([weight, frozen])
    zero2 = model_states(model, Launch(processes=4, engine="deepspeed", zero_stage=2), "adamw_torch", precision="bf16")
    assert (zero2.weights, zero2.gradients, zero2.optimizer) == (2 * 1_100_000, 2 * 100_000 // 4, 16 * 100_000 // 4)
    zero3 = model_states(model, Launch(processes=4, engine="deepspeed", zero_stage=3), "adamw_torch", precision="bf16")
    assert zero3.weights == 2 * 1_100_000 // 4
    offload = model_states(model, Launch(processes=4, engine="deepspeed", zero_stage=3, offload_optimizer=True,
                                         offload_params=True), "adamw_torch", precision="bf16")
    assert (offload.weights, offload.optimizer) == (0, 0) and offload.cpu > 0
    assert optimizer_state_bytes(weight, "adamw_torch") == 2 * 100_000 * 4 + 4


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v2"])
def test_a_four_bit_run_is_planned_as_loaded_quantised_experts_stay_unquantised_in_their_dtype(config_for, model_type):
    # transformers' bitsandbytes integration converts nn.Linear only (fused 3-D experts are none), then
    # PEFT's prepare_model_for_kbit_training casts every other 16-bit weight to float32, and moetune puts
    # the fused experts back in bf16: only the small weights (norms, embeddings, lm_head) stay in float32.
    bnb = pytest.importorskip("bitsandbytes")
    config = config_for(model_type, "model.load_in_4bit=true", "model.torch_dtype=bfloat16", ROUTER_TRAINS)
    planned = build_planned_model(config)
    states = model_states(planned.model, Launch(), config.training.optim, quantized=planned.quantized)
    model = build_model(config, seed=0)
    packed = [p for p in model.parameters() if isinstance(p, bnb.nn.Params4bit)]
    assert packed and len(packed) == len(planned.quantized)
    quant_states = sum(t.nbytes for p in packed for t in (p.quant_state.absmax, p.quant_state.code,
                                                           p.quant_state.state2.absmax, p.quant_state.state2.code,
                                                           p.quant_state.offset))
    experts = [p for n, p in model.named_parameters() if ".experts." in n]
    assert experts and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in experts)
    planned_experts = [p for n, p in planned.model.named_parameters() if ".experts." in n]
    assert [p.dtype for p in planned_experts] == [p.dtype for p in experts]
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)  # PEFT's float32, kept
    real = real_model_states(model, config)
    assert states.weights == real["weights"] + quant_states
    assert (states.trainable, states.gradients, states.optimizer) == (real["trainable"], real["gradients"],
                                                                      real["optimizer"])
