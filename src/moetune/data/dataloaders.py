"""The trainer's entry point to its data: read, split, tokenize, then pack or pad, and the DataLoaders.

Packing and padding themselves live in :mod:`moetune.data.packing` and :mod:`moetune.data.padding`;
this module decides which one a run gets and builds the datasets, collator and loaders.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from moetune.config.schema import Config
from moetune.data.encode import column_values, encode
from moetune.data.expert_labels import vocabulary_of_labels
from moetune.data.mixing import mix_table_by_weight
from moetune.data.packing import PackedCollator, PackedDataset, plan_packed_rows
from moetune.data.padding import PaddingCollator, SampleDataset
from moetune.data.record_table import load_split_tables
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
    ``stats`` holds sample, token and row counts, ``packing_efficiency`` (real tokens / slots), how long and bad
    records were handled (``<split>_long_samples``) and the weighted mixture of the sources (``mixture``).
    ``cache_dir`` defaults to ``<dataset folder>/.cache``.
    """
    cache = Path(cache_dir) if cache_dir is not None else Path(config.data.output_path).parent / ".cache"
    # Memory-mapped Arrow tables of the records, never Python lists: what a run needs before step 1 stays flat.
    tables = load_split_tables(config, cache)
    train_records, mixture = mix_table_by_weight(tables.train, config.data.sources, config.training.seed)
    val_records = tables.validation
    if config.validation.max_eval_samples is not None:
        val_records = val_records.select(range(min(config.validation.max_eval_samples, len(val_records))))
    max_len = config.model.max_seq_length
    packed = config.data.packing and packs_by_position_ids
    if config.data.packing and not packed:
        print("data.packing: this model cannot keep packed samples apart by their position_ids (its family or the "
              "attention kernel it runs), so samples cannot be packed without attending across them; padding instead.",
              file=sys.stderr)
    pad_id = pad_token_id(tokenizer)
    stats: dict[str, Any] = {"train_records": len(train_records), "eval_records": len(val_records), "mixture": mixture}
    datasets = []
    vocabulary = _supervised_labels(config, column_values(train_records, "label").tolist())
    for table in (tables.train, tables.validation):
        check_record_kinds(table, config.training.objective, config.data.output_path)
    if config.training.objective != "sft":
        return _preference_data(config, tokenizer, cache, (train_records, val_records), vocabulary, stats)
    for name, records in (("train", train_records), ("eval", val_records)):
        if not len(records):
            datasets.append(None)
            continue
        # Only the training batches carry label ids: the routing supervision is a training loss.
        encoding = encode(records, tokenizer, max_len, cache_dir=cache, max_target_length=config.data.max_target_length,
                          long_samples=config.data.long_samples, strict=config.data.strict,
                          label_vocabulary=vocabulary if name == "train" else None,
                          num_proc=config.data.num_workers or os.cpu_count() or 1)
        encoded = encoding.dataset
        stats[f"{name}_long_samples"] = encoding.stats
        lengths = column_values(encoded, "length").tolist()  # plain ints: Column indexing is slow
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


def _preference_data(config: Config, tokenizer, cache: Path, splits, vocabulary, stats: dict[str, Any]) -> TrainingData:
    """:func:`build_train_eval_datasets` for a preference objective: pairs (dpo, orpo) or labelled completions (kto),
    padded (:mod:`moetune.data.preference_batches`)."""
    from moetune.data.preference_batches import PairedCollator, PairedDataset, UnpairedCollator, UnpairedDataset
    from moetune.data.preference_encode import encode_preferences, layout_of

    layout = layout_of(config.training.objective)
    if config.data.packing:
        print(f"data.packing: training.objective {config.training.objective} pads its "
              f"{'pairs' if layout == 'paired' else 'completions'} (one a row); they are not packed.", file=sys.stderr)
    datasets: list[Dataset | None] = []
    for name, records in zip(("train", "eval"), splits, strict=True):
        if not len(records):
            datasets.append(None)
            continue
        encoded = encode_preferences(records, tokenizer, config.model.max_seq_length, config.training.objective,
                                     cache_dir=cache, max_target_length=config.data.max_target_length,
                                     label_vocabulary=vocabulary if name == "train" else None, strict=config.data.strict,
                                     num_proc=config.data.num_workers or os.cpu_count() or 1,
                                     where=str(config.data.output_path))
        figures = encoded.stats
        stats[f"{name}_long_samples"] = figures["sides"]
        stats[f"{name}_preference"] = {key: figures[key] for key in
                                       ("pairs", "dropped_pairs", "completions", "dropped_completions", "prompt_differs")
                                       if key in figures}
        # Samples are sequences (a pair has two), rows what the loader yields (pairs, or completions).
        stats[f"{name}_samples"] = 2 * len(encoded) if layout == "paired" else len(encoded)
        if layout == "paired":
            stats[f"{name}_pairs"] = len(encoded)
        stats[f"{name}_rows"] = len(encoded)
        stats[f"{name}_tokens"] = figures["tokens"]
        datasets.append(PairedDataset(encoded) if layout == "paired" else
                        UnpairedDataset(encoded, config.model.max_seq_length, config.training.seed))
    if datasets[0] is None or not len(datasets[0]):
        _raise_empty_train(config)
    stats["sample_unit"] = "completions"  # what the long-sample counts count: each side of a record
    pad_id = pad_token_id(tokenizer)
    collator = PairedCollator(pad_id) if layout == "paired" else UnpairedCollator(pad_id)
    return TrainingData(datasets[0], datasets[1], collator, False, stats)


