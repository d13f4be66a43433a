"""Batches of preferences, padded (pairs are never packed): what the preference losses read.

Paired (dpo, orpo), B pairs a batch:

- ``input_ids``, ``attention_mask``, ``labels``: (2B, L); rows 0..B-1 the chosen sides, rows B..2B-1 the rejected
  ones (row i and row B+i are one pair), right-padded to one width L. ``labels`` are encode's: -100 on the
  prompt, on padding and on each row's first token, the token ids on the completion.
- ``pair_index``: (B,) int64, the pair's row in the dataset (stable across epochs and shuffles: it keys
  reference log-probabilities computed before training).
- ``expert_label_ids``: (2B, L), each token's label id (NO_LABEL on padding), when the dataset carries labels.

Unpaired (kto), B completions a batch:

- ``input_ids``, ``attention_mask``, ``labels``: (B, L); ``desirable``: (B,) bool; ``pair_index``: (B,) int64, the row;
  ``expert_label_ids`` as above.
- ``kl_input_ids``, ``kl_attention_mask``, ``kl_labels``: (B, L'), KTO's mismatched rows for its KL estimate: row i's
  prompt followed by the completion of row (i + 1) % B (its labels kept, the prompt's -100), cut to ``max_length``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from moetune.data.encode import IGNORE_INDEX
from moetune.data.expert_labels import NO_LABEL
from moetune.data.preference_encode import EncodedPreferences, prompt_length


class PairedDataset(Dataset):
    """One pair a row: ``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``, ``rejected_labels``,
    ``pair_index`` (the row) and, when labelled, ``expert_label_id``."""

    def __init__(self, encoded: EncodedPreferences):
        assert encoded.layout == "paired"
        self.encoded = encoded
        self.labelled = "expert_label_id" in encoded.sides.column_names

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int) -> dict:
        sides = self.encoded.sides
        chosen, rejected = sides[int(self.encoded.chosen[index])], sides[int(self.encoded.rejected[index])]
        row = {"chosen_input_ids": chosen["input_ids"], "chosen_labels": chosen["labels"],
               "rejected_input_ids": rejected["input_ids"], "rejected_labels": rejected["labels"], "pair_index": index}
        if self.labelled:
            row["expert_label_id"] = chosen["expert_label_id"]
        return row


class UnpairedDataset(Dataset):
    """One completion a row: ``input_ids``, ``labels``, ``desirable``, ``pair_index`` (the row) and, when labelled,
    ``expert_label_id``."""

    def __init__(self, encoded: EncodedPreferences):
        assert encoded.layout == "unpaired"
        self.encoded = encoded
        self.labelled = "expert_label_id" in encoded.sides.column_names

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int) -> dict:
        side = self.encoded.sides[int(self.encoded.completions[index])]
        row = {"input_ids": side["input_ids"], "labels": side["labels"], "desirable": bool(self.encoded.desirable[index]),
               "pair_index": index}
        if self.labelled:
            row["expert_label_id"] = side["expert_label_id"]
        return row


@dataclass
class PairedCollator:
    """Chosen sides then rejected sides, right-padded to one width (see the module docstring)."""

    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        sequences = [(row["chosen_input_ids"], row["chosen_labels"]) for row in rows]
        sequences += [(row["rejected_input_ids"], row["rejected_labels"]) for row in rows]
        label_ids = [row["expert_label_id"] for row in rows] * 2 if "expert_label_id" in rows[0] else None
        batch = _padded(sequences, self.pad_token_id, label_ids)
        batch["pair_index"] = torch.tensor([row["pair_index"] for row in rows], dtype=torch.int64)
        return batch


@dataclass
class UnpairedCollator:
    """Completions with their labels, and KTO's KL rows (see the module docstring)."""

    pad_token_id: int
    max_length: int | None = None

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        sequences = [(row["input_ids"], row["labels"]) for row in rows]
        label_ids = [row["expert_label_id"] for row in rows] if "expert_label_id" in rows[0] else None
        batch = _padded(sequences, self.pad_token_id, label_ids)
        batch["desirable"] = torch.tensor([row["desirable"] for row in rows], dtype=torch.bool)
        batch["pair_index"] = torch.tensor([row["pair_index"] for row in rows], dtype=torch.int64)
        kl = _padded(kl_rows(sequences, self.max_length), self.pad_token_id, None)
        batch.update({f"kl_{name}": value for name, value in kl.items()})
        return batch


def kl_rows(sequences: list[tuple[list[int], list[int]]], max_length: int | None = None) -> list[tuple[list[int], list[int]]]:
    """Row i's prompt followed by row (i + 1) % B's completion, labels -100 on the prompt; at most ``max_length`` tokens."""
    cuts = [prompt_length(labels) for _, labels in sequences]
    out = []
    for i, (ids, _) in enumerate(sequences):
        j = (i + 1) % len(sequences)
        other_ids, other_labels = sequences[j]
        row_ids = list(ids[:cuts[i]]) + list(other_ids[cuts[j]:])
        row_labels = [IGNORE_INDEX] * cuts[i] + list(other_labels[cuts[j]:])
        out.append((row_ids[:max_length], row_labels[:max_length]) if max_length else (row_ids, row_labels))
    return out


def _padded(sequences: list[tuple[list[int], list[int]]], pad_token_id: int, label_ids: list[int] | None) -> dict:
    width = max(len(ids) for ids, _ in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.int64)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.int64)
    mask = torch.zeros((len(sequences), width), dtype=torch.int64)
    for n, (row_ids, row_labels) in enumerate(sequences):
        ids[n, :len(row_ids)] = torch.tensor(row_ids, dtype=torch.int64)
        labels[n, :len(row_labels)] = torch.tensor(row_labels, dtype=torch.int64)
        mask[n, :len(row_ids)] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if label_ids is not None:
        expert = torch.full((len(sequences), width), NO_LABEL, dtype=torch.int64)
        for n, (row_ids, _) in enumerate(sequences):
            expert[n, :len(row_ids)] = label_ids[n]
        batch["expert_label_ids"] = expert
    return batch
