"""Padding-free packing: several samples in one row, kept apart by restarting ``position_ids``.

Packing concatenates samples into rows of at most ``model.max_seq_length`` tokens with
``position_ids`` restarting at 0 for every sample, and no ``attention_mask``. transformers 5.x
(``masking_utils.find_packed_sequence_indices``) reads the restarts and builds a block-diagonal
causal mask for sdpa and eager attention, so no token attends across a sample boundary; for
flash_attention_2 the batch is flattened into one row, which the varlen kernels split the same
way (what ``DataCollatorWithFlattening`` does; the trainer says when, from the kernel the model runs).
A model that cannot keep packed samples apart this way (MPT's forward takes no ``position_ids``;
gpt-oss builds its masks without them under eager attention) gets padded samples instead
(:mod:`moetune.data.padding`); the trainer says which from the model as built
(``packs_by_position_ids``: its family and the attention kernel it runs), so this module needs
nothing from the models.

Call the model with ``use_cache=False`` (or ``model.config.use_cache = False``): when a KV cache
object exists, transformers 5.x skips the packed-sequence detection and samples attend to each
other (found while writing tests/data/test_packed_attention.py).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from moetune.data.encode import IGNORE_INDEX
from moetune.data.expert_labels import NO_LABEL


def plan_packed_rows(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Group sample indices into rows whose lengths sum to at most ``max_len`` (best-fit decreasing).

    Deterministic: ties are broken by index. Every length must be at most ``max_len``.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free_sizes: list[int] = []  # distinct free capacities, sorted, each with a non-empty bucket
    buckets: dict[int, list[int]] = {}  # free capacity -> rows with exactly that much room
    for i in order:
        length = lengths[i]
        slot = bisect.bisect_left(free_sizes, length)
        if slot < len(free_sizes):
            free = free_sizes[slot]
            row = buckets[free].pop()
            if not buckets[free]:
                del buckets[free]
                del free_sizes[slot]
        else:
            row, free = len(rows), max_len
            rows.append([])
        rows[row].append(i)
        left = free - length
        if left > 0:
            if left not in buckets:
                bisect.insort(free_sizes, left)
                buckets[left] = []
            buckets[left].append(row)
    return rows


class PackedDataset(Dataset):
    """Rows of several samples: ``input_ids``, ``labels`` and restarting ``position_ids`` (lists of ints).

    When the samples carry an ``expert_label_id``, rows also hold ``expert_label_ids``: each token gets
    its own sample's id, so a row packing several samples keeps their labels apart.
    """

    def __init__(self, encoded, rows: list[list[int]]):
        self.encoded, self.rows = encoded, rows
        self.labelled = "expert_label_id" in encoded.column_names

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        samples = self.encoded[self.rows[index]]
        row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
        for ids, labels in zip(samples["input_ids"], samples["labels"], strict=True):
            row["input_ids"].extend(ids)
            row["labels"].extend(labels)
            row["position_ids"].extend(range(len(ids)))
        if self.labelled:
            row["expert_label_ids"] = [label for ids, label in zip(samples["input_ids"], samples["expert_label_id"],
                                                                   strict=True) for _ in ids]
        return row


@dataclass
class PackedCollator:
    """Batch packed rows without an attention mask (the restarting position_ids define the samples).

    ``flatten=False`` pads rows to the longest one; the padding gets its own restarting positions and
    labels -100, so it is a separate (ignored) sequence. ``flatten=True`` (flash_attention_2) joins
    the whole batch into one row of shape (1, total_tokens).
    """

    pad_token_id: int
    flatten: bool = False

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        keys = ("input_ids", "labels", "position_ids") + (("expert_label_ids",) if "expert_label_ids" in rows[0] else ())
        if self.flatten:
            return {k: torch.tensor([[v for row in rows for v in row[k]]], dtype=torch.long) for k in keys}
        width = max(len(row["input_ids"]) for row in rows)
        batch: dict[str, list[list[int]]] = {k: [] for k in keys}
        for row in rows:
            pad = width - len(row["input_ids"])
            batch["input_ids"].append(row["input_ids"] + [self.pad_token_id] * pad)
            batch["labels"].append(row["labels"] + [IGNORE_INDEX] * pad)
            batch["position_ids"].append(row["position_ids"] + list(range(pad)))
            if "expert_label_ids" in batch:
                batch["expert_label_ids"].append(row["expert_label_ids"] + [NO_LABEL] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
