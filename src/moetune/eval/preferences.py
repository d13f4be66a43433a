"""`moetune eval` on preference pairs: how far the fine-tuned model prefers the chosen completions over the base.

Each validation pair is encoded as training encodes it (:mod:`moetune.data.preference_encode`) and both of its
completions are scored by each model: the summed log-probability of the completion's tokens. With the base as
the reference, the fine-tuned model's implicit reward of a completion is ``beta * (log p_tuned - log p_base)``
(DPO's); the preference accuracy is the share of pairs whose chosen completion gets the higher reward, and the
margin the mean difference. Each model's own preference (the share of pairs where it gives the chosen
completion the higher log-probability) is reported beside it, overall and per label. Unpaired (KTO) records
carry no pair to compare and are left to the loss per group.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from moetune.data.preference_batches import PairedCollator, PairedDataset
from moetune.data.preference_encode import encode_preferences
from moetune.data.tokenizer import pad_token_id
from moetune.models.loss.lm_loss import forward_with_sequence_logps


def paired_records(records: list[dict]) -> list[dict]:
    """The pairs among ``records`` (dataset records): those with a chosen and a rejected completion."""
    return [r for r in records if "chosen" in r and "rejected" in r]


@torch.no_grad()
def pair_logps(model, tokenizer, records: list[dict], config, desc: str = "pairs") -> tuple[torch.Tensor, list[dict]]:
    """((pairs, 2) float64 summed log-probabilities of each kept pair's chosen and rejected completion, the kept
    pairs' records). A pair whose prompt alone is too long is dropped, as training drops it."""
    model.eval()
    device = next(model.parameters()).device
    encoded = encode_preferences(records, tokenizer, config.model.max_seq_length, "dpo",
                                 max_target_length=config.data.max_target_length, where="the validation split")
    dataset, collate = PairedDataset(encoded), PairedCollator(pad_token_id(tokenizer))
    table = torch.zeros(len(dataset), 2, dtype=torch.float64)
    size = config.training.per_device_eval_batch_size
    for start in tqdm(range(0, len(dataset), size), desc=desc, unit="batch", dynamic_ncols=True):
        batch = collate([dataset[i] for i in range(start, min(start + size, len(dataset)))])
        inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
                  "use_cache": False}
        _, sums, _ = forward_with_sequence_logps(model, inputs, batch["labels"].to(device))
        chosen, rejected = sums.double().cpu().chunk(2)
        table[batch["pair_index"], 0], table[batch["pair_index"], 1] = chosen, rejected
    return table, [records[int(i)] for i in encoded.records]


def preference_section(base: torch.Tensor, tuned: torch.Tensor, records: list[dict], beta: float) -> dict:
    """The report's ``preference`` object: rewards of the fine-tuned model against the base, and each model's own
    preference, overall and per expert label."""
    labels = [r.get("expert_label") or "none" for r in records]
    groups = {"overall": torch.ones(len(records), dtype=torch.bool)}
    for label in sorted(set(labels)):
        groups[label] = torch.tensor([x == label for x in labels], dtype=torch.bool)
    rewards = beta * (tuned - base)
    margins = rewards[:, 0] - rewards[:, 1]

    def figures(rows: torch.Tensor) -> dict:
        n = int(rows.sum())
        share = (lambda x: float(x[rows].double().mean()) if n else None)  # noqa: E731 - one use per figure
        return {"pairs": n, "accuracy": share(margins > 0), "margin": share(margins),
                "chosen_reward": share(rewards[:, 0]), "rejected_reward": share(rewards[:, 1]),
                "base_prefers_chosen": share(base[:, 0] > base[:, 1]),
                "tuned_prefers_chosen": share(tuned[:, 0] > tuned[:, 1])}

    overall = figures(groups.pop("overall"))
    return {"beta": beta, **overall, "per_label": {label: figures(rows) for label, rows in groups.items()}}
