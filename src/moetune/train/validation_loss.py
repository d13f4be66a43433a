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
