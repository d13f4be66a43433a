"""Samples longer than model.max_seq_length: truncate (a turn or the answer cut), split (windows) or drop, by kind
or by data.long_samples; a sample stays one sample, and what happened is counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moetune.config import load_config
from moetune.data.dataloaders import build_train_eval_datasets, data_lines
from moetune.data.encode import IGNORE_INDEX, encode
from moetune.data.tokenizer import train_bpe_tokenizer

from .chat_template_fixtures import template_tokenizer
from .test_chat_render import trained_runs

QA = {"prompt": "Question: what does a refund of a card payment cost?\nAnswer:",
      "completion": " " + " ".join(["two percent of the amount"] * 12), "source": "qa_jsonl", "kind": "qa"}
TEXT = {"text": " ".join(f"ledger entry {i} balances" for i in range(60)), "source": "text", "kind": "text"}
CHAT = {"source": "chat", "kind": "conversation", "messages": [
    {"role": "user", "content": "What fee applies to card refunds?"},
    {"role": "assistant", "content": "Card refunds carry a 2% fee.", "train": True},
    {"role": "user", "content": "And bank transfers? " * 6},
    {"role": "assistant", "content": "Bank transfers cost 0.50 EUR. " * 8, "train": True}]}


def _tokenizer():
    return train_bpe_tokenizer([QA["prompt"] + QA["completion"], TEXT["text"]], 300)


def _lengths(tokenizer) -> tuple[int, int, int]:
    """Tokens of QA's prompt, of QA with bos and eos, of TEXT with bos and eos."""
    def count(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count(QA["prompt"]), count(QA["prompt"] + QA["completion"]) + 2, count(TEXT["text"]) + 2


MAX_LEN = 64  # the QA prompt (48 tokens here) fits with part of its answer; neither QA nor TEXT fits whole


def test_by_default_qa_is_truncated_at_the_answer_and_text_is_split():
    tokenizer = _tokenizer()
    prompt_tokens, qa_tokens, text_tokens = _lengths(tokenizer)
    assert prompt_tokens + 1 < MAX_LEN < qa_tokens < text_tokens
    encoded = encode([QA, TEXT], tokenizer, MAX_LEN)
    qa_rows = [row for row in encoded.dataset if row["record"] == 0]
    text_rows = [row for row in encoded.dataset if row["record"] == 1]
    [qa] = qa_rows  # one sample: the whole question, the answer's first tokens, no eos (it did not end)
    assert qa["handling"] == "truncated" and qa["length"] == MAX_LEN
    assert qa["labels"][:1 + prompt_tokens] == [IGNORE_INDEX] * (1 + prompt_tokens)
    assert qa["labels"][1 + prompt_tokens:] == qa["input_ids"][1 + prompt_tokens:]
    assert tokenizer.eos_token_id not in qa["input_ids"]
    assert len(text_rows) == -(-text_tokens // MAX_LEN) and all(row["handling"] == "split" for row in text_rows)
    assert sum(row["length"] for row in text_rows) == text_tokens
    assert encoded.stats == {"truncated": 1, "split": 1, "dropped": 0, "bad": 0}


@pytest.mark.parametrize(("policy", "stats"), [
    ("split", {"truncated": 0, "split": 2, "dropped": 0, "bad": 0}),
    ("truncate", {"truncated": 2, "split": 0, "dropped": 0, "bad": 0}),
    ("drop", {"truncated": 0, "split": 0, "dropped": 2, "bad": 0}),
])
def test_data_long_samples_overrides_the_kind(policy, stats):
    tokenizer = _tokenizer()
    _, qa_tokens, text_tokens = _lengths(tokenizer)
    rows = {"split": (-(-qa_tokens // MAX_LEN), -(-text_tokens // MAX_LEN)), "truncate": (1, 1), "drop": (0, 0)}[policy]
    encoded = encode([QA, TEXT], tokenizer, MAX_LEN, long_samples=policy)
    records = [row["record"] for row in encoded.dataset]
    assert (records.count(0), records.count(1), encoded.stats) == (*rows, stats)


def test_a_question_that_alone_does_not_fit_is_dropped_and_counted():
    tokenizer = _tokenizer()
    encoded = encode([QA], tokenizer, _lengths(tokenizer)[0])
    assert len(encoded.dataset) == 0 and encoded.stats["dropped"] == 1


def test_a_conversation_is_cut_after_its_last_whole_turn_that_fits():
    tokenizer = template_tokenizer("qwen3")
    whole = encode([CHAT], tokenizer, 4096).dataset[0]
    labels = whole["labels"]
    turn_ends = [i + 1 for i, label in enumerate(labels) if label != IGNORE_INDEX
                 and (i + 1 == len(labels) or labels[i + 1] == IGNORE_INDEX)]
    assert len(turn_ends) == 2
    encoded = encode([CHAT], tokenizer, turn_ends[1] - 1)  # the second reply misses its end-of-turn token
    [row] = encoded.dataset
    assert row["handling"] == "truncated" and row["input_ids"] == whole["input_ids"][:turn_ends[0]]
    assert trained_runs(tokenizer, row) == ["Card refunds carry a 2% fee.<|im_end|>"]
    assert encode([CHAT], tokenizer, turn_ends[0] - 1).stats["dropped"] == 1  # no whole turn fits


def test_the_mpt_trainer_reproduction_one_sample_per_qa_record(tmp_path: Path):
    """40 QA records, some longer than max_seq_length, padded one per row (MPT cannot pack): 40 rows, 40 steps."""
    dataset = tmp_path / "all.jsonl"
    records = [dict(QA, prompt=f"Question {i}: what does a refund cost?\nAnswer:", completion=QA["completion"] * (i % 3 + 1))
               for i in range(40)]
    dataset.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = load_config(None, [f"data.output_path={dataset}", f"model.max_seq_length={MAX_LEN}",
                                 "validation.validation_split=0"])
    data = build_train_eval_datasets(config, _tokenizer(), cache_dir=tmp_path / "cache", packs_by_position_ids=False)
    assert (data.stats["train_records"], data.stats["train_samples"], data.stats["train_rows"]) == (40, 40, 40)
    assert data.stats["train_long_samples"]["truncated"] == 40
    assert data_lines(data.stats) == ["train: 40 records truncated to fit"]
