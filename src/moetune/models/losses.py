"""The training losses of an MoE model, kept apart so the trainer can log each one.

``compute_losses`` runs the forward pass *without* labels and computes the LM loss itself:
Hugging Face's ``out.loss`` already contains ``router_aux_loss_coef * aux_loss`` when router
logits are requested, so adding moetune's weighted aux loss to it would count the aux loss twice
(with a weight the user never set). For one micro-batch the total is exactly
``lm_loss + moe.auxiliary_loss_weight * aux_loss + moe.router_z_loss_weight * z_loss``
(``+ moe.router_supervision_weight * router_supervision_loss`` with label-guided routing).

An optimizer step is a per-token mean over *all* of its micro-batches on every process, not a mean
of per-micro-batch means (which would weigh a 20-token QA answer like a 400-token one). So the LM
loss is kept as a sum with its token count, and :meth:`LossParts.objective` divides it by the label
tokens of the whole step (:func:`step_token_counts`, summed over the window and the processes). The
aux, z and router-supervision losses are per-token statistics of a micro-batch; each micro-batch
contributes them in proportion to its share of the step's routed tokens.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from moetune.data.encode import IGNORE_INDEX
from moetune.errors import UserError
from moetune.models.layout import innermost_model
from moetune.models.routing import CapturedRouting, LayerRouting, capture_routing, family_of_model

# Batch entries the loss reads and the model's forward must not receive.
LOSS_ONLY_KEYS = ("labels", "expert_label_ids")

logger = logging.getLogger(__name__)


@dataclass
class LossParts:
    """One forward pass's losses. ``router_logits``: one (tokens, num_experts) tensor per MoE layer, or ().

    ``lm_loss_sum`` is summed over the ``loss_tokens`` label tokens; ``aux_loss`` and ``z_loss`` are this
    micro-batch's values over its ``routed_tokens``; the weights are the config's. ``routing``: what
    each MoE layer's router chose (:class:`~moetune.models.routing.LayerRouting`), for expert usage.
    ``router_supervision_loss``: label-guided routing's cross-entropy over this micro-batch's labelled
    tokens (:mod:`moetune.models.router_supervision`), None when it is off.
    """

    lm_loss_sum: torch.Tensor
    loss_tokens: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    routed_tokens: torch.Tensor
    router_logits: tuple[torch.Tensor, ...]
    aux_weight: float = 0.0
    z_weight: float = 0.0
    routing: tuple[LayerRouting, ...] = ()
    router_supervision_loss: torch.Tensor | None = None
    supervision_weight: float = 0.0

    @property
    def lm_loss(self) -> torch.Tensor:
        """Mean cross-entropy over this micro-batch's label tokens."""
        return self.lm_loss_sum / self.loss_tokens.clamp_min(1)

    @property
    def total(self) -> torch.Tensor:
        """This micro-batch's loss on its own (as if it were the whole step)."""
        return self.objective(torch.stack([self.loss_tokens, self.routed_tokens]))

    def objective(self, step_tokens: torch.Tensor) -> torch.Tensor:
        """This micro-batch's share of the step's loss, to differentiate.

        ``step_tokens`` = (label tokens, routed tokens) of the whole optimizer step, every micro-batch
        and every process (:func:`step_token_counts`, then summed). Summing the objectives of all of
        them gives the per-token mean LM loss of the step plus the token-weighted router losses.
        """
        loss_tokens, routed_tokens = step_tokens.to(self.lm_loss_sum.dtype).clamp_min(1).unbind()
        total = self.lm_loss_sum / loss_tokens
        if self.aux_weight or self.z_weight:
            share = self.routed_tokens / routed_tokens
            total = total + share * (self.aux_weight * self.aux_loss + self.z_weight * self.z_loss)
        if self.supervision_weight and self.router_supervision_loss is not None:
            total = total + self.routed_tokens / routed_tokens * self.supervision_weight * self.router_supervision_loss
        return total


