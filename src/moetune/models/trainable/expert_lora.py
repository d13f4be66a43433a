"""What the routed and shared experts add to the PEFT config: LoRA on the experts, experts trained in
full, LoRA on the shared experts; and the trainable-parameter count split by part of the MoE.

Fused experts (every Hugging Face family): a block's ``experts`` module holds 3-D parameters whose
dim 0 is the expert, e.g. ``gate_up_proj`` (E, 2I, H). PEFT's ``target_parameters`` puts a LoRA on
each (``lora.ParamWrapper``) with rank ``r`` *per expert*: ``lora_A`` is (r·E, in) and ``lora_B``
(out, r·E); expert e's factors are ``lora_A[e·r:(e+1)·r]`` and ``lora_B[:, e::E]`` (PEFT reshapes A to
(E, r, in) and B to (out, r, E)). A transposed layout (gpt-oss, (E, in, out)) is detected by PEFT
from the experts module's ``is_transposed``. Biases of fused experts are not adapted.

Per-expert layout (upcycled MPT, ``experts.N.up_proj``): each expert's Linears are ordinary LoRA
target modules. Shared experts with ``moe.shared_experts.method: lora`` get LoRA on their Linears'
weights, also given as ``target_parameters`` (2-D, one "expert"; see :func:`plan_expert_adapters`).
LoRA on a parameter cannot have dropout, so these need ``lora.lora_dropout: 0``.

Every name handed to PEFT is a full dotted path: PEFT matches names as suffixes, and
``mlp.shared_experts.down_proj`` would otherwise also take the routed experts' ``mlp.experts.down_proj``.
The expert rank and alpha differ from the attention's through PEFT's ``rank_pattern`` /
``alpha_pattern``, keyed by those full names.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from torch import nn

from moetune.errors import ConfigError
from moetune.models.layout import (
    EXPERTS_NAME,
    MoeBlockInfo,
    is_excluded,
    is_expert_parameter,
    linear_module_names,
    shared_expert_paths,
)

logger = logging.getLogger(__name__)

@dataclass
class ExpertAdapters:
    """The experts' share of a LoraConfig: extra Linears, fused parameters, per-name ranks, full modules."""

    target_modules: list[str] = field(default_factory=list)
    target_parameters: list[str] = field(default_factory=list)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)


def plan_expert_adapters(model: nn.Module, config, family, blocks: list[MoeBlockInfo], expert_mode: str,
                         train_shared: bool) -> ExpertAdapters:
    """What LoRA / full training of the routed experts (``expert_mode``) and, with ``train_shared``,
    of the shared experts adds to the PEFT config of ``model`` (not yet wrapped)."""
    plan = ExpertAdapters()
    exclude = config.lora.exclude_modules
    if expert_mode == "lora":
        rank = config.moe.expert_lora.r or config.lora.r
        alpha = config.moe.expert_lora.alpha or config.lora.lora_alpha
        fused = [name for name in fused_expert_parameters(blocks, family) if not is_excluded(name, exclude)]
        linears = [name for name in expert_linears(model, family) if not is_excluded(name, exclude)]
        if not fused and not linears:
            raise ConfigError("moe.expert_training", no_expert_match_message(blocks, family, exclude))
        plan.target_parameters = fused
        plan.target_modules = linears
        for name in fused + linears:
            if rank != config.lora.r:
                plan.rank_pattern[re.escape(name)] = rank
            if alpha != config.lora.lora_alpha:
                plan.alpha_pattern[re.escape(name)] = alpha
    elif expert_mode == "full":
        if blocks and isinstance(getattr(blocks[0].module, EXPERTS_NAME), nn.ModuleList):
            # PEFT cannot wrap a ModuleList, so each expert is saved as its own module. The wrapper keeps
            # the frozen original beside the trained copy: full expert training costs one extra copy of the experts.
            num_experts = max(len(getattr(block.module, EXPERTS_NAME)) for block in blocks)
            plan.modules_to_save = [f"{EXPERTS_NAME}.{index}" for index in range(num_experts)]
        else:
            if not fused_expert_parameters(blocks, family):
                raise ConfigError("moe.expert_training", no_expert_match_message(blocks, family, exclude))
            plan.modules_to_save = [block.experts_path for block in blocks]
    if train_shared:
        paths = shared_expert_paths(model, blocks, family.shared_experts)
        if config.moe.shared_experts.method == "lora":
            # As parameters, not modules: on model types PEFT converts from the transformers v4 layout
            # (deepseek_v2/v3, glm4_moe, qwen3_moe, olmoe), a target module ending in down_proj / gate_proj /
            # up_proj is rewritten into a bare "down_proj" target parameter, which takes the routed experts'
            # fused tensor instead of the shared expert's Linear.
            plan.target_parameters += [f"{name}.weight" for name in linear_module_names(model)
                                       if any(name.startswith(f"{path}.") or name == path for path in paths)
                                       and not is_excluded(name, exclude)]
        else:
            # In full, saved with the adapter: as LoRA targets, PEFT would also match DeepSeek's
            # "mlp.shared_experts.down_proj" against the routed experts' fused "mlp.experts.down_proj".
            plan.modules_to_save += paths
    if plan.target_parameters and config.lora.lora_dropout:
        raise ConfigError("lora.lora_dropout", f"LoRA on expert parameters ({plan.target_parameters[0]}, ...) cannot be "
                          f"combined with dropout (PEFT's ParamWrapper refuses it); set lora.lora_dropout: 0 "
                          f"(it is {config.lora.lora_dropout}).")
    return plan


def fused_expert_parameters(blocks: list[MoeBlockInfo], family) -> list[str]:
    """Full names of the fused 3-D expert weights (dim 0 the expert) the family names, in every block."""
    names = []
    for block in blocks:
        experts = getattr(block.module, EXPERTS_NAME)
        names += [f"{block.experts_path}.{name}" for name, param in experts.named_parameters(recurse=False)
                  if name in family.expert_parameters and param.dim() == 3]
    return names


def expert_linears(model: nn.Module, family) -> list[str]:
    """Full names of per-expert Linears (``experts.N.up_proj``) the family names."""
    return [name for name in linear_module_names(model) if is_expert_parameter(name + ".weight")
            and name.rsplit(".", 1)[-1] in family.expert_parameters]


def no_expert_match_message(blocks: list[MoeBlockInfo], family, exclude: tuple[str, ...]) -> str:
    if not blocks:
        return "moe.expert_training asks for expert training, but this model has no MoE block (nothing to train)."
    experts = getattr(blocks[0].module, EXPERTS_NAME)
    found = [f"{name} {tuple(param.shape)}" for name, param in experts.named_parameters()]
    return (f"moe.expert_training asks for expert training, but no expert parameter matched: the "
            f"{family.name} family names {list(family.expert_parameters)}"
            f"{f' and lora.exclude_modules is {list(exclude)}' if exclude else ''}, while this model's experts "
            f"({blocks[0].experts_path}, one of {len(blocks)} MoE blocks) hold {found}.")
