"""The model a run trains, on the meta device: the family's build as it would be, then the real training plan.

Nothing is read but config.json (:func:`moetune.models.load.meta.offline_model_config`); the family's
``shape`` is followed where the build changes the architecture (MPT sparse upcycling), and
:func:`moetune.models.trainable.plan.apply_training_plan` runs unchanged on the meta model, so the
trainable parameters are exactly those a run trains: attention LoRA, expert LoRA, full experts, ESFT
with its experts.json, routers saved with the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedConfig

from moetune.errors import ConfigError
from moetune.models.check import quiet_logs
from moetune.models.families import family_for_model_type, get_family, known_model_types
from moetune.models.families._spec import FamilySpec, Traits
from moetune.models.load.meta import build_on_meta, offline_model_config
from moetune.models.load.quant import is_fused_expert_stack, wants_quantization
from moetune.models.trainable.plan import apply_training_plan
from moetune.plan.params import ParameterCounts, count_base, experts_per_token, with_trainable

# What the meta forward runs: transformers' grouped experts kernel (what it picks on a GPU; its shapes do
# not depend on the routing, unlike the eager loop over the experts that tokens chose) and sdpa, whose
# saved tensors :mod:`moetune.plan.activations` replaces with those of the flash kernels a GPU runs.
META_EXPERTS_KERNEL = "grouped_mm"


@dataclass
class PlannedModel:
    """A run's model on the meta device. ``base``: before the training plan; ``model``: what trains
    (the same modules, a PeftModel around them with LoRA). ``dtype``: the dtype the weights load in."""

    base: nn.Module
    model: nn.Module
    hf_config: PreTrainedConfig
    family: FamilySpec
    traits: Traits
    dtype: torch.dtype
    attn_implementation: str
    counts: ParameterCounts
    quantized: dict[int, int]
    """``id(parameter)`` -> bits, for the Linear weights bitsandbytes stores in 4 or 8 bits (on the meta
    device they keep their full shape; :mod:`moetune.plan.memory` sizes them as bitsandbytes stores them)."""

    @property
    def routed_share(self) -> float:
        """The share of each MoE block's routed experts one token's compute goes through: top_k / num_experts,
        or all of them where the family multiplies every token by every expert (Llama 4)."""
        blocks = self.counts.blocks
        if not blocks or self.family.experts_take_every_token:
            return 1.0
        return blocks[0].top_k / blocks[0].num_experts


def plan_family(model_section, hf_config: PreTrainedConfig | None = None) -> FamilySpec:
    """``model.architecture``'s family, else the family of the config.json's model_type."""
    if model_section.architecture is not None:
        return get_family(model_section.architecture)
    family = family_for_model_type(hf_config.model_type)
    if family is None:
        raise ConfigError("model.architecture", f"model.name {model_section.name!r} is a {hf_config.model_type!r} model, "
                          f"which moetune does not support; it supports {', '.join(known_model_types())} (README, "
                          "Supported model families, lists the MoE types transformers has that moetune leaves out, and "
                          "why).")
    return family


def build_planned_model(config, model_config: str | Path | None = None) -> PlannedModel:
    """The model ``config`` trains, on the meta device, with its training plan applied."""
    section = config.model
    family = get_family(section.architecture) if section.architecture is not None else None
    hf_config = offline_model_config(section, family, model_config)
    family = family or plan_family(section, hf_config)
    dtype = _weights_dtype(section.torch_dtype, hf_config)
    attn = _meta_attention(family)
    base, traits = _build_base(family, config, hf_config, dtype, attn)
    counts = count_base(base, family, experts_per_token(base.config))  # before LoRA and saved copies join it
    quantized = quantize_on_meta(base, section) if wants_quantization(section) else {}
    with torch.device("meta"), quiet_logs("moetune.models.trainable"):
        model = apply_training_plan(base, config, traits, family)
    return PlannedModel(base=base, model=model, hf_config=hf_config, family=family, traits=traits, dtype=dtype,
                        attn_implementation=attn, counts=with_trainable(counts, model, family),
                        quantized=quantized)


def _build_base(family: FamilySpec, config, hf_config, dtype, attn) -> tuple[nn.Module, Traits]:
    # The family's shape is what its build makes of the checkpoint (MPT: the upcycled architecture).
    from moetune.models.load.pretrained import check_not_quantised_twice, pretrained_shape

    check_not_quantised_twice(config.model, family, hf_config)
    hf_config, traits = (family.shape or pretrained_shape)(family, config, hf_config)
    kwargs = {"attn_implementation": attn}
    if family.fused_experts and not family.experts_take_every_token:
        kwargs["experts_implementation"] = META_EXPERTS_KERNEL
    return build_on_meta(hf_config, config.model.trust_remote_code, dtype, **kwargs), traits


def quantize_on_meta(base: nn.Module, model_section) -> dict[int, int]:
    """What loading ``base`` with ``model.load_in_4bit`` / ``load_in_8bit`` does to it, on the meta device:
    the Linears transformers' bitsandbytes integration converts (every ``nn.Linear`` but the output
    embedding and the model's fp32 modules: its own rule, reused), and then PEFT's
    ``prepare_model_for_kbit_training``, which moetune calls and which casts every other 16-bit
    parameter to float32, but for the fused 3-D experts: they are no Linear, stay unquantised, and moetune
    puts them back in the dtype they load in (:func:`moetune.models.load.quant.restore_fused_experts`).
    Returns ``id(weight)`` -> bits of the converted Linears."""
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    bits = 4 if model_section.load_in_4bit else 8
    skip = HfQuantizer.get_modules_to_not_convert(base, None, base._keep_in_fp32_modules)
    quantized = {id(module.weight): bits for name, module in base.named_modules()
                 if type(module) is nn.Linear and should_convert_module(name, skip)}
    for name, param in base.named_parameters():
        if is_fused_expert_stack(name, param):
            continue
        if id(param) not in quantized and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.to(torch.float32)
    return quantized


def _weights_dtype(torch_dtype: str, hf_config) -> torch.dtype:
    """``model.torch_dtype``; ``auto`` is the checkpoint's own dtype, as from_pretrained reads it."""
    if torch_dtype != "auto":
        return getattr(torch, torch_dtype)
    stored = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else torch.float32


def _meta_attention(family: FamilySpec) -> str:
    # A family whose attention has no sdpa kernel (gpt-oss's sinks, MPT's ALiBi) runs eager in training
    # unless flash-attn is there; eager is what the meta forward can run of those.
    return "sdpa" if family.attention_kernels is None or "sdpa" in family.attention_kernels else "eager"
