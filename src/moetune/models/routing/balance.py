"""Keeping experts evenly loaded: the balance losses a family's router names, and DeepSeek-V3's
aux-loss-free bias update.

Each :class:`moetune.models.families._spec.Router` carries one of these as its ``balance_loss``,
called as ``balance_loss(routing, scores, batch, token_mask)``:

* :func:`switch_balance_loss`: the Switch-Transformer loss (:func:`load_balancing_loss`), what
  transformers computes for Mixtral, Qwen-MoE, OLMoE, gpt-oss and the others that return an
  ``aux_loss`` (pooled over layers; balanced routing gives top_k);
* :func:`sequence_balance_loss`: DeepSeek's per-sequence balance loss (DeepSeek-V2's ``seq_aux``
  loss, and eq. 17-20 of the DeepSeek-V3 report for sigmoid routers), summed over MoE layers as
  DeepSeek adds it; balanced routing gives 1 per layer.

:func:`update_router_biases`: after each optimizer step, each expert's correction bias moves by
``rate`` toward balanced load (DeepSeek-V3, section 2.1.2): down when the expert got more than the
mean load, up when it got less. The bias only changes which experts are chosen, never their
weights, so it balances without a gradient that competes with the LM loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moetune.models.routing.capture import LayerRouting, router_modules


def routing_scores(logits: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    """Per-token expert affinities summing to 1: a softmax, or sigmoids normalised (DeepSeek-V3 s')."""
    logits = logits.float()
    if not sigmoid:
        return torch.softmax(logits, dim=-1)
    scores = torch.sigmoid(logits)
    return scores / scores.sum(dim=-1, keepdim=True)


def sequence_ids(batch_shape: tuple[int, int], position_ids: torch.Tensor | None,
                 attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence index per token, 0/1 weight per token), both flattened like the router's rows.

    A sequence is a sample: a padded row (padding weighs 0), or, in a packed row, each run of
    ``position_ids`` that starts at 0.
    """
    rows, length = batch_shape
    if position_ids is not None:
        starts = (position_ids.reshape(rows, length) == 0)
        starts[:, 0] = True  # every row starts a sequence
        ids = starts.reshape(-1).long().cumsum(0) - 1
    else:
        ids = torch.arange(rows, device=attention_mask.device if attention_mask is not None else None)
        ids = ids.repeat_interleave(length)
    if attention_mask is not None and attention_mask.dim() == 2:
        weight = attention_mask.reshape(-1).float()
    else:
        weight = torch.ones(rows * length, device=ids.device)
    return ids, weight.to(ids.device)


def per_sequence_balance_loss(routing: tuple[LayerRouting, ...], sequences: torch.Tensor, token_weight: torch.Tensor,
                              sigmoid: bool) -> torch.Tensor:
    """DeepSeek's sequence-wise balance loss, summed over layers.

    Per layer and sequence of T tokens: ``sum_i f_i * P_i`` with ``f_i = E / (k T) * (tokens of the
    sequence routed to expert i)`` and ``P_i`` the mean affinity of expert i over the sequence
    (:func:`routing_scores`); the layer's loss is the mean over sequences. ``sequences`` and
    ``token_weight`` come from :func:`sequence_ids`.
    """
    total = None
    count = int(sequences.max().item()) + 1 if sequences.numel() else 0  # one host sync per forward
    for layer in routing:
        scores = routing_scores(layer.logits, sigmoid)
        experts = layer.experts.long()
        num_experts, top_k = scores.shape[-1], experts.shape[-1]
        seq = sequences.to(scores.device)
        weight = token_weight.to(scores.device)
        tokens = torch.zeros(count, device=scores.device).index_add_(0, seq, weight)
        chosen = torch.zeros(count, num_experts, device=scores.device)
        chosen.index_put_((seq.repeat_interleave(top_k), experts.reshape(-1)),
                          weight.repeat_interleave(top_k), accumulate=True)
        affinity = torch.zeros(count, num_experts, device=scores.device).index_add_(0, seq, scores * weight[:, None])
        present = tokens > 0
        t = tokens[present, None]
        f = num_experts / (top_k * t) * chosen[present]
        p = affinity[present] / t
        loss = (f * p).sum(dim=-1).mean()
        total = loss if total is None else total + loss
    return total if total is not None else torch.zeros(())


@torch.no_grad()
def update_router_biases(model: nn.Module, family, counts: torch.Tensor, rate: float) -> None:
    """Move each MoE layer's correction bias by ``rate`` toward balanced load.

    ``counts``: (layers, experts) tokens routed in the optimizer step, summed over every process
    (so every rank applies the same update). The bias is the one ``family.movable_bias`` names,
    a buffer or a frozen parameter of the router. A PEFT-wrapped router keeps it in both its
    original and its trained copy; both move, so the saved adapter holds the updated bias.
    """
    from moetune.models.layout import innermost_model

    inner = innermost_model(model)
    within_router = family.movable_bias(inner.config).split(".", 1)[1]
    routers = router_modules(inner, family)
    for router, load in zip(routers, counts, strict=True):
        step = rate * torch.sign(load.mean() - load)
        for name, tensor in [*router.named_buffers(), *router.named_parameters()]:
            if name == within_router or name.endswith(f".{within_router}"):
                tensor.add_(step.to(tensor.device, tensor.dtype).reshape(tensor.shape))


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...] | list[torch.Tensor], num_experts: int, top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer load-balancing loss, ``num_experts * sum_e f_e * P_e``.

    ``f_e`` is the share of top-k assignments that went to expert e and ``P_e`` the mean router
    probability of e, both pooled over every layer's tokens (the same pooling as transformers'
    ``load_balancing_loss_func``, so the numbers match). Padding tokens (attention_mask 0) are left
    out. Perfectly balanced routing gives ``top_k``.
    """
    logits = torch.cat([layer.float() for layer in router_logits], dim=0)
    probs = torch.softmax(logits, dim=-1)
    _, chosen = torch.topk(probs, top_k, dim=-1)
    assignments = F.one_hot(chosen, num_experts).sum(dim=1).float()  # (rows, E): top-k picks per row
    if attention_mask is None:
        weights = torch.ones(logits.shape[0], device=logits.device)
    else:
        weights = attention_mask.reshape(-1).float().to(logits.device).repeat(len(router_logits))
    total = weights.sum().clamp_min(1.0)
    tokens_per_expert = (assignments * weights[:, None]).sum(dim=0) / total
    prob_per_expert = (probs * weights[:, None]).sum(dim=0) / total
    return num_experts * torch.sum(tokens_per_expert * prob_per_expert)


def router_z_loss(router_logits: tuple[torch.Tensor, ...] | list[torch.Tensor],
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(logits)^2``, averaged over layers.

    It keeps router logits small, which keeps the softmax out of its saturated, unstable region.
    """
    per_layer = []
    for layer in router_logits:
        z = torch.logsumexp(layer.float(), dim=-1).square()
        if attention_mask is None:
            per_layer.append(z.mean())
        else:
            mask = attention_mask.reshape(-1).float().to(z.device)
            per_layer.append((z * mask).sum() / mask.sum().clamp_min(1.0))
    return torch.stack(per_layer).mean()


def switch_balance_loss(routing: tuple[LayerRouting, ...], scores: str, batch: Mapping[str, Any],
                        token_mask: torch.Tensor | None) -> torch.Tensor:
    """The Switch loss of one forward pass (:func:`load_balancing_loss` on the captured logits): what
    transformers adds for the model types that return an ``aux_loss``, whatever their scores."""
    logits = tuple(layer.logits for layer in routing)
    return load_balancing_loss(logits, routing[0].num_experts, routing[0].experts.shape[-1], token_mask)


def sequence_balance_loss(routing: tuple[LayerRouting, ...], scores: str, batch: Mapping[str, Any],
                          token_mask: torch.Tensor | None) -> torch.Tensor:
    """DeepSeek's sequence-wise loss of one forward pass (:func:`per_sequence_balance_loss`), with the
    router's ``scores`` (softmax, or sigmoids normalised) as the affinities; a packed row's samples
    count as sequences of their own."""
    sequences, weight = sequence_ids(tuple(batch["input_ids"].shape), batch.get("position_ids"), token_mask)
    return per_sequence_balance_loss(routing, sequences, weight, scores == "sigmoid")


def router_losses(routing: tuple[LayerRouting, ...], router, batch: Mapping[str, Any], config,
                  zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(aux loss, z loss) of one forward pass: the balance loss of the model's ``router``
    (:class:`moetune.models.families._spec.Router`) on the captured routing."""
    if not routing:
        return zero, zero
    mask = batch.get("attention_mask")
    # A 2-D 0/1 mask is a padding mask; packed batches may carry other shapes, which pool every token.
    token_mask = mask if mask is not None and mask.dim() == 2 else None
    aux = z = zero
    if config.moe.use_auxiliary_loss:
        aux = router.balance_loss(routing, router.scores, batch, token_mask)
    if config.moe.router_z_loss_weight > 0:
        z = router_z_loss(tuple(layer.logits for layer in routing), token_mask)
    return aux, z
