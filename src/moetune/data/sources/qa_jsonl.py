"""Source kind `qa_jsonl`: ``{"question", "answer", "expert_label"}`` lines -> prompt/completion samples.

Reading and checking the lines is :mod:`moetune.data.qa_lines`; this module counts what it read,
reports bad lines, and says how QA records are split (by question), grouped (by ``expert_label``)
and evaluated (the answer is generated and scored).

Its records carry ``expert_label`` (null when the line had none), ``file`` and ``line``.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from moetune.config.fields import check, opt, required
from moetune.data.sources._kind import SampleWriter, SourceKind, unit_by_text

if TYPE_CHECKING:
    from moetune.config.schema import Config

MAX_BAD_LINES_PRINTED = 20
MAX_BAD_LINES_IN_STATS = 1000


@dataclass(frozen=True)
class QaJsonlSourceConfig:
    """Question/answer JSONL lines: {"question", "answer", "expert_label"}."""

    path: str = required("JSONL file (relative paths resolve against the current directory).")
    type: Literal["qa_jsonl"] = opt("qa_jsonl", "Source kind.")
    prompt_template: str = opt("Question: {question}\nAnswer:", "Prompt built from each line; loss is on the answer only.")

    def __post_init__(self) -> None:
        check(bool(self.path), "data.sources[].path", self.path, "a non-empty path")
        check("{question}" in self.prompt_template, "data.sources[].prompt_template", self.prompt_template,
              "a template containing {question}")


def add_samples(source: QaJsonlSourceConfig, config: Config, writer: SampleWriter, stats: dict) -> None:
    """Write one sample per good line; count and report the bad ones (``data.strict`` stops at the first)."""
    from moetune.data.qa_lines import QaStats, read_qa_jsonl
    from moetune.data.records import content_digest, sample_chars, to_json_line

    qa = QaStats()
    for record in read_qa_jsonl(source.path, source.prompt_template, config.data.strict, qa):
        writer.write(content_digest(record), to_json_line(record), "qa_jsonl", "qa", sample_chars(record))
    stats["qa_lines_read"] += qa.lines_read
    stats["bad_lines"] += len(qa.bad_lines)
    room = MAX_BAD_LINES_IN_STATS - len(stats["bad_line_details"])
    stats["bad_line_details"].extend(qa.bad_lines[:max(room, 0)])
    stats["qa_missing_expert_label"] += qa.missing_expert_label
    stats["expert_labels"] = dict(sorted((Counter(stats["expert_labels"]) + qa.expert_labels).items()))
    stats["sources"].append({"type": "qa_jsonl", "path": source.path, "lines_read": qa.lines_read,
                             "blank_lines": qa.blank_lines, "bad_lines": len(qa.bad_lines),
                             "missing_expert_label": qa.missing_expert_label})
    for where in qa.bad_lines[:MAX_BAD_LINES_PRINTED]:
        print(f"skipped bad line {where}", file=sys.stderr)
    if len(qa.bad_lines) > MAX_BAD_LINES_PRINTED:
        print(f"... and {len(qa.bad_lines) - MAX_BAD_LINES_PRINTED} more bad lines in {source.path} "
              "(listed in the stats file)", file=sys.stderr)


def new_stats() -> dict:
    """The kind's counters at zero; ``bad_line_details`` keeps the first MAX_BAD_LINES_IN_STATS bad lines."""
    return {"qa_lines_read": 0, "bad_lines": 0, "bad_line_details": [], "qa_missing_expert_label": 0,
            "expert_labels": {}}


def summary_lines(stats: dict) -> list[str]:
    """The QA samples made, bad lines skipped and lines without a label; none when no QA file was read."""
    if not stats["qa_lines_read"]:
        return []
    qa = stats["samples"].get("qa_jsonl", {}).get("qa", 0)
    return [f"Created {qa:,} QA samples ({stats['bad_lines']:,} bad lines skipped, "
            f"{stats['qa_missing_expert_label']:,} without expert_label)"]


def describe_empty(stats: dict) -> str:
    """How many lines were read and how many of them were bad."""
    return f"{stats['qa_lines_read']:,} QA lines read, {stats['bad_lines']:,} bad"


def input_files(source: QaJsonlSourceConfig) -> list[Path]:
    """The one JSONL file."""
    return [Path(source.path)]


def split_unit(record: dict) -> str:
    """The question: a question repeated with another label cannot be on both sides of the split."""
    return "qa_jsonl:" + record["prompt"] if "prompt" in record else unit_by_text(record)


def routing_group(record: dict) -> str:
    """``label:<expert_label>``, ``label:none`` for a line without one."""
    return f"label:{record.get('expert_label') or 'none'}"


SOURCE = SourceKind.from_module(__name__, name="qa_jsonl", config_class=QaJsonlSourceConfig, path_is="file",
                                path_holds="a JSONL file", evaluation="answer")
