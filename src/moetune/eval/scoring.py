"""One pass over the validation samples: loss and perplexity, per group and overall, and routing counts.

Samples are encoded exactly as for training (:func:`moetune.data.encode.encode_records`: bos +
tokens + eos, prompt tokens without loss, long samples cut into windows) but batched one sample
per row with right padding instead of packed, so every row belongs to one routing group. The
loss is the mean over label tokens, weighted by tokens as in the trainer's evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from moetune.data.encode import encode_records
from moetune.data.padding import PaddingCollator
from moetune.data.tokenizer import pad_token_id
from moetune.eval.routing_report import group_of
from moetune.models.families import family_of
from moetune.models.loss.lm_loss import forward_with_lm_loss, mean_loss_and_perplexity, scored_token_count
from moetune.models.routing.capture import capture_routing, expert_token_counts


@dataclass
class ScoreResult:
    """Loss over all label tokens, per-group losses, and (MoE only) routed-token counts per group."""

    loss: float
    perplexity: float
    tokens: int
    per_group: dict[str, dict[str, float]] = field(default_factory=dict)
    routing_counts: dict[str, torch.Tensor] = field(default_factory=dict)  # group -> (layers, experts)
    top_k: int = 0

    def as_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens, "per_group": self.per_group}


@torch.no_grad()
def score_records(model, tokenizer, records: list[dict], max_seq_length: int, batch_size: int,
                  desc: str = "loss") -> ScoreResult:
    """Loss, perplexity and routing counts of ``model`` on ``records`` (dataset records)."""
    model.eval()
    device = next(model.parameters()).device
    family = family_of(model)
    top_k = 0
    pad_id = pad_token_id(tokenizer)
    collate = PaddingCollator(pad_id)
    # bos/eos/pad are in every sample alike: they say nothing about the group, only dilute its routing.
    special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)

    batches: list[tuple[str, dict[str, torch.Tensor]]] = []
    for group, members in _by_group(records).items():
        encoded = encode_records(members, tokenizer, max_seq_length)
        rows = sorted(({"input_ids": ids, "labels": labels} for ids, labels in
                       zip(encoded["input_ids"], encoded["labels"], strict=True)), key=lambda r: len(r["input_ids"]))
        batches += [(group, collate(rows[i:i + batch_size])) for i in range(0, len(rows), batch_size)]

    loss_sums: dict[str, float] = {}
    token_counts: dict[str, int] = {}
    routing: dict[str, torch.Tensor] = {}
    for group, batch in tqdm(batches, desc=desc, unit="batch", dynamic_ncols=True):
        batch = {k: v.to(device) for k, v in batch.items()}
        with capture_routing(model, family) as captured:
            _, loss = forward_with_lm_loss(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                                                   "use_cache": False}, batch["labels"])
        loss_sums[group] = loss_sums.get(group, 0.0) + float(loss)
        token_counts[group] = token_counts.get(group, 0) + int(scored_token_count(batch["labels"]))
        if captured.layers:
            top_k = captured.layers[0].experts.shape[-1]
            counted = batch["attention_mask"].bool().cpu() & ~torch.isin(batch["input_ids"].cpu(), special_ids)
            counts = expert_token_counts(captured.layers, counted.to(device)).double().cpu()
            routing[group] = counts if group not in routing else routing[group] + counts

    tokens = sum(token_counts.values())
    mean, perplexity = mean_loss_and_perplexity(sum(loss_sums.values()), tokens)
    per_group = {g: {"loss": mean_loss_and_perplexity(loss_sums[g], token_counts[g])[0], "tokens": token_counts[g]}
                 for g in sorted(loss_sums)}
    return ScoreResult(mean, perplexity, tokens, per_group, routing, top_k)


def _by_group(records: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(group_of(record), []).append(record)
    return dict(sorted(groups.items()))
