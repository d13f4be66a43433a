"""Expert parallelism for upcycled MPT through DeepSpeed MoE (``moe.expert_parallel.backend: deepspeed``).

The native :class:`~moetune.models.families.mpt.modeling.MoeFeedForward` stays the default: it needs no extra
package and saves to the ``mpt_moe`` checkpoint format. The DeepSpeed block splits the experts
over ``moe.expert_parallel.size`` ranks while training; what a run saves is written through
:func:`native_moe_layout`, so it is in the ``mpt_moe`` layout too and loads with ``moe.expert_parallel.backend: native``.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from moetune.errors import ConfigError, UserError
from moetune.models.families.mpt.modeling import MoeFeedForward


def require_deepspeed() -> None:
    """Raise a UserError saying how to install DeepSpeed when it is missing."""
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError("moe.expert_parallel.backend: deepspeed needs the deepspeed package, which is not installed. Install it with "
                        "`pip install moetune[deepspeed]`, or use moe.expert_parallel.backend: native.")


class DeepSpeedMoeFeedForward(nn.Module):
    """A DeepSpeed ``MoE`` layer behind MPT's FFN contract (``forward(hidden_states, residual)``).

    It runs the native block's own router and expert modules (moved, not copied: LoRA layers and
    PEFT ``modules_to_save`` wrappers come along): the router becomes the gate's ``wg``, this rank's
    experts become ``deepspeed_experts``. The emptied native block is kept, unregistered, so
    :func:`native_moe_layout` can put it back. DeepSpeed computes its router logits inside its gate
    and does not return them, so they are recomputed here from the same weight (one small matmul)
    to feed moetune's losses and expert-usage counts.
    """

    def __init__(self, block: MoeFeedForward, moe, ep_rank: int = 0):
        super().__init__()
        from deepspeed.moe.layer import MoE

        upcycling = moe.upcycling
        # Identity as the expert template: DeepSpeed deep-copies it per local expert, and the real
        # experts replace those copies below, so nothing expert-sized is allocated twice.
        self.moe = MoE(
            hidden_size=block.router.weight.shape[1],
            expert=nn.Identity(),
            num_experts=upcycling.num_experts,
            ep_size=moe.expert_parallel.size,
            k=upcycling.top_k,
            capacity_factor=upcycling.capacity_factor or 1.0,
            min_capacity=1,  # the native capacity: max(1, ceil(capacity_factor * tokens * top_k / num_experts))
            noisy_gate_policy="Jitter" if upcycling.router_jitter > 0 else None,
            drop_tokens=upcycling.capacity_factor is not None,
            use_rts=False,
            top2_2nd_expert_sampling=False,  # the native block takes the two most probable experts, never a sample
        )
        layer = self.moe.deepspeed_moe
        layer.gate.wg = block.router
        local = self.moe.num_local_experts
        layer.experts.deepspeed_experts = block.experts[ep_rank * local:(ep_rank + 1) * local]
        # DeepSpeed tells expert parameters by these attributes: ZeRO reduces their gradients over the
        # expert-data-parallel group only, and they need their own optimizer param groups (optim.py).
        for param in layer.experts.deepspeed_experts.parameters():
            param.allreduce = False
            param.group_name = self.moe.expert_group_name
        self.drop_tokens = upcycling.capacity_factor is not None
        self.hidden_dropout = block.hidden_dropout
        self.ep_rank = ep_rank
        self.router_logits_sink: list[torch.Tensor] | None = None
        block.experts = nn.ModuleList()  # frees the other ranks' experts
        object.__setattr__(self, "native", block)  # not a submodule: it is not part of the model meanwhile

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        gate = self.moe.deepspeed_moe.gate
        # Computed whether or not they are recorded: gradient checkpointing recomputes this forward
        # without a sink and needs the same operations as the first pass.
        router_logits = F.linear(hidden_states.reshape(-1, hidden_states.shape[-1]).float(), gate.wg.weight.float())
        if self.router_logits_sink is not None:
            self.router_logits_sink.append(router_logits)
        # Like the native block (and the mpt_moe model it is saved as), evaluation never drops tokens.
        gate.drop_tokens = self.drop_tokens and self.training
        output, _, _ = self.moe(hidden_states)
        return F.dropout(output, p=self.hidden_dropout, training=self.training) + residual

    def to_native(self) -> MoeFeedForward:
        """The native block holding this block's router and every expert (a collective with expert
        parallelism: the other ranks' experts are gathered into copies)."""
        layer = self.moe.deepspeed_moe
        self.native.router = layer.gate.wg
        self.native.experts = nn.ModuleList(_all_experts(list(layer.experts.deepspeed_experts), self.moe, self.ep_rank))
        return self.native.train(self.training)


