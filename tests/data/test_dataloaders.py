"""The trainer's entry point: packed rows and their efficiency, the loaders' batches, and the padding switch."""

from __future__ import annotations

import json
from pathlib import Path

from moetune.config import load_config
from moetune.data.dataloaders import build_dataloaders, build_train_eval_datasets
from moetune.data.padding import PaddingCollator


def _config(tmp_path: Path, records: list[dict], *overrides: str):
    dataset = tmp_path / "all.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in records))
    return load_config(None, [f"data.output_path={dataset}", "model.max_seq_length=64", "validation.validation_split=0.2",
                              "training.per_device_train_batch_size=2", *overrides])


def test_trainer_entry_point_packs_rows_and_reports_efficiency(tmp_path: Path, mixed_records, mixed_tokenizer):
    config = _config(tmp_path, mixed_records)
    data = build_train_eval_datasets(config, mixed_tokenizer)
    assert data.packed and data.stats["train_records"] == 32 and data.stats["eval_records"] == 8
    assert data.stats["train_rows"] < data.stats["train_samples"] == 32
    assert 0.8 < data.stats["train_packing_efficiency"] <= 1.0
    row = data.train[0]
    assert len(row["input_ids"]) <= 64 and row["position_ids"].count(0) >= 2  # several samples in one row
    train_loader, eval_loader, _ = build_dataloaders(config, mixed_tokenizer)
    batch = next(iter(train_loader))
    assert set(batch) == {"input_ids", "labels", "position_ids"} and batch["input_ids"].shape[0] == 2
    assert sum(len(b["input_ids"]) for b in eval_loader) == len(data.eval)


def test_packing_switch_and_models_without_position_ids_fall_back_to_padding(tmp_path: Path, capsys, mixed_records,
                                                                             mixed_tokenizer):
    unpacked = build_train_eval_datasets(_config(tmp_path, mixed_records, "data.packing=false"), mixed_tokenizer)
    assert not unpacked.packed and len(unpacked.train) == 32 and isinstance(unpacked.collator, PaddingCollator)
    fallback = build_train_eval_datasets(_config(tmp_path, mixed_records), mixed_tokenizer, packs_by_position_ids=False)
    assert not fallback.packed and "padding instead" in capsys.readouterr().err
