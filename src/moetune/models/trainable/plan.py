"""What trains: LoRA on attention, frozen or trainable experts, shared experts and routers, all
decided from config and the model's family (:mod:`moetune.models.families`).

Pretrained MoE (every family but upcycled MPT), by default: LoRA on the family's attention
projections only, every routed and shared expert frozen, the router frozen unless
``moe.freeze_router`` is false, in which case PEFT's ``modules_to_save`` trains a copy of it and
saves it in the adapter (plain ``requires_grad`` would train it but leave it out of the adapter file,
so a reloaded adapter would route differently). ``moe.expert_training`` (lora | full) trains the
routed experts as well, ``moe.shared_experts.train`` the shared experts
(``moe.shared_experts.method``: full | lora); what that adds to the PEFT config is decided in
:mod:`moetune.models.trainable.expert_lora`. ``moe.router_bias_update_rate`` saves the router (with its
correction bias) in the adapter even when the router's weight stays frozen.

Upcycled MPT (the family reports ``experts_train_by_default``): the experts start identical, so they must
train for the MoE to become more than the dense model (``moe.expert_training`` defaults to full); a
router created by upcycling (``router_is_new``) always trains. See docs/upcycling.md.
"""

from __future__ import annotations

import logging
import warnings

from torch import nn
from transformers import PreTrainedModel

from moetune.errors import ConfigError
from moetune.models.families._spec import Traits
from moetune.models.layout import (
    MoeBlockInfo,
    find_moe_blocks,
    freeze_block_tensor,
    freeze_experts,
    innermost_model,
    is_expert_parameter,
    is_shared_expert_parameter,
    resolve_target_modules,
    set_router_trainable,
    shared_expert_paths,
)
from moetune.models.trainable.counts import format_trainable_parts, log_trainable_parameters, trainable_parts
from moetune.models.trainable.expert_lora import (
    no_expert_match_message,
    plan_expert_adapters,
)

logger = logging.getLogger(__name__)


def router_trains(config, router_is_new: bool) -> bool:
    """Whether the router trains: always for a router just created by upcycling, else ``not moe.freeze_router``."""
    if router_is_new:
        if config.moe.freeze_router:
            logger.info("moe.freeze_router ignored: the router was just created by upcycling and must learn to route")
        return True
    return not config.moe.freeze_router


def apply_training_plan(model: nn.Module, config, traits: Traits | None = None, family=None) -> nn.Module:
    """Freeze / wrap ``model`` as ``config.lora`` and ``config.moe`` say; returns the model to train
    (a PeftModel when lora.enabled). ``traits`` come from the family's build; ``family`` is the
    model's own unless given. Logs the trainable-parameter line."""
    from moetune.models.families import family_of

    traits = traits or Traits()
    family = family or family_of(model)
    if config.moe.expert_training == "esft":
        from moetune.models.trainable.esft import apply_esft_plan

        return apply_esft_plan(model, config, family)
    shared = family.shared_experts
    blocks = find_moe_blocks(model, family.router_name)
    train_router = bool(blocks) and router_trains(config, traits.router_is_new)
    save_router = bool(blocks) and (train_router or config.moe.router_bias_update_rate > 0)
    expert_mode = config.moe.expert_training or ("full" if traits.experts_train_by_default else "frozen")
    train_shared = config.moe.shared_experts.train
    if train_shared:
        check_shared_experts(model, blocks, family)
    if config.lora.enabled:
        model = _wrap_with_lora(model, config, family, save_router, expert_mode, train_shared)
        if save_router and not train_router:
            set_router_trainable(model, False, family.router_name)  # saved for its bias only
    else:
        model.requires_grad_(True)
        if expert_mode == "frozen":
            freeze_experts(model, () if train_shared else shared)
        elif not train_shared:
            freeze_shared_experts(model, shared)
        set_router_trainable(model, train_router, family.router_name)
    bias = family.router_of(getattr(innermost_model(model), "config", None)).correction_bias
    if bias is not None:
        freeze_block_tensor(model, family.router_name, bias)
    _check_experts(model, expert_mode, () if train_shared else shared, blocks, family)
    log_trainable_parameters(model)
    logger.info(format_trainable_parts(trainable_parts(model, find_moe_blocks(model, family.router_name), family)))
    return model


