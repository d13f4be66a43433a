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
  prompt followed by the completion of its KL partner (that completion's labels kept, the prompt's -100), cut to
  ``max_length``. The partner is fixed per dataset row, not per batch: row i's KL row is the same in every epoch
  and shuffle, so a reference log-probability computed for it before training (``pair_index`` keys it too) stays
  its reference. Partners follow a seeded cycle through the rows (TRL pairs each row with a neighbour of its
  batch): rows that share a prompt, a pair's two sides, are as unlikely to meet as any two.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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
    """One completion a row: ``input_ids``, ``labels``, ``desirable``, ``pair_index`` (the row), its KL row
    (``kl_input_ids``, ``kl_labels``: its prompt and its partner's completion, at most ``max_length`` tokens) and, when
    labelled, ``expert_label_id``. ``partner[i]``: the row whose completion row i's KL row borrows (seeded by ``seed``)."""

    def __init__(self, encoded: EncodedPreferences, max_length: int | None = None, seed: int = 0):
        assert encoded.layout == "unpaired"
        self.encoded, self.max_length = encoded, max_length
        self.labelled = "expert_label_id" in encoded.sides.column_names
        cycle = np.random.default_rng(seed).permutation(len(encoded))
        self.partner = np.empty(len(encoded), dtype=np.int64)
        self.partner[cycle] = np.roll(cycle, -1)

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int) -> dict:
        side = self._side(index)
        other = self._side(int(self.partner[index]))
        kl_ids, kl_labels = kl_row((side["input_ids"], side["labels"]), (other["input_ids"], other["labels"]),
                                   self.max_length)
        row = {"input_ids": side["input_ids"], "labels": side["labels"], "desirable": bool(self.encoded.desirable[index]),
               "pair_index": index, "kl_input_ids": kl_ids, "kl_labels": kl_labels}
        if self.labelled:
            row["expert_label_id"] = side["expert_label_id"]
        return row

    def _side(self, index: int) -> dict:
        return self.encoded.sides[int(self.encoded.completions[index])]


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

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        label_ids = [row["expert_label_id"] for row in rows] if "expert_label_id" in rows[0] else None
        batch = _padded([(row["input_ids"], row["labels"]) for row in rows], self.pad_token_id, label_ids)
        batch["desirable"] = torch.tensor([row["desirable"] for row in rows], dtype=torch.bool)
        batch["pair_index"] = torch.tensor([row["pair_index"] for row in rows], dtype=torch.int64)
        kl = _padded([(row["kl_input_ids"], row["kl_labels"]) for row in rows], self.pad_token_id, None)
        batch.update({f"kl_{name}": value for name, value in kl.items()})
        return batch


def kl_row(own: tuple[list[int], list[int]], other: tuple[list[int], list[int]],
           max_length: int | None = None) -> tuple[list[int], list[int]]:
    """(ids, labels): ``own``'s prompt followed by ``other``'s completion, labels -100 on the prompt; at most
    ``max_length`` tokens. A prompt is a side's tokens before its first trained label."""
    (ids, labels), (other_ids, other_labels) = own, other
    cut, other_cut = prompt_length(labels), prompt_length(other_labels)
    row_ids = list(ids[:cut]) + list(other_ids[other_cut:])
    row_labels = [IGNORE_INDEX] * cut + list(other_labels[other_cut:])
    return (row_ids[:max_length], row_labels[:max_length]) if max_length else (row_ids, row_labels)


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