def check_record_kinds(table, objective: str, path: str | Path) -> None:
    """A UserError when the built dataset's records do not fit ``objective``: preference records under sft, other
    records under a preference objective. The lines are matched as text first (fast at any size); only the matching
    ones are parsed, to name a record's kind."""
    import json

    import pyarrow.compute as pc

    if not len(table):
        return
    lines = table.select_columns(["json"]).with_format("arrow")[:]["json"]
    preference = pc.match_substring_regex(lines, r'"source":\s*"preference"').to_numpy(zero_copy_only=False)
    wanted = objective != "sft"
    suspects = np.flatnonzero(preference != wanted)
    found = [json.loads(lines[int(i)].as_py()) for i in suspects[:1000]]
    found = [record for record in found if (record.get("source") == "preference") != wanted]
    if not found:
        return
    if wanted:
        raise UserError(f"{path} holds {found[0].get('source', 'unknown')} records, and training.objective "
                        f"{objective!r} learns from preference records only; rebuild it with `moetune data` from "
                        "`type: preference` sources (or train with training.objective: sft).")
    raise UserError(f"{path} holds preference records, which train with training.objective dpo, orpo or kto; "
                    "training.objective is 'sft'. Rebuild it with `moetune data` from the config's sources, or set the "
                    "objective.")


def data_lines(stats: dict[str, Any]) -> list[str]:
    """What the figures of :class:`TrainingData` say beyond the sample counts: the records that were too long or not
    renderable, the preference pairs dropped, and the weighted mixture; one line each, none when there is nothing to say."""
    said = {"truncated": "truncated to fit", "split": "split into windows", "dropped": "dropped (too long)",
            "bad": "skipped (the chat template cannot render them)"}
    unit = stats.get("sample_unit", "records")
    lines = []
    for name in ("train", "eval"):
        handled = {k: n for k, n in stats.get(f"{name}_long_samples", {}).items() if n}
        if handled:
            lines.append(f"{name}: " + ", ".join(f"{n:,} {unit} {said[k]}" for k, n in handled.items()))
        preference = stats.get(f"{name}_preference", {})
        if preference.get("dropped_pairs"):
            lines.append(f"{name}: {preference['dropped_pairs']:,} of {preference['pairs'] + preference['dropped_pairs']:,} "
                         "pairs dropped (a side was dropped: its prompt alone does not fit model.max_seq_length, or the "
                         "chat template cannot render it)")
        if preference.get("prompt_differs"):
            lines.append(f"{name}: {preference['prompt_differs']:,} pairs whose sides tokenize their shared prompt "
                         "differently (the tokenizer merged its end with a completion's start); kept")
    for part in stats.get("mixture", []):
        lines.append(f"mixture: {part['source']} weight {part['weight']:g}: {part['samples']:,} samples per epoch "
                     f"from {part['records']:,} records")
    return lines


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


def _supervised_labels(config: Config, train_labels: list[str | None]) -> tuple[str, ...]:
    """The label vocabulary of label-guided routing; () when it is off. No labelled sample is bad input."""
    if config.moe.router_supervision.weight <= 0:
        return ()
    vocabulary = vocabulary_of_labels(train_labels, config.moe.router_supervision.label_to_expert)
    if not any(label in vocabulary for label in train_labels):
        named = ("none of the labels moe.router_supervision.label_to_expert names (" + ", ".join(vocabulary) + ")"
                 if isinstance(config.moe.router_supervision.label_to_expert, dict) else "an expert_label")
        raise UserError(f"moe.router_supervision.weight is {config.moe.router_supervision.weight} but no training sample "
                        f"of {config.data.output_path} carries {named}, so the routing would be supervised by nothing; "
                        "add labelled samples (qa_jsonl lines with expert_label) or set moe.router_supervision.weight: 0.")
    return vocabulary


def _raise_empty_train(config: Config) -> None:
    raise UserError(f"{config.data.output_path} has no training samples after the validation split "
                    f"(validation.validation_split = {config.validation.validation_split}); rebuild it with more sources.")