def check_shared_experts(model: nn.Module, blocks: list[MoeBlockInfo], family) -> None:
    """``moe.shared_experts.train`` needs a model whose MoE blocks hold shared experts (the family names them):
    on any other it would train nothing it names."""
    if shared_expert_paths(model, blocks, family.shared_experts):
        return
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    what = f"this {model_type!r} model" if model_type else "this model"
    what += f" ({family.name} family)"
    if blocks:
        children = ", ".join(name for name, _ in blocks[0].module.named_children())
        has = f"its MoE blocks ({blocks[0].path}, one of {len(blocks)}) hold {children}"
    else:
        has = "it has no MoE block"
    raise ConfigError("moe.shared_experts.train", f"moe.shared_experts.train is true, but {what} has no shared "
                      f"experts: {has}. Set moe.shared_experts.train: false.")


def freeze_shared_experts(model: nn.Module, shared: tuple[str, ...]) -> None:
    """Freeze only the shared experts (the routed ones train)."""
    for name, param in model.named_parameters():
        if is_shared_expert_parameter(name, shared):
            param.requires_grad_(False)


def _wrap_with_lora(model: nn.Module, config, family, save_router: bool, expert_mode: str,
                    train_shared: bool) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = config.lora
    shared = family.shared_experts
    blocks = find_moe_blocks(model, family.router_name)
    targets = [name for name in resolve_target_modules(model, lora.target_modules, family.attention, lora.exclude_modules)
               if not is_expert_parameter(name + ".weight") and not is_shared_expert_parameter(name + ".weight", shared)]
    experts = plan_expert_adapters(model, config, family, blocks, expert_mode, train_shared)
    # Full paths: PEFT matches modules_to_save as name suffixes, and "gate" would also take Qwen2-MoE's
    # shared_expert_gate.
    routers = [block.router_path for block in blocks] if save_router else []
    modules_to_save = list(lora.modules_to_save) + routers + experts.modules_to_save
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        bias=lora.bias,
        target_modules=sorted(set(targets) | set(experts.target_modules)),
        target_parameters=experts.target_parameters or None,
        rank_pattern=experts.rank_pattern,
        alpha_pattern=experts.alpha_pattern,
        modules_to_save=modules_to_save or None,
        # A custom nn.Module (no generation API) gets a plain PeftModel.
        task_type="CAUSAL_LM" if isinstance(model, PreTrainedModel) else None,
    )
    with warnings.catch_warnings():
        # PEFT checks rank_pattern / alpha_pattern against target modules only and calls the expert
        # parameters' keys unmatched; they do set those parameters' rank and alpha.
        warnings.filterwarnings("ignore", message=r"The following (rank|alpha)_pattern keys did not match")
        return get_peft_model(model, peft_config)


def _check_experts(model: nn.Module, expert_mode: str, frozen_shared: tuple[str, ...], blocks, family) -> None:
    # A guard, not a formality: PEFT rules (suffix matching of modules_to_save) could make an
    # expert trainable by accident, which on Mixtral-8x7B means ~45B trainable parameters.
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    routed = [name for name in trainable if is_expert_parameter(name) and ("lora_" not in name or expert_mode != "lora")]
    shared = [name for name in trainable if is_shared_expert_parameter(name, frozen_shared)]
    if expert_mode != "frozen" and not any(is_expert_parameter(name) for name in trainable):
        # Never a run that trains nothing it was asked to train.
        raise ConfigError("moe.expert_training", no_expert_match_message(blocks, family, ()))
    if expert_mode == "frozen" and routed:
        raise RuntimeError(f"expert parameters are trainable although experts should be frozen: {routed[:3]}")
    if shared:
        raise RuntimeError(f"shared expert parameters are trainable although moe.shared_experts.train is false: "
                           f"{shared[:3]}")
