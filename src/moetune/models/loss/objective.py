"""The training losses of an MoE model, kept apart so the trainer can log each one.

``compute_losses`` runs the forward pass *without* labels and computes the LM loss itself:
Hugging Face's ``out.loss`` already contains ``router_aux_loss_coef * aux_loss`` when router
logits are requested, so adding moetune's weighted aux loss to it would count the aux loss twice
(with a weight the user never set). For one micro-batch the total is exactly
``lm_loss + moe.auxiliary_loss_weight * aux_loss + moe.router_z_loss_weight * z_loss``
(``+ moe.router_supervision.weight * router_supervision_loss`` with label-guided routing).

An optimizer step is a per-token mean over *all* of its micro-batches on every process, not a mean
of per-micro-batch means (which would weigh a 20-token QA answer like a 400-token one). So the LM
loss is kept as a sum with its token count, and :meth:`LossParts.objective` divides it by the label
tokens of the whole step (:func:`step_token_counts`, summed over the window and the processes). The
aux, z and router-supervision losses are per-token statistics of a micro-batch; each micro-batch
contributes them in proportion to its share of the step's routed tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from moetune.data.encode import IGNORE_INDEX
from moetune.models.families import family_of
from moetune.models.layout import innermost_model
from moetune.models.loss.lm_loss import forward_with_lm_loss, forward_with_sequence_logps, scored_token_count
from moetune.models.loss.preference import (
    REFERENCE_OBJECTIVES,
    PreferenceParts,
    dpo_losses,
    kto_losses,
    orpo_losses,
)
from moetune.models.loss.reference import Reference, Rows, rows_of
from moetune.models.routing.balance import router_losses
from moetune.models.routing.capture import CapturedRouting, LayerRouting, capture_routing

# Batch entries the loss reads and the model's forward must not receive.
LOSS_ONLY_KEYS = ("labels", "expert_label_ids", "pair_index", "desirable", "kl_input_ids", "kl_attention_mask", "kl_labels")


@dataclass
class LossParts:
    """One forward pass's losses. ``router_logits``: one (tokens, num_experts) tensor per MoE layer, or ().

    ``lm_loss_sum`` is summed over the ``loss_tokens`` label tokens; ``aux_loss`` and ``z_loss`` are this
    micro-batch's values over its ``routed_tokens``; the weights are the config's. ``routing``: what
    each MoE layer's router chose (:class:`~moetune.models.routing.capture.LayerRouting`), for expert usage.
    ``router_supervision_loss``: label-guided routing's cross-entropy over this micro-batch's labelled
    tokens (:mod:`moetune.models.routing.supervision`), None when it is off.
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
    lm_weight: float = 1.0
    preference: PreferenceParts | None = None

    @property
    def lm_loss(self) -> torch.Tensor:
        """Mean cross-entropy over this micro-batch's label tokens."""
        return self.lm_loss_sum / self.loss_tokens.clamp_min(1)

    @property
    def total(self) -> torch.Tensor:
        """This micro-batch's loss on its own (as if it were the whole step)."""
        pairs = self.preference.pairs if self.preference is not None else torch.zeros_like(self.loss_tokens)
        return self.objective(torch.stack([self.loss_tokens, self.routed_tokens, pairs.to(self.loss_tokens.dtype)]))

    def objective(self, step_tokens: torch.Tensor) -> torch.Tensor:
        """This micro-batch's share of the step's loss, to differentiate.

        ``step_tokens`` = (label tokens, routed tokens, pairs) of the whole optimizer step, every micro-batch
        and every process (:func:`step_token_counts`, then summed). Summing the objectives of all of
        them gives the per-token mean LM loss of the step plus the token-weighted router losses, and under a
        preference objective its per-pair mean preference loss.
        """
        loss_tokens, routed_tokens, pairs = step_tokens.to(self.lm_loss_sum.dtype).clamp_min(1).unbind()
        preference = self.preference
        return weighted_loss(self.lm_loss_sum / loss_tokens, self.aux_loss, self.z_loss, self.router_supervision_loss,
                             aux_weight=self.aux_weight, z_weight=self.z_weight,
                             supervision_weight=self.supervision_weight, router_share=self.routed_tokens / routed_tokens,
                             lm_weight=self.lm_weight,
                             preference_loss=preference.loss_sum / pairs if preference is not None else None,
                             preference_weight=preference.weight if preference is not None else 0.0)


