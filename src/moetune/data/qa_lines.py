"""Reading the `qa_jsonl` source kind (:mod:`moetune.data.sources.qa_jsonl`): ``{"question", "answer",
"expert_label"}`` lines -> prompt/completion samples.

Bad lines never crash the build and are never dropped silently: each one is reported with
``file:line`` and the reason, and counted. With ``data.strict`` the first bad line stops the
build with a :class:`UserError` (exit code 2).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moetune.errors import UserError

_BOM = b"\xef\xbb\xbf"


@dataclass
class QaStats:
    """Counts for one QA file; ``bad_lines`` holds "file:line: reason" strings."""

    lines_read: int = 0
    blank_lines: int = 0
    bad_lines: list[str] = field(default_factory=list)
    missing_expert_label: int = 0
    expert_labels: Counter = field(default_factory=Counter)


class BadLine(ValueError):
    """A line that cannot become a sample; the message is the reason."""


def read_qa_jsonl(path: str | Path, prompt_template: str, strict: bool, stats: QaStats,
                  cache_dir: str | Path | None = None) -> Iterator[dict[str, Any]]:
    """Yield one record per good line (or row, for a .parquet or .arrow file) of ``path``; count and describe the
    bad ones in ``stats``. ``cache_dir``: where ``datasets`` keeps its copy of a parquet file.

    ``prompt_template`` gets the question in place of ``{question}``; the completion is the
    answer with a leading space, so prompt + completion reads as one text.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data.sources: qa_jsonl file {path} does not exist (relative paths resolve against "
                        f"{Path.cwd()}).")
    if path.suffix in (".parquet", ".arrow"):
        yield from _read_qa_table(path, prompt_template, strict, stats, cache_dir)
        return
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(_BOM)
            stats.lines_read += 1
            if not raw.strip():
                stats.blank_lines += 1
                continue
            try:
                question, answer, label = parse_qa_line(raw)
            except BadLine as err:
                where = f"{path}:{lineno}: {err}"
                if strict:
                    raise UserError(f"{where} (data.strict is true, so the build stops at the first bad line; "
                                    "set data.strict: false to skip and count bad lines instead).") from None
                stats.bad_lines.append(where)
                continue
            yield _qa_record(question, answer, label, prompt_template, stats, {"file": str(path), "line": lineno})


def _read_qa_table(path: Path, prompt_template: str, strict: bool, stats: QaStats, cache_dir) -> Iterator[dict[str, Any]]:
    """The rows of a parquet or Arrow file with ``question`` and ``answer`` columns, as :func:`read_qa_jsonl` reads lines."""
    from moetune.data.tabular import read_rows

    for row in read_rows(path, ("question", "answer"), cache_dir):
        stats.lines_read += 1
        try:
            question, answer, label = qa_fields(row.value)
        except BadLine as err:
            where = f"{row.where}: {err}"
            if strict:
                raise UserError(f"{where} (data.strict is true, so the build stops at the first bad line; "
                                "set data.strict: false to skip and count bad lines instead).") from None
            stats.bad_lines.append(where)
            continue
        yield _qa_record(question, answer, label, prompt_template, stats, row.place)


def _qa_record(question: str, answer: str, label: str | None, prompt_template: str, stats: QaStats,
               place: dict[str, Any]) -> dict[str, Any]:
    if label is None:
        stats.missing_expert_label += 1
    else:
        stats.expert_labels[label] += 1
    return {"prompt": prompt_template.replace("{question}", question), "completion": " " + answer,
            "source": "qa_jsonl", "kind": "qa", "expert_label": label, **place}


def parse_qa_line(raw: bytes) -> tuple[str, str, str | None]:
    """(question, answer, expert_label or None) from one raw line; raises BadLine with the reason."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadLine(f"not valid UTF-8 (byte {err.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadLine(f"invalid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise BadLine("invalid JSON (nested too deeply)") from None
    return qa_fields(obj)


def qa_fields(obj: Any) -> tuple[str, str, str | None]:
    """(question, answer, expert_label or None) of one parsed line or row; raises BadLine with the reason."""
    if not isinstance(obj, dict):
        raise BadLine(f"expected a JSON object, got {type(obj).__name__}")
    question = obj.get("question")
    if question is None:
        raise BadLine("missing `question`")
    if not isinstance(question, str):
        raise BadLine(f"`question` must be a string, got {type(question).__name__}")
    if not question.strip():
        raise BadLine("empty `question`")
    if "answer" not in obj or obj["answer"] is None:
        raise BadLine("missing `answer`")
    answer = answer_text(obj["answer"])
    if not answer.strip():
        raise BadLine("empty `answer`")
    label = obj.get("expert_label")
    if label is not None and not isinstance(label, str):
        raise BadLine(f"`expert_label` must be a string or null, got {type(label).__name__}")
    return question.strip(), answer.strip(), (label.strip() or None) if label is not None else None


def answer_text(answer: Any) -> str:
    """A string as is; a list joined with ", "; {"text": ...} (or a list of those) by its text."""
    if isinstance(answer, str):
        return answer
    if isinstance(answer, dict):
        if not isinstance(answer.get("text"), str):
            raise BadLine("`answer` object needs a string `text`")
        return answer["text"]
    if isinstance(answer, list):
        if not answer:
            raise BadLine("empty `answer` list")
        parts = [answer_text(part) for part in answer if not isinstance(part, list)]
        if len(parts) != len(answer):
            raise BadLine("`answer` list may hold strings or {\"text\": ...} objects, not nested lists")
        return ", ".join(part.strip() for part in parts)
    raise BadLine(f"`answer` must be a string, a list or {{\"text\": ...}}, got {type(answer).__name__}")
