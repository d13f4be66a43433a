"""Expert parallelism for upcycled MPT through DeepSpeed MoE (``moe.backend: deepspeed``), and the
reader for the older ``deepspeed_moe_config.json`` whose ``"moe"`` block carried these settings.

The native :class:`~moetune.models.mpt_moe.MoeFeedForward` stays the default: it needs no extra
package and saves to the ``mpt_moe`` checkpoint format. The DeepSpeed block splits the experts
over ``moe.expert_parallel_size`` ranks; its weights are saved under DeepSpeed's module names.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moetune.errors import UserError
from moetune.models.mpt_moe import MoeFeedForward

# Old "moe" block key -> MoeConfig field. Keys in LEGACY_REJECTED have no moetune equivalent.
LEGACY_KEYS = {
    "num_experts": "num_experts",
    "top_k": "top_k",
    "k": "top_k",
    "ep_size": "expert_parallel_size",
    "expert_parallel_size": "expert_parallel_size",
    "capacity_factor": "capacity_factor",
    "aux_loss_coef": "auxiliary_loss_weight",
    "moe_loss_coeff": "auxiliary_loss_weight",
    "router_aux_loss_coef": "auxiliary_loss_weight",
    "z_loss_coef": "router_z_loss_weight",
    "router_z_loss_coef": "router_z_loss_weight",
    "router_jitter": "router_jitter",
    "router_jitter_noise": "router_jitter",
    "upcycle_every": "upcycle_every",
}
LEGACY_REJECTED = {
    "eval_capacity_factor": "moetune applies moe.capacity_factor in training only; evaluation never drops tokens",
    "min_capacity": "moetune's capacity is ceil(capacity_factor * tokens * top_k / num_experts), at least 1",
    "noisy_gate_policy": "use moe.router_jitter (a number) for Switch-style jitter",
    "use_residual": "Residual MoE is not supported",
    "drop_tokens": "tokens are dropped exactly when moe.capacity_factor is set",
    "use_rts": "random token selection is not supported",
}


def require_deepspeed() -> None:
    """Raise a UserError saying how to install DeepSpeed when it is missing."""
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError("moe.backend: deepspeed needs the deepspeed package, which is not installed. Install it with "
                        "`pip install moetune[deepspeed]`, or use moe.backend: native.")


class DeepSpeedMoeFeedForward(nn.Module):
    """A DeepSpeed ``MoE`` layer behind MPT's FFN contract (``forward(hidden_states, residual)``).

    DeepSpeed computes its router logits inside its gate and does not return them, so they are
    recomputed here from the same weight (one small matmul) to feed moetune's losses and
    expert-usage counts; gradients reach the gate weight through them.
    """

    def __init__(self, block: MoeFeedForward, moe, ep_rank: int = 0):
        super().__init__()
        from deepspeed.moe.layer import MoE

        capacity = moe.capacity_factor
        self.moe = MoE(
            hidden_size=block.router.in_features,
            expert=block.experts[0],
            num_experts=moe.num_experts,
            ep_size=moe.expert_parallel_size,
            k=moe.top_k,
            capacity_factor=capacity or 1.0,
            eval_capacity_factor=capacity or 1.0,
            noisy_gate_policy="Jitter" if moe.router_jitter > 0 else None,
            drop_tokens=capacity is not None,
            use_rts=False,
        )
        self.hidden_dropout = block.hidden_dropout
        self.router_logits_sink: list[torch.Tensor] | None = None
        with torch.no_grad():
            self.moe.deepspeed_moe.gate.wg.weight.copy_(block.router.weight)
            local = self.moe.deepspeed_moe.experts.deepspeed_experts
            for offset, expert in enumerate(local):
                expert.load_state_dict(block.experts[ep_rank * len(local) + offset].state_dict())

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if self.router_logits_sink is not None:
            weight = self.moe.deepspeed_moe.gate.wg.weight
            self.router_logits_sink.append(F.linear(hidden_states.reshape(-1, hidden_states.shape[-1]).float(), weight.float()))
        output, _, _ = self.moe(hidden_states)
        return F.dropout(output, p=self.hidden_dropout, training=self.training) + residual


def convert_to_deepspeed_moe(model: nn.Module, moe) -> nn.Module:
    """Replace every native MoE block of an upcycled model by a DeepSpeed one (weights carried over)."""
    require_deepspeed()
    if moe.num_experts % moe.expert_parallel_size:
        raise UserError(f"moe.num_experts ({moe.num_experts}) must be divisible by moe.expert_parallel_size "
                        f"({moe.expert_parallel_size}).")
    rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
    # DeepSpeed's default expert-parallel groups are runs of consecutive ranks.
    ep_rank = rank % moe.expert_parallel_size
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, MoeFeedForward):
                setattr(module, name, DeepSpeedMoeFeedForward(child, moe, ep_rank))
                replaced += 1
    if not replaced:
        raise UserError("moe.backend: deepspeed found no MoE block to replace; it applies to upcycled MPT models "
                        "(moe.upcycle: true or an mpt_moe checkpoint).")
    return model


def read_legacy_deepspeed_moe(path: str | Path) -> dict[str, Any]:
    """The ``"moe"`` block of an older deepspeed_moe_config.json as MoeConfig field values.

    Returns e.g. ``{"num_experts": 8, "top_k": 2, "expert_parallel_size": 4}`` (empty when the file
    has no ``"moe"`` block). A key with no moetune equivalent is a UserError that says where the
    setting belongs, never silently dropped.
    """
    file = Path(path)
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise UserError(f"{file}: no such DeepSpeed config file.") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{file} is not valid JSON (line {err.lineno}: {err.msg}).") from None
    block = data.get("moe") if isinstance(data, dict) else None
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise UserError(f"{file}: \"moe\" must be an object of MoE settings, got {type(block).__name__}.")
    settings: dict[str, Any] = {}
    for key, value in block.items():
        if key in ("enabled", "type", "moe"):
            continue
        if key in LEGACY_REJECTED:
            raise UserError(f"{file}: \"moe\".\"{key}\" is not supported ({LEGACY_REJECTED[key]}). MoE settings now "
                            "live in the moe section of config.yaml; remove the \"moe\" block from the DeepSpeed file.")
        if key not in LEGACY_KEYS:
            raise UserError(f"{file}: \"moe\".\"{key}\" is not a known MoE setting. MoE settings now live in the moe "
                            f"section of config.yaml (moe.num_experts, moe.top_k, moe.expert_parallel_size, ...); "
                            "move it there and remove the \"moe\" block from the DeepSpeed file.")
        field = LEGACY_KEYS[key]
        if field in settings and settings[field] != value:
            raise UserError(f"{file}: the \"moe\" block sets moe.{field} twice with different values "
                            f"({settings[field]!r} and {value!r} from \"{key}\").")
        settings[field] = value
    return settings


def legacy_moe_overrides(path: str | Path) -> list[str]:
    """:func:`read_legacy_deepspeed_moe` as ``moe.key=value`` override strings for ``load_config``."""
    return [f"moe.{key}={json.dumps(value)}" for key, value in read_legacy_deepspeed_moe(path).items()]
