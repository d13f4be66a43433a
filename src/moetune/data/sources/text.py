"""Source kind `text`: raw text for continued pretraining, one document a record; the loss is on every token.

A document longer than ``model.max_seq_length`` is cut into consecutive windows by default
(``data.long_samples``), each a sample.

Its records carry ``text``, ``file`` and ``line`` (JSON lines) or ``row``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from moetune.config.fields import check, opt, required
from moetune.data.sources._kind import SampleWriter, SourceKind

if TYPE_CHECKING:
    from moetune.config.schema import Config


@dataclass(frozen=True)
class TextSourceConfig:
    """Raw text documents in a column of .jsonl, .json, .parquet or .arrow files."""

    path: str = required("A data file, or a folder of them (relative paths resolve against the current directory).")
    type: Literal["text"] = opt("text", "Source kind.")
    text_field: str = opt("text", "Column holding each document's text.")
    weight: float | None = opt(None, "Share of each training epoch this source's samples make (relative to the other "
                               "sources' weights; up- or down-sampled, seeded); null = as many as it has.")

    def __post_init__(self) -> None:
        check(bool(self.path), "data.sources[].path", self.path, "a non-empty path")
        check(self.weight is None or self.weight > 0, "data.sources[].weight", self.weight, "greater than 0 or null")


def add_samples(source: TextSourceConfig, config: Config, writer: SampleWriter, stats: dict) -> None:
    """Write one sample per document; count and report the rows without text (``data.strict`` stops at the first)."""
    from moetune.data.records import content_digest, sample_chars, to_json_line
    from moetune.data.sources._rows import BadRows, dataset_cache_dir, good_rows

    bad = BadRows("text", source.path, config.data.strict)
    counts: Counter = Counter()
    for row in good_rows(source.path, (source.text_field,), dataset_cache_dir(config), bad, counts):
        text = row.value.get(source.text_field)
        if not isinstance(text, str) or not text.strip():
            bad.add(row.where, f"`{source.text_field}` is missing" if text is None else
                    f"`{source.text_field}` must be non-empty text, got {text!r:.40}")
            continue
        record = {"text": text, "source": "text", "kind": "text", **row.place}
        writer.write(content_digest(record), to_json_line(record), "text", "text", sample_chars(record))
        counts["made"] += 1
    stats["text_records_read"] += counts["read"]
    stats["text_bad_records"] += bad.count
    stats["sources"].append({"type": "text", "path": source.path, "records_read": counts["read"],
                             "documents": counts["made"], "bad_records": bad.count})
    bad.report(stats)


def new_stats() -> dict:
    """The kind's counters at zero; ``bad_line_details`` is shared with the other kinds that read data files."""
    return {"text_records_read": 0, "text_bad_records": 0, "bad_line_details": []}


def summary_lines(stats: dict) -> list[str]:
    """The documents made and the rows skipped; none when no text source was read."""
    if not stats["text_records_read"]:
        return []
    made = stats["samples"].get("text", {}).get("text", 0)
    return [f"Created {made:,} text documents ({stats['text_bad_records']:,} bad records skipped)"]


def describe_empty(stats: dict) -> str:
    """How many records were read and how many of them were bad."""
    return f"{stats['text_records_read']:,} text records read, {stats['text_bad_records']:,} bad"


def input_files(source: TextSourceConfig) -> list[Path]:
    """The data files the entry reads (the path itself when it is not a folder)."""
    from moetune.data.tabular import data_files

    path = Path(source.path)
    return data_files(path) if path.is_dir() else [path]


SOURCE = SourceKind.from_module(__name__, name="text", config_class=TextSourceConfig, path_is="file or directory",
                                path_holds="a .jsonl, .json, .parquet or .arrow file of documents, or a folder of them",
                                long_samples="split")
