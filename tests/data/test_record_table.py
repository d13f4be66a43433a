"""The trainer's Arrow tables of the built dataset: the same split as the record lists, blank lines skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moetune.config import load_config
from moetune.data.record_table import load_split_tables, table_records
from moetune.data.split import load_splits


def _dataset(path: Path) -> Path:
    records = [{"text": f"fn f{i}() {{}}", "source": "rust_repo", "repo": "r", "path": f"src/m{i % 7}.rs", "kind": "function"}
               for i in range(40)]
    records += [{"prompt": f"Question {i}?\nAnswer:", "completion": " yes", "source": "qa_jsonl", "kind": "qa",
                 "expert_label": ["fees", None][i % 2]} for i in range(30)]
    records += [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a", "train": True}],
                 "source": "chat", "kind": "conversation", "expert_label": "chat", "entry": 2} for i in range(20)]
    lines = [json.dumps(r) for r in records]
    lines.insert(10, "")  # a blank line is no record
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("max_samples", [None, 50])
def test_the_tables_split_as_the_record_lists_do(tmp_path: Path, max_samples):
    dataset = _dataset(tmp_path / "all.jsonl")
    overrides = [f"data.output_path={dataset}", "validation.validation_split=0.2", "training.seed=3"]
    if max_samples:
        overrides.append(f"data.max_samples={max_samples}")
    config = load_config(None, overrides)
    train, validation = load_splits(config)
    tables = load_split_tables(config, tmp_path / "cache")
    assert table_records(tables.train) == train and table_records(tables.validation) == validation
    assert len(train) + len(validation) == (max_samples or 90) and len(validation) > 0
    assert tables.train["label"] == [r.get("expert_label") for r in train]
    assert tables.train["entry"] == [r.get("entry", -1) for r in train]
