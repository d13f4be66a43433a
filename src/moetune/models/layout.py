"""Find the parts of an MoE model by probing its module tree, not by trusting a version string.

Three layouts must work with the same code:

* transformers 5.x Mixtral: ``layers.N.mlp`` holds ``gate`` (a router whose parameter is
  ``gate.weight``) and ``experts`` with fused 3-D ``gate_up_proj`` / ``down_proj`` parameters;
* older Mixtral code and checkpoints: ``layers.N.block_sparse_moe`` with ``gate`` (nn.Linear) and
  ``experts.N.w1/w2/w3``;
* upcycled MPT (:mod:`moetune.models.families.mpt.modeling`): ``blocks.N.ffn`` with ``router`` and ``experts.N.up_proj/down_proj``.

An MoE block is any module with an ``experts`` child and a router child (``gate`` or ``router``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moetune.errors import ConfigError

ROUTER_NAMES = ("gate", "router")
EXPERTS_NAME = "experts"

# Attention projections under the names other families use, so the default
# lora.target_modules (q/k/v/o_proj) means "attention" on MPT too, whose QKV is one fused Linear.
ATTENTION_ALIASES = {
    "q_proj": ("Wqkv", "qkv_proj", "c_attn"),
    "k_proj": ("Wqkv", "qkv_proj", "c_attn"),
    "v_proj": ("Wqkv", "qkv_proj", "c_attn"),
    "o_proj": ("out_proj", "dense", "c_proj"),
}


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


def find_moe_blocks(model: nn.Module, router_names: tuple[str, ...] = ROUTER_NAMES) -> list[MoeBlockInfo]:
    """Every MoE block of ``model`` in forward order (empty for a dense model); ``router_names``:
    what the router child may be called (a family's spec names its own)."""
    blocks = []
    for path, module in model.named_modules():
        children = dict(module.named_children())
        if EXPERTS_NAME not in children:
            continue
        router = next((name for name in router_names if name in children), None)
        if router is not None:
            blocks.append(MoeBlockInfo(path=path, router_name=router, module=module))
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


def is_shared_expert_parameter(name: str, shared_names: tuple[str, ...]) -> bool:
    """True for a parameter under one of the MoE block children ``shared_names`` (shared experts)."""
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


def set_router_trainable(model: nn.Module, trainable: bool, router_names: tuple[str, ...] = ROUTER_NAMES) -> None:
    """Turn the gradient of every router weight on or off."""
    for block in find_moe_blocks(model, router_names):
        for param in getattr(block.module, block.router_name).parameters():
            param.requires_grad_(trainable)


def linear_module_names(model: nn.Module) -> list[str]:
    """Dotted names of every nn.Linear (and bitsandbytes Linear, which subclasses it)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def resolve_target_modules(model: nn.Module, targets: tuple[str, ...], exclude: tuple[str, ...] = (),
                           key: str = "lora.target_modules",
                           aliases: dict[str, tuple[str, ...]] | None = None) -> list[str]:
    """Full dotted names of the Linears that get LoRA: ``targets`` matched by last name component
    (falling back to ``aliases``, a family's attention names, default :data:`ATTENTION_ALIASES`),
    minus names ending in an ``exclude`` entry (PEFT's rule: ``o_proj`` or ``layers.0.self_attn.q_proj``).

    Matching is done here rather than left to PEFT so an unknown name is an error, not an adapter
    that silently trains nothing. Expert Linears only match when a target names them explicitly.
    """
    linears = linear_module_names(model)
    leaf_names = {name.rsplit(".", 1)[-1] for name in linears}
    wanted: set[str] = set()
    for target in targets:
        if target in leaf_names:
            wanted.add(target)
            continue
        # Every alias the model has: DeepSeek's "q_proj" is q_a_proj and q_b_proj together.
        found = [a for a in (ATTENTION_ALIASES if aliases is None else aliases).get(target, ()) if a in leaf_names]
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
