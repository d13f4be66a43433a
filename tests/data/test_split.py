"""Train/validation split: by source file, deterministic in the seed."""

from __future__ import annotations

import json
from pathlib import Path

from moetune.config import load_config
from moetune.data.split import load_splits, split_records, split_unit


def _rust(path: str, kind: str) -> dict:
    return {"text": f"{path}:{kind}", "source": "rust_repo", "repo": "r", "path": path, "kind": kind}


def _records() -> list[dict]:
    records = [_rust(f"src/f{i}.rs", kind) for i in range(40) for kind in ("file", "function", "struct")]
    records += [{"prompt": f"Question: q{i}\nAnswer:", "completion": " a", "source": "qa_jsonl", "kind": "qa"} for i in range(60)]
    return records


def test_one_source_file_is_never_on_both_sides():
    train, val = split_records(_records(), 0.25, seed=7)
    train_units, val_units = {split_unit(r) for r in train}, {split_unit(r) for r in val}
    assert not train_units & val_units
    assert len(val_units) == 25  # a quarter of 40 files + 60 questions
    assert len(train) + len(val) == 180
    for unit in val_units:  # every sample of a validation file is in validation
        assert sum(split_unit(r) == unit for r in val) == (3 if unit.startswith("rust_repo") else 1)


def test_split_is_deterministic_in_the_seed_and_keeps_order():
    records = _records()
    assert split_records(records, 0.2, seed=1) == split_records(list(records), 0.2, seed=1)
    assert split_records(records, 0.2, seed=1)[1] != split_records(records, 0.2, seed=2)[1]
    train, _ = split_records(records, 0.2, seed=1)
    assert train == [r for r in records if r in train]


def test_small_and_zero_splits():
    records = _records()[:6]  # two files
    assert len({split_unit(r) for r in split_records(records, 0.01, seed=0)[1]}) == 1  # at least one unit
    assert split_records(records, 0.0, seed=0) == (records, [])


def test_load_splits_reads_the_built_dataset(tmp_path: Path):
    dataset = tmp_path / "d.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    config = load_config(None, [f"data.output_path={dataset}", "validation.validation_split=0.1", "training.seed=3"])
    assert load_splits(config) == split_records(_records(), 0.1, seed=3)