def _all_experts(local: list[nn.Module], moe, ep_rank: int) -> list[nn.Module]:
    """Every expert in global order (rank-major, as DeepSpeed numbers them): this rank's modules
    themselves, and CPU copies of the other ranks' experts filled by an all_gather over the
    expert-parallel group, one tensor at a time: the device was sized for this rank's experts only."""
    if moe.ep_size == 1:
        return local
    from deepspeed.utils import groups

    group = groups._get_expert_parallel_group(moe.expert_group_name)
    experts = {ep_rank * len(local) + offset: expert for offset, expert in enumerate(local)}
    for offset, expert in enumerate(local):
        copies = {rank: copy.deepcopy(expert).to("cpu") for rank in range(moe.ep_size) if rank != ep_rank}
        targets = {rank: module.state_dict() for rank, module in copies.items()}  # views of the copies' tensors
        for key, tensor in expert.state_dict().items():
            parts = [torch.empty_like(tensor) for _ in range(moe.ep_size)]
            torch.distributed.all_gather(parts, tensor.contiguous(), group=group)
            for rank, state in targets.items():
                state[key].copy_(parts[rank])
        experts.update({rank * len(local) + offset: module for rank, module in copies.items()})
    return [experts[index] for index in range(len(experts))]


def convert_to_deepspeed_moe(model: nn.Module, moe) -> nn.Module:
    """Replace every native MoE block by a DeepSpeed one that runs the same router and this rank's
    experts; call it after the training plan (LoRA, modules_to_save) so PEFT names stay native."""
    check_deepspeed_conversion(model)
    rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
    # DeepSpeed's default expert-parallel groups are runs of consecutive ranks.
    ep_rank = rank % moe.expert_parallel.size
    _swap_blocks(model, MoeFeedForward, lambda block: DeepSpeedMoeFeedForward(block, moe, ep_rank))
    return model


def check_deepspeed_conversion(model: nn.Module) -> None:
    """What :func:`convert_to_deepspeed_moe` needs: the deepspeed package and native MoE blocks in ``model``
    (which may be on the meta device)."""
    require_deepspeed()
    if not any(isinstance(module, MoeFeedForward) for module in model.modules()):
        raise ConfigError("moe.expert_parallel.backend", "moe.expert_parallel.backend: deepspeed found no MoE block to "
                          "replace; it applies to upcycled MPT models (moe.upcycling.enabled: true or an mpt_moe "
                          "checkpoint).")


@contextmanager
def native_moe_layout(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the ``with``, ``model`` has its native MoE blocks back, with every expert, under the
    ``mpt_moe`` names: ``save_pretrained``, ``merge_and_unload`` and adapter loading then read and
    write what ``moe.expert_parallel.backend: native`` and ``AutoModelForCausalLM`` load. The DeepSpeed blocks return
    on exit. With expert parallelism every rank must enter (the experts are gathered). A no-op for a
    model without DeepSpeed blocks.
    """
    swapped = _swap_blocks(model, DeepSpeedMoeFeedForward, lambda block: block.to_native())
    try:
        yield model
    finally:
        for parent, name, block in swapped:
            setattr(parent, name, block)
            block.native.experts = nn.ModuleList()  # drops the gathered copies


def _swap_blocks(model: nn.Module, kind: type, make) -> list[tuple[nn.Module, str, nn.Module]]:
    """Replace every ``kind`` child by ``make(child)``; returns (parent, name, replaced child) triples."""
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, kind):
                setattr(parent, name, make(child))
                swapped.append((parent, name, child))
    return swapped