def weighted_loss(lm_loss, aux_loss, z_loss, supervision_loss, *, aux_weight: float, z_weight: float,
                  supervision_weight: float, router_share=1.0, lm_weight: float = 1.0, preference_loss=None,
                  preference_weight: float = 0.0):
    """The step loss: ``lm_weight * lm_loss + preference_weight * preference_loss
    + router_share * (aux_weight * aux + z_weight * z + supervision_weight * supervision)``.

    One formula for what is differentiated (tensors, ``router_share`` = this micro-batch's share of the
    step's routed tokens) and for what is logged (floats over a window). A term whose weight is 0 is left
    out, so a loss that is off cannot bring a NaN in. Under sft ``lm_weight`` is 1 and there is no preference
    loss; DPO and KTO weigh the LM loss (of the chosen or desirable completions) by ``training.dpo_sft_weight``.
    """
    total = lm_loss if lm_weight == 1 else lm_loss * lm_weight if lm_weight else 0.0
    if preference_weight and preference_loss is not None:
        total = total + preference_weight * preference_loss
    if aux_weight or z_weight:
        total = total + router_share * (aux_weight * aux_loss + z_weight * z_loss)
    if supervision_weight and supervision_loss is not None:
        total = total + router_share * supervision_weight * supervision_loss
    return total


def step_token_counts(batch: Mapping[str, Any]) -> torch.Tensor:
    """(label tokens, routed tokens, pairs) of one batch, as counted by :func:`compute_losses`, without a forward pass.

    Label tokens are those the shifted next-token loss scores (of a preference batch: in its chosen or
    desirable rows, :func:`lm_rows`); routed tokens are the non-padding ones (every token of a packed row, which
    carries no attention mask); pairs are a preference batch's pairs (KTO: rows), 0 otherwise.
    """
    labels = _labels(batch)
    mask = batch.get("attention_mask")
    loss_tokens = scored_token_count(labels[lm_rows(batch)])
    routed = mask.sum() if mask is not None and mask.dim() == 2 else torch.tensor(labels.numel(), device=labels.device)
    pairs = batch["pair_index"].numel() if "pair_index" in batch else 0
    return torch.stack([loss_tokens, routed.to(loss_tokens.device), torch.tensor(pairs, device=loss_tokens.device)]).float()


def lm_rows(batch: Mapping[str, Any]) -> slice | torch.Tensor:
    """The rows whose next-token loss counts: all of them, a pair batch's chosen half, an unpaired batch's desirable rows."""
    if "desirable" in batch:
        return batch["desirable"].bool()
    if "pair_index" in batch:
        return slice(0, batch["pair_index"].numel())
    return slice(None)


def _labels(batch: Mapping[str, Any]) -> torch.Tensor:
    """The batch's labels; by default its input_ids with padding set to -100."""
    labels = batch.get("labels")
    if labels is not None:
        return labels
    mask = batch.get("attention_mask")
    return batch["input_ids"].masked_fill(mask == 0, IGNORE_INDEX) if mask is not None else batch["input_ids"]


def wants_router_logits(config) -> bool:
    """Whether a forward pass must capture the routing for this config (losses, expert monitoring, bias update)."""
    moe = config.moe
    return (moe.use_auxiliary_loss or moe.router_z_loss_weight > 0 or moe.monitor.expert_usage
            or moe.router_bias_update_rate > 0 or moe.router_supervision.weight > 0)


