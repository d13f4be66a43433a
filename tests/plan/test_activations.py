"""The planned activations (a forward on meta tensors) against the bytes autograd saves in a real forward of
tiny models of every family, measured with ``torch.autograd.graph.saved_tensors_hooks``: within 10%, with and
without gradient checkpointing, packed and padded rows."""

from __future__ import annotations

import pytest
import torch

from moetune.models.families import packs_by_position_ids
from moetune.models.load.factory import build_model
from moetune.plan.activations import plan_activations
from moetune.plan.model import build_planned_model

from .conftest import MODEL_TYPES, VOCAB

BATCH, SEQ = 2, 64


def decoder_layers(model) -> list[torch.nn.Module]:
    from moetune.models.layout import innermost_model

    names = set(innermost_model(model)._no_split_modules)
    return [module for module in model.modules() if type(module).__name__ in names]


def real_batch(packed: bool) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    if packed:  # three samples per row, positions restarting at each, no attention mask
        positions = torch.cat([torch.arange(n) for n in (20, 30, SEQ - 50)]).expand(BATCH, -1)
        return {"input_ids": ids, "position_ids": positions}
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, 40:] = 0  # the second row is a shorter sample, padded
    return {"input_ids": ids, "attention_mask": mask}


def saved_in_real_forward(model, inputs, checkpointing: bool) -> int:
    """Bytes of the distinct storages autograd saves (weights aside) in one training forward; with
    checkpointing (whose saves include each checkpointed layer's input), plus one layer's saves as backward
    recomputes it, measured in a forward without checkpointing."""
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    layers = decoder_layers(model)
    inputs = {**inputs, "use_cache": False}
    if "logits_to_keep" in model.forward.__code__.co_varnames or hasattr(model, "get_base_model"):
        inputs["logits_to_keep"] = 1
    seen: dict[int, int] = {}
    current = [None]
    per_layer: dict[int, int] = {}
    layer_inputs: dict[int, int] = {}

    alive = []  # every storage seen stays allocated, so a later one cannot reuse its address and pass as seen

    def pack(tensor):
        alive.append(tensor)
        storage = tensor.untyped_storage()
        if storage._cdata not in weights and storage._cdata not in seen:
            seen[storage._cdata] = storage.nbytes()
            if current[0] is not None:
                per_layer[current[0]] = per_layer.get(current[0], 0) + storage.nbytes()
        return tensor

    def enter(index):
        def hook(module, args, kwargs):
            current[0] = index
            hidden = args[0] if args else kwargs["hidden_states"]
            layer_inputs[index] = hidden.untyped_storage().nbytes()
        return hook

    handles = [layer.register_forward_pre_hook(enter(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(lambda *_: current.__setitem__(0, None)) for layer in layers]
    try:
        if not checkpointing:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(**inputs)
            return sum(seen.values())
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # the layers' own saves, attributed
            model(**inputs)
        largest_layer = max(per_layer.values())
        seen.clear()
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # what checkpointing leaves outside
            model(**inputs)
        assert sum(seen.values()) >= sum(layer_inputs.values())
        return sum(seen.values()) + largest_layer
    finally:
        for handle in handles:
            handle.remove()


CASES = [(t, ()) for t in MODEL_TYPES] + [
    ("mpt", ("moe.upcycling.enabled=true",)),
    ("mixtral", ("moe.expert_training=lora",)),
    ("mixtral", ("lora.lora_dropout=0.1",)),
    ("qwen3_moe", ("moe.expert_training=full", "moe.freeze_router=false")),
]


# Every family padded without checkpointing and packed with it; all four ways for two of them.
LAYOUTS = [(False, False), (True, True)]
RUNS = [(t, o, packed, ckpt) for t, o in CASES for packed, ckpt in LAYOUTS] + [
    (t, (), packed, ckpt) for t in ("mixtral", "qwen3_moe") for packed, ckpt in ((True, False), (False, True))]


@pytest.mark.parametrize(("model_type", "overrides", "packed", "checkpointing"), RUNS,
                         ids=[f"{t}-{'-'.join(o) or 'default'}-{'packed' if p else 'padded'}-{'checkpointed' if c else 'saved'}"
                              for t, o, p, c in RUNS])
def test_planned_activations_are_within_ten_percent_of_what_autograd_saves(config_for, model_type, overrides, packed,
                                                                           checkpointing):
    config = config_for(model_type, "model.experts_implementation=grouped_mm", *overrides)
    planned = build_planned_model(config)
    experts = planned.counts.blocks[0].num_experts if planned.counts.blocks else 1
    plan = plan_activations(planned.model, SEQ, num_experts=experts, masked_sdpa=True).at(BATCH, checkpointing)
    model = build_model(config, seed=0)
    model.train()
    # A family whose rows cannot be packed with this kernel (its recurrent state, or masks built without the
    # position ids, as afmoe's under sdpa) is padded by a run: its "packed" rows are the padded ones.
    real = saved_in_real_forward(model, real_batch(packed and packs_by_position_ids(model)), checkpointing)
    assert plan == pytest.approx(real, rel=0.10), (plan, real)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v2"])
def test_mixed_precision_activations_under_autocast(config_for, model_type):
    # accelerate's bf16 without DeepSpeed: bf16 weights, float32 LoRA factors, matmuls autocast to bf16.
    config = config_for(model_type, "model.experts_implementation=grouped_mm", "model.torch_dtype=bfloat16",
                        "training.bf16=true", "moe.freeze_router=false")
    planned = build_planned_model(config)
    plan = plan_activations(planned.model, SEQ, num_experts=4, masked_sdpa=True,
                            autocast_dtype=torch.bfloat16).at(BATCH, False)
    model = build_model(config, seed=0)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        real = saved_in_real_forward(model, real_batch(packed=False), checkpointing=False)
    assert plan == pytest.approx(real, rel=0.10), (plan, real)
