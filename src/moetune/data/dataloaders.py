"""The trainer's entry point to its data: read, split, tokenize, then pack or pad, and the DataLoaders.

Packing and padding themselves live in :mod:`moetune.data.packing` and :mod:`moetune.data.padding`;
this module decides which one a run gets and builds the datasets, collator and loaders.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from moetune.config.schema import Config
from moetune.data.encode import encode_records
from moetune.data.expert_labels import label_ids_of, label_vocabulary
from moetune.data.packing import PackedCollator, PackedDataset, plan_packed_rows
from moetune.data.padding import PaddingCollator, SampleDataset
from moetune.data.split import load_splits
from moetune.data.tokenizer import pad_token_id
from moetune.errors import UserError


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
    ``packs_by_position_ids`` False (the model's fact, see :mod:`moetune.data.packing`): padding even when data.packing is on.
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
