"""Routing capture: what every MoE layer's router decided in one forward pass, for every family.

``with capture_routing(model, family) as captured: model(...)`` leaves in ``captured.layers`` one
:class:`LayerRouting` per MoE layer (router logits, the chosen experts and their weights), taken
from the router modules themselves. ``output_router_logits`` is not used: DeepSeek-V3 and GLM-4.5
compute no aux loss from it, and re-deriving the chosen experts from logits would be wrong for
routers that add a correction bias or limit the choice to groups of experts. Expert usage, the
balance losses, the routing report and the collapse warnings all read this one record.

Routers report through forward hooks (installed once per router module, so a compiled layer is
not invalidated every step) that only record while a capture is open. Gradient checkpointing
re-runs the forward during backward, after the capture has closed, so nothing is recorded twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

from moetune.models.layout import innermost_model


@dataclass(frozen=True)
class LayerRouting:
    """One MoE layer's routing of ``tokens`` (batch x sequence, flattened) rows.

    ``logits``: (tokens, num_experts) router outputs before the softmax or sigmoid, differentiable;
    ``experts``: (tokens, top_k) the experts each token went to; ``weights``: (tokens, top_k) their
    combine weights.
    """

    logits: torch.Tensor
    experts: torch.Tensor
    weights: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.logits.shape[-1]


@dataclass
class CapturedRouting:
    """What :func:`capture_routing` recorded, in layer order (filled when the ``with`` block ends)."""

    layers: tuple[LayerRouting, ...] = ()


_RECORDING: ContextVar[dict[int, LayerRouting] | None] = ContextVar("moetune_routing", default=None)


def record(layer: int, logits: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> None:
    """Called by a router tap: store layer ``layer``'s routing when a capture is open."""
    layers = _RECORDING.get()
    if layers is not None:
        # Keyed by layer: a router wrapped by PEFT (modules_to_save) reports through the wrapper and
        # its active copy, with the same tensors.
        layers[layer] = LayerRouting(logits=logits, experts=experts, weights=weights)


@contextmanager
def capture_routing(model: nn.Module, family) -> Iterator[CapturedRouting]:
    """Record every router's routing during the forward passes run inside the ``with`` block. ``family``
    is the model's (:func:`moetune.models.families.family_of`)."""
    captured = CapturedRouting()
    layers: dict[int, LayerRouting] = {}
    token = _RECORDING.set(layers)
    tap = family.tap_routers or hook_router_modules
    release = tap(family, innermost_model(model))
    try:
        yield captured
    finally:
        release()
        _RECORDING.reset(token)
        captured.layers = tuple(layers[index] for index in sorted(layers))


def router_modules(model: nn.Module, family) -> list[nn.Module]:
    """The router module of every MoE block, in layer order (PEFT wrappers included)."""
    from moetune.models.layout import find_moe_blocks

    return [getattr(block.module, block.router_name) for block in find_moe_blocks(model, family.router_name)]


def hook_router_modules(family, model: nn.Module):
    """The default tap: a forward hook on every router module, which reads the routing from the
    router's output with the family's ``Router.read``."""
    read = family.router_of(model.config).read
    for layer, router in enumerate(router_modules(model, family)):
        if not any(getattr(hook, "moetune_layer", None) == layer for hook in router._forward_hooks.values()):
            router.register_forward_hook(_router_hook(layer, read))
    return _nothing


def _router_hook(layer: int, read):
    # A plain function, not a bound method or an object: PEFT deep-copies a router for
    # modules_to_save, and a function survives deepcopy as itself, still reporting this layer.
    def hook(module, args, output):
        record(layer, *read(module, output))

    hook.moetune_layer = layer
    return hook


def _nothing() -> None:
    return None


def read_logits_weights_experts(router: nn.Module, output) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A router that returns ``(logits, weights, experts)``, as most transformers 5.x MoE routers do."""
    return output[0], output[1], output[2]


def read_scores_and_logits(router: nn.Module, output) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Llama-4's router: it returns ``(scores, logits)``, ``scores`` (tokens, E) holding the sigmoid of
    the top-k logits and zero elsewhere; the chosen experts are those top-k."""
    scores, logits = output
    with torch.no_grad():
        experts = torch.topk(logits, router.top_k, dim=-1).indices
    return logits, scores.gather(-1, experts), experts


def read_probabilities(router: nn.Module, output) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A router that returns ``(probabilities, weights, experts)`` (Gemma-4): their log is a logit
    vector with the same softmax, which is what the balance losses and expert scores need."""
    probabilities, weights, experts = output[0], output[1], output[2]
    return torch.log(probabilities.float().clamp_min(torch.finfo(torch.float32).tiny)), weights, experts


def expert_token_counts(routing: tuple[LayerRouting, ...], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k assignments per (layer, expert) as a (layers, num_experts) tensor; padding (a 2-D
    attention_mask's zeros) is left out. Each counted token adds top_k to its layer's row."""
    counts = []
    for layer in routing:
        experts = layer.experts.detach().reshape(-1).long()
        top_k = layer.experts.shape[-1]
        if attention_mask is not None and attention_mask.dim() == 2:
            weight = attention_mask.reshape(-1).to(experts.device, torch.float32).repeat_interleave(top_k)
        else:
            weight = torch.ones_like(experts, dtype=torch.float32)
        counts.append(torch.zeros(layer.num_experts, device=experts.device).scatter_add_(0, experts, weight))
    return torch.stack(counts) if counts else torch.zeros(0, 0)