def scored_token_count(labels: torch.Tensor) -> torch.Tensor:
    """How many tokens the shifted next-token loss scores: labels after the first position that are not -100."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def mean_loss_and_perplexity(loss_sum: float, tokens: float) -> tuple[float, float]:
    """The per-token mean of a summed loss, and exp of it capped at exp(50), so a diverged model reports a
    huge perplexity instead of overflowing."""
    loss = loss_sum / max(tokens, 1)
    return loss, math.exp(min(loss, 50.0))


def step_token_counts(batch: Mapping[str, Any]) -> torch.Tensor:
    """(label tokens, routed tokens) of one batch, as counted by :func:`compute_losses`, without a forward pass.

    Label tokens are those the shifted next-token loss scores; routed tokens are the non-padding ones
    (every token of a packed row, which carries no attention mask).
    """
    labels = _labels(batch)
    mask = batch.get("attention_mask")
    loss_tokens = scored_token_count(labels)
    routed = mask.sum() if mask is not None and mask.dim() == 2 else torch.tensor(labels.numel(), device=labels.device)
    return torch.stack([loss_tokens, routed.to(loss_tokens.device)]).float()


def _labels(batch: Mapping[str, Any]) -> torch.Tensor:
    """The batch's labels; by default its input_ids with padding set to -100."""
    labels = batch.get("labels")
    if labels is not None:
        return labels
    mask = batch.get("attention_mask")
    return batch["input_ids"].masked_fill(mask == 0, IGNORE_INDEX) if mask is not None else batch["input_ids"]


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


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
                   reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy (labels shifted here) over labels that are not -100.

    ``reduction="sum"`` gives the total, for token-weighted averages across batches and processes.
    """
    shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing,
                           reduction=reduction)


def forward_with_lm_loss(model: torch.nn.Module, inputs: Mapping[str, Any], labels: torch.Tensor,
                         label_smoothing: float = 0.0) -> tuple[Any, torch.Tensor]:
    """The forward pass and its LM loss summed over the label tokens.

    Where it gives the same loss, the model computes logits for its last position only and the loss
    comes from the final hidden states a chunk of tokens at a time (:mod:`moetune.models.chunked_loss`),
    so the (tokens, vocab) float32 logits and their gradient never exist: for a 151k vocabulary they are
    the largest allocation of a LoRA step. Otherwise (no ``logits_to_keep``, a partitioned or unusual
    lm_head) the full logits are used. The choice is made and logged once per model.
    """
    from moetune.models.chunked_loss import chunked_causal_lm_loss, logit_options

    inner = innermost_model(model)
    head = _chunkable_lm_head(inner)
    if head is not None:
        with _final_hidden_states(inner) as final:
            out = model(**inputs, logits_to_keep=1)
        hidden = final[0]
        options = logit_options(inner.config)
        if getattr(inner, _CHUNKED_LOSS_CHECKED, False) or _hidden_states_give_logits(inner, head, hidden, out.logits,
                                                                                       options):
            loss_sum, _ = chunked_causal_lm_loss(hidden, head, labels, label_smoothing=label_smoothing, **options)
            return out, loss_sum
    out = model(**inputs)
    return out, causal_lm_loss(out.logits, labels, label_smoothing, reduction="sum")


@contextlib.contextmanager
def _final_hidden_states(inner: torch.nn.Module):
    """A one-slot list that holds the decoder's output hidden states (after the final norm) of the forward
    run inside the ``with``. Taken from the decoder module itself rather than ``output_hidden_states``,
    which would return every layer's states, each copied to float32 by accelerate's mixed precision."""
    slot: list[torch.Tensor] = []

    def keep(module, args, output):
        slot.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = inner.get_decoder().register_forward_hook(keep)
    try:
        yield slot
    finally:
        handle.remove()


# Set on the innermost model: None = not decided yet, False = full logits, True = chunked (checked once).
_CHUNKED_LOSS_CHECKED = "_moetune_chunked_lm_loss"


def _chunkable_lm_head(inner: torch.nn.Module) -> torch.nn.Module | None:
    """The model's lm_head when the chunked loss may apply to it (not ruled out earlier), else None."""
    from moetune.models.chunked_loss import lm_head_weight_and_bias

    decided = getattr(inner, _CHUNKED_LOSS_CHECKED, None)
    if decided is False:
        return None
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if decided:
        return head
    reason = None
    if (head is None or "logits_to_keep" not in inspect.signature(inner.forward).parameters
            or not hasattr(inner, "get_decoder")):
        reason = "the model computes its logits in one piece (no logits_to_keep)"
    else:
        try:
            weight, _ = lm_head_weight_and_bias(head)
        except UserError as err:
            reason = str(err).split(";")[0]
        else:
            # ZeRO-3 and FSDP hold a shard of the weight outside the module's own forward.
            if hasattr(weight, "ds_id") or type(weight).__name__ == "DTensor":
                reason = "lm_head's weight is partitioned (ZeRO-3 / FSDP)"
    if reason is not None:
        _decide_lm_loss(inner, False, reason)
        return None
    return head


