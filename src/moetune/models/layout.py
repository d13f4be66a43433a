"""Find the parts of an MoE model by probing its module tree, with the names its family gives
(:class:`moetune.models.families._spec.FamilySpec`), not by trusting a version string.

An MoE block is any module with an ``experts`` child and a router child of the family's
``router_name`` (``gate`` in most families, ``router`` in gpt-oss, Granite, Llama-4); its routed
experts are fused 3-D parameters (``experts.gate_up_proj``) or one module per expert
(``experts.N.up_proj``, upcycled MPT).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from moetune.errors import ConfigError

EXPERTS_NAME = "experts"


@dataclass(frozen=True)
class MoeBlockInfo:
    """Where one MoE block lives: its dotted path and the names of its router and experts children."""

    path: str
    router_name: str
    module: nn.Module

    @property
    def router_path(self) -> str:
        return f"{self.path}.{self.router_name}"

    @property
    def experts_path(self) -> str:
        return f"{self.path}.{EXPERTS_NAME}"


def find_moe_blocks(model: nn.Module, router_name: str) -> list[MoeBlockInfo]:
    """Every MoE block of ``model`` in forward order (empty for a dense model); ``router_name``: what
    its family calls the router child."""
    blocks = []
    for path, module in model.named_modules():
        children = dict(module.named_children())
        if EXPERTS_NAME in children and router_name in children:
            blocks.append(MoeBlockInfo(path=path, router_name=router_name, module=module))
    return blocks


def count_experts(experts: nn.Module) -> int:
    """How many routed experts a block's ``experts`` child holds: modules of a ModuleList, or dim 0 of its fused
    (E, ...) tensors."""
    if isinstance(experts, nn.ModuleList):
        return len(experts)
    return next(iter(experts.parameters())).shape[0]


def is_expert_parameter(name: str) -> bool:
    """True for a parameter that belongs to a routed expert (fused or per-expert layout)."""
    return f".{EXPERTS_NAME}." in f".{name}"


def shared_expert_paths(model: nn.Module, blocks: list[MoeBlockInfo], shared_names: tuple[str, ...]) -> list[str]:
    """Full paths of the shared experts named ``shared_names``: children of each MoE block, or of the
    layer that holds the block (Granite's ``shared_mlp`` sits beside ``block_sparse_moe``)."""
    paths = []
    for block in blocks:
        parent_path = block.path.rsplit(".", 1)[0] if "." in block.path else ""
        parent = model.get_submodule(parent_path)
        for name in shared_names:
            if hasattr(block.module, name):
                paths.append(f"{block.path}.{name}")
            elif hasattr(parent, name) and f"{parent_path}.{name}" not in paths:
                paths.append(f"{parent_path}.{name}")
    return paths


def is_shared_expert_parameter(name: str, shared_names: tuple[str, ...]) -> bool:
    """True for a parameter under one of the shared experts ``shared_names``."""
    return any(f".{shared}." in f".{name}" for shared in shared_names)


def freeze_experts(model: nn.Module, shared_names: tuple[str, ...] = ()) -> int:
    """Set requires_grad=False on every routed expert parameter, and on the shared experts named
    ``shared_names``; returns how many tensors were frozen."""
    frozen = 0
    for name, param in model.named_parameters():
        if is_expert_parameter(name) or is_shared_expert_parameter(name, shared_names):
            param.requires_grad_(False)
            frozen += 1
    return frozen


def set_router_trainable(model: nn.Module, trainable: bool, router_name: str) -> None:
    """Turn the gradient of every router weight on or off."""
    for block in find_moe_blocks(model, router_name):
        for param in getattr(block.module, block.router_name).parameters():
            param.requires_grad_(trainable)


def freeze_block_tensor(model: nn.Module, router_name: str, path: str) -> None:
    """Keep the parameter at ``path`` under every MoE block frozen (ERNIE's correction bias is a
    Parameter that only aux-loss-free balancing moves, never a gradient), in a PEFT-wrapped router's
    original and trained copies too (``gate.modules_to_save.default.<rest>``)."""
    head, _, rest = path.partition(".")
    for block in find_moe_blocks(model, router_name):
        for name, param in block.module.named_parameters():
            if name == path or (name.startswith(f"{head}.") and name.endswith(f".{rest}")):
                param.requires_grad_(False)


def linear_module_names(model: nn.Module) -> list[str]:
    """Dotted names of every nn.Linear (and bitsandbytes Linear, which subclasses it)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def resolve_target_modules(model: nn.Module, targets: tuple[str, ...], aliases: Mapping[str, tuple[str, ...]],
                           exclude: tuple[str, ...] = (), key: str = "lora.target_modules") -> list[str]:
    """Full dotted names of the Linears that get LoRA: each of ``targets`` stands for the Linears its
    family's ``aliases`` map it to (DeepSeek's "q_proj" is q_a_proj and q_b_proj, a hybrid's takes the
    linear-attention projections too), or for itself; names ending in an ``exclude`` entry are left out
    (PEFT's rule: ``o_proj`` or ``layers.0.self_attn.q_proj``).

    Matching is done here rather than left to PEFT so an unknown name is an error, not an adapter
    that silently trains nothing. Expert Linears only match when a target names them explicitly.
    """
    linears = linear_module_names(model)
    leaf_names = {name.rsplit(".", 1)[-1] for name in linears}
    wanted: set[str] = set()
    for target in targets:
        found = [name for name in aliases.get(target, (target,)) if name in leaf_names]
        if not found:
            raise ConfigError(key, f"{key} names {target!r}, but this model has no Linear module of that name; its "
                              f"Linear modules are called {sorted(leaf_names)}.")
        wanted.update(found)
    chosen = []
    for name in linears:
        parts = name.split(".")
        if parts[-1] not in wanted or is_excluded(name, exclude):
            continue
        chosen.append(name)
    if not chosen:
        raise ConfigError(key, f"{key} {list(targets)} with lora.exclude_modules {list(exclude)} leaves no module to "
                          "adapt.")
    return chosen


def is_excluded(name: str, exclude: tuple[str, ...]) -> bool:
    """Whether ``lora.exclude_modules`` leaves the module or parameter ``name`` out: an entry equal to it or
    ending it at a dot (PEFT's rule: ``o_proj`` or ``layers.0.self_attn.q_proj``)."""
    return any(name == ex or name.endswith(f".{ex}") for ex in exclude)


def innermost_model(model: nn.Module) -> nn.Module:
    """The model inside DDP/DeepSpeed/accelerate (``.module``) and PEFT (``get_base_model()``)
    wrappers, whose own forward only passes keyword arguments on (and a DeepSpeedEngine's own
    ``.config`` is DeepSpeed's)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model
