"""Counting what trains: trainable and total parameters (ZeRO-3 shards counted whole), split by part of
the MoE (attention, router, experts, shared experts, other), and the line a run logs."""

from __future__ import annotations

import logging

from torch import nn

from moetune.models.layout import MoeBlockInfo, is_expert_parameter, is_shared_expert_parameter

logger = logging.getLogger(__name__)

def trainable_parts(model: nn.Module, blocks: list[MoeBlockInfo], family) -> dict[str, int]:
    """Trainable parameter counts of attention, router, routed experts, shared experts and the rest.
    ``blocks`` are found on ``model`` itself (names as ``model.named_parameters`` gives them). Attention
    is what trains under the family's token mixers (linear attention and SSM layers included) or in the
    Linears its attention targets reach (their LoRA factors)."""
    routers = tuple(f".{block.router_path}." for block in blocks)
    mixers = tuple(f".{mixer}." for mixer in family.token_mixers)
    attention_linears = family.attention_linears()
    parts = dict.fromkeys(("attention", "router", "experts", "shared experts", "other"), 0)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        count = getattr(param, "ds_numel", param.numel())
        dotted = f".{name}"
        if is_expert_parameter(name):
            part = "experts"
        elif is_shared_expert_parameter(name, family.shared_experts):
            part = "shared experts"
        elif any(router in dotted for router in routers):
            part = "router"
        elif any(mixer in dotted for mixer in mixers) or _owning_linear(name) in attention_linears:
            part = "attention"
        else:
            part = "other"
        parts[part] += count
    return parts


def _owning_linear(name: str) -> str:
    """The Linear a parameter belongs to: ``in_proj`` for ``...in_proj.lora_A.default.weight``."""
    parts = name.split(".")
    for marker in ("lora_A", "lora_B", "base_layer"):
        if marker in parts:
            return parts[parts.index(marker) - 1]
    return parts[-2] if len(parts) > 1 else ""


def format_trainable_parts(parts: dict[str, int]) -> str:
    """``trainable by part: attention 1,024 | router 0 | experts 2,048 | shared experts 0 | other 0``."""
    return "trainable by part: " + " | ".join(f"{part} {count:,}" for part, count in parts.items())


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; packed 4-bit tensors count the weights they hold, not bytes."""
    trainable = total = 0
    for param in model.parameters():
        count = getattr(param, "ds_numel", param.numel())  # a ZeRO-3 shard reports its full size as ds_numel
        if type(param).__name__ == "Params4bit":
            count *= 2  # two 4-bit weights per stored uint8
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def log_trainable_parameters(model: nn.Module) -> str:
    """Log and return ``trainable params: X || all params: Y || trainable%: Z``."""
    trainable, total = count_parameters(model)
    line = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"
    logger.info(line)
    return line