def _hidden_states_give_logits(inner, head, hidden: torch.Tensor, logits: torch.Tensor, options) -> bool:
    """Whether the last hidden state, through lm_head, reproduces the model's own logits (checked on the
    first batch): the families differ in what they return as hidden states and apply to logits."""
    from moetune.models.chunked_loss import lm_head_weight_and_bias

    with torch.no_grad():
        # Accelerate's mixed precision returns float32 hidden states from a model whose lm_head may be bf16.
        mine = head(hidden[:, -1:].to(lm_head_weight_and_bias(head)[0].dtype)).float()
        if options["logit_scale"] is not None:
            mine = mine * options["logit_scale"]
        if options["softcap"] is not None:
            mine = options["softcap"] * torch.tanh(mine / options["softcap"])
        theirs = logits[:, -1:].float()
        tolerance = 1e-4 if logits.dtype == torch.float32 else 2e-2
        same = mine.shape == theirs.shape and bool(((mine - theirs).abs() <= tolerance * (1 + theirs.abs())).all())
    _decide_lm_loss(inner, same, None if same else "the model's last hidden state does not reproduce its logits")
    return same


def _decide_lm_loss(inner, chunked: bool, reason: str | None) -> None:
    from moetune.models.chunked_loss import lm_loss_implementation

    setattr(inner, _CHUNKED_LOSS_CHECKED, chunked)
    if chunked:
        logger.info("LM loss: %s, from the final hidden states (never the full logits)",
                    lm_loss_implementation(next(inner.parameters()).device))
    else:
        logger.info("LM loss: from the full logits (%s)", reason)


def wants_router_logits(config) -> bool:
    """Whether a forward pass must capture the routing for this config (losses, expert monitoring, bias update)."""
    moe = config.moe
    return (moe.use_auxiliary_loss or moe.router_z_loss_weight > 0 or moe.monitor_expert_usage
            or moe.router_bias_update_rate > 0 or moe.router_supervision_weight > 0)


def compute_losses(model: torch.nn.Module, batch: Mapping[str, Any], config) -> LossParts:
    """Forward ``batch`` through ``model`` and split the loss into its parts.

    ``batch`` holds ``input_ids`` and optionally ``attention_mask``, ``position_ids`` and
    ``labels`` (default: ``input_ids`` with padding set to -100). The routing is captured from the
    router modules (:mod:`moetune.models.routing`); on a dense model (no router) the aux and z
    losses are zero tensors and ``router_logits`` is empty.
    """
    inputs = {k: v for k, v in batch.items() if k not in LOSS_ONLY_KEYS}
    labels = _labels(batch)
    family = family_of_model(model) if wants_router_logits(config) else None
    capturing = capture_routing(model, family) if family is not None else contextlib.nullcontext(CapturedRouting())
    with capturing as captured:
        _, lm_loss_sum = forward_with_lm_loss(model, {**inputs, "use_cache": False}, labels,
                                              config.training.label_smoothing_factor)
    loss_tokens, routed_tokens = step_token_counts(batch).to(lm_loss_sum.device).unbind()
    routing = captured.layers
    aux, z = router_losses(routing, family, innermost_model(model), batch, config, lm_loss_sum.new_zeros(()))
    supervision = None
    if config.moe.router_supervision_weight > 0 and routing and "expert_label_ids" in batch:
        from moetune.models.router_supervision import router_supervision_loss

        supervision = router_supervision_loss(tuple(layer.logits for layer in routing), batch["expert_label_ids"],
                                              config.moe.label_to_expert)
    return LossParts(lm_loss_sum=lm_loss_sum, loss_tokens=loss_tokens, aux_loss=aux, z_loss=z,
                     routed_tokens=routed_tokens, router_logits=tuple(layer.logits for layer in routing),
                     aux_weight=config.moe.auxiliary_loss_weight if config.moe.use_auxiliary_loss else 0.0,
                     z_weight=config.moe.router_z_loss_weight, routing=routing, router_supervision_loss=supervision,
                     supervision_weight=config.moe.router_supervision_weight if supervision is not None else 0.0)


def router_losses(routing: tuple[LayerRouting, ...], family, model, batch: Mapping[str, Any], config,
                  zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(aux loss, z loss) of one forward pass: the family's balance loss on the captured routing."""
    if not routing:
        return zero, zero
    from moetune.models.balance import sequence_balance_loss, sequence_ids

    mask = batch.get("attention_mask")
    # A 2-D 0/1 mask is a padding mask; packed batches may carry other shapes, which pool every token.
    token_mask = mask if mask is not None and mask.dim() == 2 else None
    logits = tuple(layer.logits for layer in routing)
    aux = z = zero
    if config.moe.use_auxiliary_loss and family.balance_loss == "switch":
        aux = load_balancing_loss(logits, routing[0].num_experts, routing[0].experts.shape[-1], token_mask)
    elif config.moe.use_auxiliary_loss and family.balance_loss == "sequence":
        sequences, weight = sequence_ids(tuple(batch["input_ids"].shape), batch.get("position_ids"), token_mask)
        aux = sequence_balance_loss(routing, sequences, weight, family.uses_sigmoid(model.config.model_type))
    if config.moe.router_z_loss_weight > 0:
        z = router_z_loss(logits, token_mask)
    return aux, z
