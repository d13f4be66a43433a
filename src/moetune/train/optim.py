"""Optimizer and learning-rate schedule from the `training` section (HF TrainingArguments semantics)."""

from __future__ import annotations

import importlib.util
import math
import warnings

import torch
from transformers.optimization import Adafactor, get_scheduler

from moetune.config import TrainingConfig
from moetune.errors import UserError


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split so that biases and norm weights never get weight decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_norm_or_bias = param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()
        (no_decay if is_norm_or_bias else decay).append(param)
    if not decay and not no_decay:
        raise UserError("No parameter is trainable: check lora.target_modules (they must name modules of the "
                        "model) and moe.freeze_router / moe.expert_training.")
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def split_expert_parallel_groups(groups: list[dict], model: torch.nn.Module) -> list[dict]:
    """Move the expert parameters of ``model``'s DeepSpeed MoE blocks (``moe.expert_parallel.backend: deepspeed``) into
    their own groups.

    ZeRO requires them there (groups marked ``moe``, one per expert-parallel group name): it reduces
    their gradients over the expert-data-parallel group only. Each new group keeps the weight decay
    of the group it came from; groups left empty are dropped. The groups of a model without such
    blocks pass through unchanged, and DeepSpeed is not imported for it.
    """
    from moetune.models.families.mpt.deepspeed_moe import DeepSpeedMoeFeedForward  # imports DeepSpeed only to build one

    if not any(isinstance(module, DeepSpeedMoeFeedForward) for module in model.modules()):
        return groups
    from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

    if not any(is_moe_param(p) for g in groups for p in g["params"]):
        return groups
    return [g for g in split_params_into_different_moe_groups_for_optimizer(groups) if g["params"]]


def build_optimizer(model: torch.nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``training.optim`` over the model's trainable parameters."""
    groups = split_expert_parallel_groups(decay_groups(model, cfg.weight_decay), model)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.optim in ("adamw_torch", "adamw_torch_fused"):
        on_gpu = all(p.is_cuda for g in groups for p in g["params"])
        # The fused kernel is the fast path on GPU; on CPU the foreach path is as fast and always available.
        fused = cfg.optim == "adamw_torch_fused" and on_gpu
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas, eps=cfg.adam_epsilon, fused=fused or None)
    if cfg.optim == "adafactor":
        return Adafactor(groups, lr=cfg.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False)
    if cfg.optim == "sgd":
        return torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=cfg.adam_beta1)
    if cfg.optim == "adamw_8bit":
        require_optimizer_package(cfg)
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=cfg.learning_rate, betas=betas, eps=cfg.adam_epsilon)
    raise AssertionError(f"unhandled optimizer {cfg.optim}")  # the config's Literal makes this unreachable


def require_optimizer_package(cfg: TrainingConfig) -> None:
    """The package ``training.optim`` needs beyond torch (bitsandbytes for adamw_8bit), installed."""
    if cfg.optim == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("training.optim: adamw_8bit needs bitsandbytes: pip install 'moetune[quant]'.")


def total_optimizer_steps(t: TrainingConfig, batches_per_epoch: int) -> int:
    """Optimizer steps of the run: max_steps, or epochs x ceil(batches / accumulation)."""
    if t.max_steps > 0:
        return t.max_steps
    return max(1, math.ceil(t.num_train_epochs * math.ceil(batches_per_epoch / t.gradient_accumulation_steps)))


def warmup_steps(cfg: TrainingConfig, total_steps: int) -> int:
    """Warmup in optimizer steps: warmup_steps when set, else warmup_ratio of all steps."""
    return cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig, total_steps: int):
    """transformers' schedule for ``lr_scheduler_type``; cosine decays to ``min_learning_rate``."""
    warmup = warmup_steps(cfg, total_steps)
    if cfg.lr_scheduler_type == "cosine":
        return get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                             scheduler_specific_kwargs={"min_lr": cfg.min_learning_rate})
    name = {"linear": "linear", "constant": "constant_with_warmup",
            "cosine_with_restarts": "cosine_with_restarts"}[cfg.lr_scheduler_type]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def schedule_summary(cfg: TrainingConfig, total_steps: int) -> dict:
    """What defines the learning-rate schedule; a checkpoint records it, so a resume can tell when it changed."""
    return {"learning_rate": cfg.learning_rate, "lr_scheduler_type": cfg.lr_scheduler_type,
            "warmup_steps": warmup_steps(cfg, total_steps), "total_steps": total_steps,
            "min_learning_rate": cfg.min_learning_rate}


def describe_schedule(summary: dict) -> str:
    parts = [f"learning_rate {summary['learning_rate']:g}"]
    if "lr_scheduler_type" in summary:
        parts.append(f"{summary['lr_scheduler_type']}, {summary['warmup_steps']} warmup steps, "
                     f"{summary['total_steps']} steps, min_learning_rate {summary['min_learning_rate']:g}")
    return ", ".join(parts)


def schedule_differs(saved: dict, current: dict) -> bool:
    """True when a key both summaries hold differs (older checkpoints record only the learning rate)."""
    return any(not math.isclose(saved[k], current[k], rel_tol=1e-9) if isinstance(current[k], float) else saved[k] != current[k]
               for k in current if k in saved)


def restart_schedule(scheduler, cfg: TrainingConfig) -> int:
    """Switch a resumed scheduler to the config's peak learning rate, at the step its schedule had reached.

    Only the peak rate comes from the checkpoint (with the step): the schedule's shape (type, warmup,
    length) was built from the config. The optimizer's moments are left as they are. Returns the step.
    """
    inner = getattr(scheduler, "scheduler", scheduler)  # Accelerate wraps the torch scheduler
    inner.base_lrs = [cfg.learning_rate] * len(inner.base_lrs)
    for group in inner.optimizer.param_groups:
        group["initial_lr"] = cfg.learning_rate
    # Re-take the step the schedule is at, so every group's lr (and get_last_lr) is the new schedule's.
    inner.last_epoch -= 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": no update is involved
        inner.step()
    return inner.last_epoch


def checkpoint_peak_lr(scheduler) -> float:
    """The peak learning rate a loaded scheduler runs with (the checkpoint's, after a resume)."""
    return getattr(scheduler, "scheduler", scheduler).base_lrs[0]
