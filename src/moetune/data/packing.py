"""Torch-ready training data: padding-free packing, or plain padding, and the trainer's entry point.

Packing concatenates samples into rows of at most ``model.max_seq_length`` tokens with
``position_ids`` restarting at 0 for every sample, and no ``attention_mask``. transformers 5.x
(``masking_utils.find_packed_sequence_indices``) reads the restarts and builds a block-diagonal
causal mask for sdpa and eager attention, so no token attends across a sample boundary; for
flash_attention_2 the batch is flattened into one row, which the varlen kernels split the same
way (what ``DataCollatorWithFlattening`` does; the trainer says when, from the kernel the model runs). A model that cannot keep packed samples apart this
way (MPT's forward takes no ``position_ids``; gpt-oss builds its masks without them under eager
attention) falls back to padding; the trainer says which from the model as built
(``packs_by_position_ids``: its family and the attention kernel it runs), so this module needs
nothing from the models.

Call the model with ``use_cache=False`` (or ``model.config.use_cache = False``): when a KV cache
object exists, transformers 5.x skips the packed-sequence detection and samples attend to each
other (found while writing tests/data/test_packed_attention.py).
"""

from __future__ import annotations

import bisect
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from moetune.config.schema import Config
from moetune.data.encode import IGNORE_INDEX, encode_records
from moetune.data.expert_labels import NO_LABEL, label_ids_of, label_vocabulary
from moetune.data.split import load_splits
from moetune.data.tokenizer import pad_token_id
from moetune.errors import UserError


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


@dataclass
class TrainingData:
    """What the trainer gets: datasets of dict rows, the collator that batches them, and figures."""

    train: Dataset
    eval: Dataset | None
    collator: Any
    packed: bool
    stats: dict[str, Any] = field(default_factory=dict)


def build_train_eval_datasets(config: Config, tokenizer, cache_dir: str | Path | None = None, *,
                              packs_by_position_ids: bool = True, flatten_packed_rows: bool = False) -> TrainingData:
    """Read, split, tokenize (cached) and pack or pad the dataset for training.

    Contract for the trainer: iterate ``DataLoader(data.train, collate_fn=data.collator, ...)`` and
    call ``model(**batch, use_cache=False)``; a batch holds ``input_ids``, ``labels`` (-100 = no loss)
    and either ``position_ids`` (packed: never add an attention_mask, it would disable the
    per-sample masking) or ``attention_mask`` (padded). Labels are not shifted: the model shifts them. ``data.eval`` is None when validation.validation_split is 0.
    ``packs_by_position_ids`` False (the model's fact, see the module docstring): padding even when data.packing is on.
    ``flatten_packed_rows`` (the model runs a flash kernel): each batch of packed rows is one flattened row.
    ``stats`` holds sample, token and row counts and ``packing_efficiency`` (real tokens / slots).
    ``cache_dir`` defaults to ``<dataset folder>/.cache``.
    """
    train_records, val_records = load_splits(config)
    if config.validation.max_eval_samples is not None:
        val_records = val_records[:config.validation.max_eval_samples]
    max_len = config.model.max_seq_length
    packed = config.data.packing and packs_by_position_ids
    if config.data.packing and not packed:
        print("data.packing: this model cannot keep packed samples apart by their position_ids (its family or the "
              "attention kernel it runs), so samples cannot be packed without attending across them; padding instead.",
              file=sys.stderr)
    cache = Path(cache_dir) if cache_dir is not None else Path(config.data.output_path).parent / ".cache"
    pad_id = pad_token_id(tokenizer)
    stats: dict[str, Any] = {"train_records": len(train_records), "eval_records": len(val_records)}
    datasets = []
    vocabulary = _supervised_labels(config, train_records)
    for name, records in (("train", train_records), ("eval", val_records)):
        if not records:
            datasets.append(None)
            continue
        # Only the training batches carry label ids: the routing supervision is a training loss.
        label_ids = label_ids_of(records, vocabulary) if vocabulary and name == "train" else None
        encoded = encode_records(records, tokenizer, max_len, cache_dir=cache, max_target_length=config.data.max_target_length,
                                 label_ids=label_ids)
        lengths = encoded.data.column("length").to_pylist()  # plain ints: Column indexing is slow
        stats[f"{name}_samples"] = len(lengths)
        stats[f"{name}_tokens"] = sum(lengths)
        if packed:
            rows = plan_packed_rows(lengths, max_len)
            stats[f"{name}_rows"] = len(rows)
            stats[f"{name}_packing_efficiency"] = sum(lengths) / (len(rows) * max_len)
            datasets.append(PackedDataset(encoded, rows))
        else:
            stats[f"{name}_rows"] = len(lengths)
            datasets.append(SampleDataset(encoded))
    if datasets[0] is None:
        _raise_empty_train(config)
    collator = PackedCollator(pad_id, flatten=flatten_packed_rows) if packed else PaddingCollator(pad_id)
    return TrainingData(datasets[0], datasets[1], collator, packed, stats)


def build_dataloaders(config: Config, tokenizer, *, packs_by_position_ids: bool = True,
                      flatten_packed_rows: bool = False) -> tuple[DataLoader, DataLoader | None, TrainingData]:
    """(train_loader, eval_loader or None, TrainingData) with the training.* batch sizes.

    The train loader shuffles with a generator seeded by training.seed; wrap both loaders in
    ``accelerator.prepare`` to shard them across processes. ``packs_by_position_ids`` and
    ``flatten_packed_rows``: see :func:`build_train_eval_datasets`.
    """
    data = build_train_eval_datasets(config, tokenizer, packs_by_position_ids=packs_by_position_ids,
                                     flatten_packed_rows=flatten_packed_rows)
    training = config.training
    generator = torch.Generator().manual_seed(training.seed)
    train = DataLoader(data.train, batch_size=training.per_device_train_batch_size, shuffle=True, generator=generator,
                       collate_fn=data.collator, num_workers=training.dataloader_num_workers)
    evaluation = None
    if data.eval is not None:
        evaluation = DataLoader(data.eval, batch_size=training.per_device_eval_batch_size, shuffle=False,
                                collate_fn=data.collator, num_workers=training.dataloader_num_workers)
    return train, evaluation, data


def _supervised_labels(config: Config, train_records: list[dict]) -> tuple[str, ...]:
    """The label vocabulary of label-guided routing; () when it is off. No labelled sample is bad input."""
    if config.moe.router_supervision.weight <= 0:
        return ()
    vocabulary = label_vocabulary(train_records, config.moe.router_supervision.label_to_expert)
    if not any(label in vocabulary for label in (r.get("expert_label") for r in train_records)):
        named = ("none of the labels moe.router_supervision.label_to_expert names (" + ", ".join(vocabulary) + ")"
                 if isinstance(config.moe.router_supervision.label_to_expert, dict) else "an expert_label")
        raise UserError(f"moe.router_supervision.weight is {config.moe.router_supervision.weight} but no training sample "
                        f"of {config.data.output_path} carries {named}, so the routing would be supervised by nothing; "
                        "add labelled samples (qa_jsonl lines with expert_label) or set moe.router_supervision.weight: 0.")
    return vocabulary


def _raise_empty_train(config: Config) -> None:
    raise UserError(f"{config.data.output_path} has no training samples after the validation split "
                    f"(validation.validation_split = {config.validation.validation_split}); rebuild it with more sources.")
