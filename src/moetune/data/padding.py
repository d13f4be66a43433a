"""Plain padding: one sample per row, right-padded to the longest in the batch, with an attention mask.

What the trainer uses when data.packing is false or the model cannot keep packed samples apart
(see :mod:`moetune.data.packing`), and what evaluation batches with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from moetune.data.encode import IGNORE_INDEX
from moetune.data.expert_labels import NO_LABEL


class SampleDataset(Dataset):
    """One sample per row (``input_ids``, ``labels``), for data.packing: false."""

    def __init__(self, encoded):
        self.encoded = encoded
        self.labelled = "expert_label_id" in encoded.column_names

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        sample = self.encoded[index]
        row = {"input_ids": sample["input_ids"], "labels": sample["labels"]}
        if self.labelled:
            row["expert_label_ids"] = [sample["expert_label_id"]] * len(sample["input_ids"])
        return row


@dataclass
class PaddingCollator:
    """Right-pad samples to the longest in the batch, with an attention mask and labels -100 on padding."""

    pad_token_id: int

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in rows)
        ids, labels, mask, label_ids = [], [], [], []
        for row in rows:
            pad = width - len(row["input_ids"])
            ids.append(row["input_ids"] + [self.pad_token_id] * pad)
            labels.append(row["labels"] + [IGNORE_INDEX] * pad)
            mask.append([1] * len(row["input_ids"]) + [0] * pad)
            if "expert_label_ids" in row:
                label_ids.append(row["expert_label_ids"] + [NO_LABEL] * pad)
        batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}
        if label_ids:
            batch["expert_label_ids"] = torch.tensor(label_ids)
        return batch
