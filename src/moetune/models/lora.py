"""What trains: LoRA on attention, frozen or trainable experts and routers, all decided from config.

Pretrained MoE (Mixtral and the like): LoRA on attention only, every expert parameter frozen,
the router frozen unless ``moe.freeze_router`` is false, in which case PEFT's ``modules_to_save``
trains a copy of it and saves it in the adapter (plain ``requires_grad`` would train it but leave it
out of the adapter file, so a reloaded adapter would route differently).

Upcycled MPT (``MptMoeForCausalLM``): the experts start identical, so they must train for the MoE
to become more than the dense model (``moe.expert_training``: full | lora | frozen); a router
created by upcycling always trains. See docs/upcycling.md.
"""

from __future__ import annotations

import logging

from torch import nn
from transformers import PreTrainedModel

from moetune.errors import UserError
from moetune.models.layout import (
    EXPERTS_NAME,
    find_moe_blocks,
    freeze_experts,
    is_expert_parameter,
    linear_module_names,
    resolve_target_modules,
    router_module_names,
    set_router_trainable,
)
from moetune.models.mpt_moe import MptMoeForCausalLM

logger = logging.getLogger(__name__)


def router_trains(config, upcycled_now: bool) -> bool:
    """Whether the router trains: always for a router just created by upcycling, else ``not moe.freeze_router``."""
    if upcycled_now:
        if config.moe.freeze_router:
            logger.info("moe.freeze_router ignored: the router was just created by upcycling and must learn to route")
        return True
    return not config.moe.freeze_router


def apply_training_plan(model: nn.Module, config, upcycled_now: bool = False) -> nn.Module:
    """Freeze / wrap ``model`` as ``config.lora`` and ``config.moe`` say; returns the model to train
    (a PeftModel when lora.enabled). Logs the trainable-parameter line."""
    blocks = find_moe_blocks(model)
    is_upcycled = isinstance(model, MptMoeForCausalLM)
    train_router = bool(blocks) and router_trains(config, upcycled_now)
    expert_mode = config.moe.expert_training if is_upcycled else "frozen"
    if expert_mode == "lora" and not config.lora.enabled:
        raise UserError("moe.expert_training is 'lora' but lora.enabled is false; enable LoRA or choose "
                        "moe.expert_training: full or frozen.")
    if config.lora.enabled:
        model = _wrap_with_lora(model, config, train_router, expert_mode)
    else:
        model.requires_grad_(True)
        if expert_mode == "frozen":
            freeze_experts(model)
        set_router_trainable(model, train_router)
    _check_experts(model, expert_mode)
    log_trainable_parameters(model)
    return model


def _wrap_with_lora(model: nn.Module, config, train_router: bool, expert_mode: str) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = config.lora
    targets = [name for name in resolve_target_modules(model, lora.target_modules, lora.exclude_modules)
               if not is_expert_parameter(name + ".weight") or expert_mode == "lora"]
    if expert_mode == "lora":
        expert_linears = [name for name in linear_module_names(model) if is_expert_parameter(name + ".weight")]
        targets = sorted(set(targets) | {n for n in expert_linears
                                          if not any(n == ex or n.endswith(f".{ex}") for ex in lora.exclude_modules)})
    modules_to_save = list(lora.modules_to_save) + (router_module_names(model) if train_router else [])
    if expert_mode == "full":
        # PEFT cannot wrap a ModuleList, so each expert is saved as its own module. The wrapper keeps
        # the frozen original beside the trained copy: full expert training costs one extra copy of the experts.
        num_experts = max(len(getattr(block.module, EXPERTS_NAME)) for block in find_moe_blocks(model))
        modules_to_save += [f"{EXPERTS_NAME}.{index}" for index in range(num_experts)]
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        bias=lora.bias,
        target_modules=targets,
        modules_to_save=modules_to_save or None,
        # A custom nn.Module (no generation API) gets a plain PeftModel.
        task_type="CAUSAL_LM" if isinstance(model, PreTrainedModel) else None,
    )
    return get_peft_model(model, peft_config)


def _check_experts(model: nn.Module, expert_mode: str) -> None:
    # A guard, not a formality: PEFT rules (suffix matching of modules_to_save) could make an
    # expert trainable by accident, which on Mixtral-8x7B means ~45B trainable parameters.
    trainable_experts = [name for name, p in model.named_parameters() if p.requires_grad and is_expert_parameter(name)
                         and "lora_" not in name]
    if expert_mode != "full" and trainable_experts:
        raise RuntimeError(f"expert parameters are trainable although experts should be frozen: {trainable_experts[:3]}")


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
