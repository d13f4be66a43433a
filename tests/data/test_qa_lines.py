"""QA lines: every answer shape, labels, and every kind of bad line counted with file:line."""

from __future__ import annotations

from pathlib import Path

import pytest

from moetune.data.qa_lines import QaStats, read_qa_jsonl
from moetune.errors import UserError

from .conftest import BAD_QA_LINES, LONG_QUESTION

TEMPLATE = "Question: {question}\nAnswer:"


def test_good_lines_become_prompt_completion_records(qa_file: Path):
    stats = QaStats()
    records = list(read_qa_jsonl(qa_file, TEMPLATE, strict=False, stats=stats))

    assert [(r["line"], r["completion"], r["expert_label"]) for r in records] == [
        (1, " A debit and a credit.", "ledger"),  # behind a UTF-8 BOM
        (2, " JPY, KRW", "currency"),  # list joined with ", "
        (3, " A reversed card payment.", None),  # {"text": ...}, no label
        (4, " Visa, Mastercard", "cards"),  # list of {"text": ...}
        (17, " Long.", "limits"),
        (18, " Yes.", "io"),  # CRLF line end
    ]
    assert records[0]["prompt"] == "Question: What does a ledger entry record?\nAnswer:"
    assert records[4]["prompt"] == f"Question: {LONG_QUESTION}\nAnswer:"
    assert all(r["source"] == "qa_jsonl" and r["kind"] == "qa" and r["file"] == str(qa_file) for r in records)
    assert (stats.lines_read, stats.blank_lines, stats.missing_expert_label) == (18, 1, 1)
    assert dict(stats.expert_labels) == {"ledger": 1, "currency": 1, "cards": 1, "limits": 1, "io": 1}


def test_every_bad_line_is_reported_with_file_line_and_reason(qa_file: Path):
    stats = QaStats()
    list(read_qa_jsonl(qa_file, TEMPLATE, strict=False, stats=stats))

    assert len(stats.bad_lines) == len(BAD_QA_LINES) == 11
    for lineno, (where, (_, reason)) in enumerate(zip(stats.bad_lines, BAD_QA_LINES, strict=True), start=6):
        assert where.startswith(f"{qa_file}:{lineno}: ")
        assert reason in where


def test_strict_mode_stops_at_the_first_bad_line(qa_file: Path):
    with pytest.raises(UserError, match=rf"{qa_file.name}:6: invalid JSON .*data.strict"):
        list(read_qa_jsonl(qa_file, TEMPLATE, strict=True, stats=QaStats()))


def test_template_is_filled_without_str_format(tmp_path: Path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "What is {x}?", "answer": "a brace"}\n')
    (record,) = read_qa_jsonl(path, "<q>{question}</q> {literal braces}", strict=False, stats=QaStats())
    assert record["prompt"] == "<q>What is {x}?</q> {literal braces}"
