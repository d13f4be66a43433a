"""Tokenize, pack, collate: labels, restarting positions, efficiency, and the padding switch."""

from __future__ import annotations

import json
from pathlib import Path

from moetune.config import load_config
from moetune.data.encode import IGNORE_INDEX, encode_records
from moetune.data.packing import (
    PackedCollator,
    PaddingCollator,
    build_dataloaders,
    build_train_eval_datasets,
    plan_packed_rows,
)
from moetune.data.tokenizer import train_bpe_tokenizer

RECORDS = [{"text": f"pub fn f{i}() -> u32 {{ {i} * {i} }}", "source": "rust_repo", "repo": "r", "path": f"src/f{i}.rs",
            "kind": "function"} for i in range(30)]
RECORDS += [{"prompt": f"Question: what is {i} squared?\nAnswer:", "completion": f" {i * i}", "source": "qa_jsonl",
             "kind": "qa", "expert_label": None} for i in range(10)]


def _tokenizer():
    return train_bpe_tokenizer([r.get("text") or r["prompt"] + r["completion"] for r in RECORDS], 320)


def test_best_fit_decreasing_plan():
    lengths = [5, 9, 3, 7, 2, 8]
    rows = plan_packed_rows(lengths, 10)
    assert rows == [[1], [5, 4], [3, 2], [0]]
    assert sorted(i for row in rows for i in row) == list(range(6))
    assert sum(lengths) / (len(rows) * 10) == 0.85


def test_labels_mask_the_prompt_and_each_sample_start_and_long_samples_become_windows():
    tokenizer = _tokenizer()
    qa = RECORDS[-1]
    (encoded,) = encode_records([qa], tokenizer, 64)
    prompt_ids = tokenizer(qa["prompt"], add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(qa["completion"], add_special_tokens=False)["input_ids"]
    assert encoded["input_ids"] == [tokenizer.bos_token_id, *prompt_ids, *answer_ids, tokenizer.eos_token_id]
    assert encoded["labels"] == [IGNORE_INDEX] * (1 + len(prompt_ids)) + answer_ids + [tokenizer.eos_token_id]

    long_text = {"text": " ".join(f"x{i}" for i in range(200))}
    windows = encode_records([long_text], tokenizer, 16)
    assert all(length <= 16 for length in windows["length"])
    assert sum(windows["length"]) == len(tokenizer(long_text["text"], add_special_tokens=False)["input_ids"]) + 2
    assert all(labels[0] == IGNORE_INDEX for labels in windows["labels"])


def test_encoding_is_cached_on_disk(tmp_path: Path):
    tokenizer = _tokenizer()
    first = encode_records(RECORDS, tokenizer, 32, cache_dir=tmp_path)
    cached = list(tmp_path.glob("encoded-*.arrow"))
    assert len(cached) == 1
    again = encode_records(RECORDS, tokenizer, 32, cache_dir=tmp_path)
    assert again["input_ids"] == first["input_ids"] and list(tmp_path.glob("encoded-*.arrow")) == cached
    encode_records(RECORDS, tokenizer, 24, cache_dir=tmp_path)  # another max length: another cache entry
    assert len(list(tmp_path.glob("encoded-*.arrow"))) == 2


def test_collators_restart_positions_pad_as_a_separate_sequence_and_flatten():
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9], "position_ids": [0, 1, 2, 0, 1]},
            {"input_ids": [3, 4], "labels": [-100, 4], "position_ids": [0, 1]}]
    batch = PackedCollator(pad_token_id=0)(rows)
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [3, 4, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 4, -100, -100, -100]]
    flat = PackedCollator(pad_token_id=0, flatten=True)(rows)
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]] and flat["input_ids"].shape == (1, 7)
    padded = PaddingCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [3], "labels": [-100]}])
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert padded["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]


def _config(tmp_path: Path, *overrides: str):
    dataset = tmp_path / "all.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return load_config(None, [f"data.output_path={dataset}", "model.max_seq_length=64", "validation.validation_split=0.2",
                              "training.per_device_train_batch_size=2", *overrides])


def test_trainer_entry_point_packs_rows_and_reports_efficiency(tmp_path: Path):
    data = build_train_eval_datasets(_config(tmp_path), _tokenizer())
    assert data.packed and data.stats["train_records"] == 32 and data.stats["eval_records"] == 8
    assert data.stats["train_rows"] < data.stats["train_samples"] == 32
    assert 0.8 < data.stats["train_packing_efficiency"] <= 1.0
    row = data.train[0]
    assert len(row["input_ids"]) <= 64 and row["position_ids"].count(0) >= 2  # several samples in one row
    train_loader, eval_loader, _ = build_dataloaders(_config(tmp_path), _tokenizer())
    batch = next(iter(train_loader))
    assert set(batch) == {"input_ids", "labels", "position_ids"} and batch["input_ids"].shape[0] == 2
    assert sum(len(b["input_ids"]) for b in eval_loader) == len(data.eval)


def test_packing_switch_and_models_without_position_ids_fall_back_to_padding(tmp_path: Path, capsys):
    unpacked = build_train_eval_datasets(_config(tmp_path, "data.packing=false"), _tokenizer())
    assert not unpacked.packed and len(unpacked.train) == 32 and isinstance(unpacked.collator, PaddingCollator)
    fallback = build_train_eval_datasets(_config(tmp_path), _tokenizer(), packs_by_position_ids=False)
    assert not fallback.packed and "padding instead" in capsys.readouterr().err
