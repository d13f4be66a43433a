"""Validation loss and perplexity, token-weighted and summed across processes."""

from __future__ import annotations

import torch

from moetune.models.loss.lm_loss import forward_with_lm_loss, mean_loss_and_perplexity, scored_token_count


@torch.no_grad()
def evaluate_loss(model, loader, accelerator, max_batches: int | None = None) -> dict[str, float]:
    """Mean next-token loss over every label token of ``loader`` and its perplexity.

    Weighted by tokens, not batches, so a short final batch or uneven shards cannot skew it.
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    tokens = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        _, batch_loss = forward_with_lm_loss(model, {**inputs, "use_cache": False}, labels)
        loss_sum += batch_loss.double()
        tokens += scored_token_count(labels)
    loss_sum, tokens = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(tokens, "sum")
    if was_training:
        model.train()
    loss, perplexity = mean_loss_and_perplexity(loss_sum.item(), tokens.item())
    return {"eval_loss": loss, "eval_perplexity": perplexity, "eval_tokens": int(tokens.item())}


@torch.no_grad()
def evaluate_preference(model, loader, accelerator, config, reference, max_batches: int | None = None) -> dict[str, float]:
    """A preference objective's validation figures over ``loader``'s pairs (KTO: rows), summed across processes.

    ``eval_loss``: the objective without its router terms (the preference loss per pair, plus the chosen
    completions' next-token loss per token at its weight); ``eval_perplexity``: of the chosen (desirable)
    completions; ``eval_rewards/*``: the mean implicit rewards and, for pairs, the preference accuracy (share of
    pairs whose chosen reward beats the rejected one) and mean reward margin; ``eval_pairs``: how many were scored.
    """
    from moetune.models.loss.lm_loss import forward_with_sequence_logps
    from moetune.models.loss.objective import (
        LOSS_ONLY_KEYS,
        lm_loss_weight,
        lm_rows,
        preference_parts,
        reference_logps,
        weighted_loss,
    )
    from moetune.models.loss.preference import PAIRED_OBJECTIVES, PREFERENCE_SUMS, preference_metrics

    t = config.training
    was_training = model.training
    model.eval()
    sums = torch.zeros(2 + PREFERENCE_SUMS, dtype=torch.float64, device=accelerator.device)  # NLL, its tokens, preference
    preference_weight = 1.0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        inputs = {k: v for k, v in batch.items() if k not in LOSS_ONLY_KEYS}
        scored = reference_logps(model, batch, t.objective, reference)
        _, logps, tokens = forward_with_sequence_logps(model, {**inputs, "use_cache": False}, batch["labels"])
        parts = preference_parts(model, batch, logps, tokens, t, scored)
        rows = lm_rows(batch)
        sums += torch.cat([torch.stack([-logps[rows].sum(), tokens[rows].sum()]).double(), parts.sums().to(sums.device)])
        preference_weight = parts.weight
    sums = accelerator.reduce(sums, "sum")
    if was_training:
        model.train()
    nll, perplexity = mean_loss_and_perplexity(sums[0].item(), sums[1].item())
    preference = preference_metrics(sums[2:].tolist(), t.objective in PAIRED_OBJECTIVES)
    lm_weight = lm_loss_weight(t)
    loss = weighted_loss(nll, 0.0, 0.0, None, aux_weight=0.0, z_weight=0.0, supervision_weight=0.0, lm_weight=lm_weight,
                         preference_loss=preference["preference_loss"], preference_weight=preference_weight)
    return {"eval_loss": loss, "eval_perplexity": perplexity, "eval_pairs": int(sums[3].item()),
            **{f"eval_{name}": value for name, value in preference.items()}}
