"""Validation loss and perplexity, token-weighted and summed across processes."""

from __future__ import annotations

import math

import torch

from moetune.models.losses import IGNORE_INDEX, forward_with_lm_loss


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
        tokens += (labels[:, 1:] != IGNORE_INDEX).sum()
    loss_sum, tokens = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(tokens, "sum")
    if was_training:
        model.train()
    loss = (loss_sum / tokens.clamp_min(1)).item()
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": int(tokens.item())}