def compute_losses(model: torch.nn.Module, batch: Mapping[str, Any], config, reference: Reference | None = None) -> LossParts:
    """Forward ``batch`` through ``model`` and split the loss into its parts.

    ``batch`` holds ``input_ids`` and optionally ``attention_mask``, ``position_ids`` and
    ``labels`` (default: ``input_ids`` with padding set to -100). The routing is captured from the
    router modules (:mod:`moetune.models.routing.capture`); on a dense model (no router) the aux and z
    losses are zero tensors and ``router_logits`` is empty. Under a preference objective (``training.objective``)
    the batch is a preference batch (:mod:`moetune.data.preference_batches`: a pair's chosen and rejected rows in
    one forward pass), ``lm_loss_sum`` is the chosen (desirable) completions' next-token loss and ``preference``
    holds the preference loss; DPO and KTO take their reference log-probabilities from ``reference``.
    """
    inputs = {k: v for k, v in batch.items() if k not in LOSS_ONLY_KEYS}
    labels = _labels(batch)
    routed = wants_router_logits(config)
    objective = config.training.objective
    # The reference's forward passes (no gradients) run before the policy's, not after: their transient memory
    # then comes on top of nothing, not on top of the policy's activations that backward keeps (with them after,
    # the reference forward was the peak of a DPO step). The values are the same: the reference is not the policy.
    scored = reference_logps(model, batch, objective, reference)
    capturing = capture_routing(model, family_of(model)) if routed else contextlib.nullcontext(CapturedRouting())
    with capturing as captured:
        if objective == "sft":
            _, lm_loss_sum = forward_with_lm_loss(model, {**inputs, "use_cache": False}, labels,
                                                  config.training.label_smoothing_factor)
        else:
            _, logps, tokens = forward_with_sequence_logps(model, {**inputs, "use_cache": False}, labels)
    preference, lm_weight = None, 1.0
    if objective != "sft":
        lm_loss_sum = -logps[lm_rows(batch)].sum()
        preference = preference_parts(model, batch, logps, tokens, config.training, scored)
        lm_weight = lm_loss_weight(config.training)
    loss_tokens, routed_tokens, _ = step_token_counts(batch).to(lm_loss_sum.device).unbind()
    routing = captured.layers
    router = family_of(model).router_of(innermost_model(model).config) if routing else None
    aux, z = router_losses(routing, router, batch, config, lm_loss_sum.new_zeros(()))
    supervision = None
    if config.moe.router_supervision.weight > 0 and routing and "expert_label_ids" in batch:
        from moetune.models.routing.supervision import router_supervision_loss

        supervision = router_supervision_loss(tuple(layer.logits for layer in routing), batch["expert_label_ids"],
                                              config.moe.router_supervision.label_to_expert)
    return LossParts(lm_loss_sum=lm_loss_sum, loss_tokens=loss_tokens, aux_loss=aux, z_loss=z,
                     routed_tokens=routed_tokens, router_logits=tuple(layer.logits for layer in routing),
                     aux_weight=config.moe.auxiliary_loss_weight if config.moe.use_auxiliary_loss else 0.0,
                     z_weight=config.moe.router_z_loss_weight, routing=routing, router_supervision_loss=supervision,
                     supervision_weight=config.moe.router_supervision.weight if supervision is not None else 0.0,
                     lm_weight=lm_weight, preference=preference)


def lm_loss_weight(training) -> float:
    """The next-token loss's weight in the objective: 1 under sft and ORPO, ``training.dpo_sft_weight`` under DPO and KTO."""
    return 1.0 if training.objective in ("sft", "orpo") else training.dpo_sft_weight


def reference_logps(model, batch: Mapping[str, Any], objective: str,
                    reference: Reference | None) -> dict[Rows, torch.Tensor]:
    """The reference's summed log-probabilities that ``objective`` reads, by rows: DPO's of the batch's rows, KTO's
    of its rows and its KL rows; none for an objective without a reference."""
    if objective not in REFERENCE_OBJECTIVES:
        return {}
    if reference is None:
        raise ValueError(f"training.objective {objective!r} needs a reference model")
    rows: tuple[Rows, ...] = ("main", "kl") if objective == "kto" else ("main",)
    return {r: reference.logps(model, batch, r) for r in rows}


def preference_parts(model, batch: Mapping[str, Any], logps: torch.Tensor, tokens: torch.Tensor, training,
                     scored: Mapping[Rows, torch.Tensor]) -> PreferenceParts:
    """The preference loss of a batch from its rows' summed log-probabilities under the policy (``logps``) and
    the reference (``scored``, from :func:`reference_logps`, run before the policy's forward pass), and their
    label-token counts, as ``training.objective`` and its settings say."""
    objective = training.objective
    if objective == "kto":
        with torch.no_grad():  # the KL estimate is detached: the policy's KL rows need no graph
            kl_inputs, kl_labels = rows_of(batch, "kl")
            _, kl_logps, _ = forward_with_sequence_logps(model, {**kl_inputs, "use_cache": False}, kl_labels)
        losses, desirable_rewards, undesirable_rewards, _ = kto_losses(
            logps, scored["main"], kl_logps, scored["kl"], batch["desirable"],
            beta=training.dpo_beta, desirable_weight=training.kto_desirable_weight,
            undesirable_weight=training.kto_undesirable_weight)
        return PreferenceParts(losses.sum(), logps.new_tensor(losses.numel()), desirable_rewards, undesirable_rewards)
    chosen, rejected = logps.chunk(2)
    chosen_tokens, rejected_tokens = tokens.chunk(2)
    if objective == "orpo":
        losses, chosen_rewards, rejected_rewards = orpo_losses(chosen, rejected, chosen_tokens, rejected_tokens,
                                                               beta=training.orpo_lambda)
        return PreferenceParts(losses.sum(), logps.new_tensor(losses.numel()), chosen_rewards, rejected_rewards,
                               weight=training.orpo_lambda)
    ref_chosen, ref_rejected = scored["main"].chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo_losses(
        chosen, rejected, ref_chosen, ref_rejected, beta=training.dpo_beta, loss=training.dpo_loss,
        label_smoothing=training.dpo_label_smoothing, chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens)
    return PreferenceParts(losses.sum(), logps.new_tensor(losses.numel()), chosen_rewards, rejected_rewards)
