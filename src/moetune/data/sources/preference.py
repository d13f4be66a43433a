"""Source kind `preference`: preference data (prompt + chosen + rejected pairs, or labelled completions) for DPO, ORPO, KTO.

Reading the rows is :mod:`moetune.data.tabular` (JSON lines, JSON, parquet, Arrow; a file or a folder);
turning a row into a record is :mod:`moetune.data.preference_records` (TRL's standard, conversational,
implicit-prompt and unpaired shapes). A record is never one sample: a preference objective encodes each of
its sides as SFT encodes a prompt/completion or a conversation (:mod:`moetune.data.preference_sides`), and
batches them as :mod:`moetune.data.preference_batches` says. A prompt is a split unit (pairs sharing one stay on
one side of the split); records are grouped by their label like chat.

Its records carry ``kind`` (``pair`` or ``unpaired``), ``prompt`` and either ``chosen`` + ``rejected`` or
``completion`` + ``desirable`` (each part a string, or a list of messages), ``tools`` (when the record had
some), ``expert_label`` (null when none), ``file`` and ``line`` (JSON lines) or ``row``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from moetune.config.fields import check, opt, required
from moetune.data.sources._kind import SampleWriter, SourceKind

if TYPE_CHECKING:
    from moetune.config.schema import Config


@dataclass(frozen=True)
class PreferenceSourceConfig:
    """Preference pairs (prompt, chosen, rejected) or labelled completions (prompt, completion, label) for dpo/orpo/kto."""

    path: str = required("A data file, or a folder of them (relative paths resolve against the current directory).")
    type: Literal["preference"] = opt("preference", "Source kind.")
    field_prompt: str = opt("prompt", "Column of the prompt: a string, or a list of messages. A pair of conversations "
                            "without it takes the opening messages its chosen and rejected sides share (implicit prompt).")
    field_chosen: str = opt("chosen", "Column of a pair's preferred completion (a string, or assistant messages).")
    field_rejected: str = opt("rejected", "Column of a pair's dispreferred completion (a string, or assistant messages).")
    field_completion: str = opt("completion", "Column of an unpaired (KTO) record's completion.")
    field_label: str = opt("label", "Column of an unpaired record's label: true (a desirable completion) or false.")
    field_expert_label: str = opt("expert_label", "Column of a record's expert label (routing report, ESFT, "
                                  "label-guided routing), as label_field of the other kinds.")
    field_system: str = opt("system", "Column of an optional system prompt, placed before the prompt.")
    field_tools: str = opt("tools", "Column of a conversation's tools: a list of JSON schemas (or JSON text of one).")
    weight: float | None = opt(None, "Share of each training epoch this source's samples make (relative to the other "
                               "sources' weights; up- or down-sampled, seeded); null = as many as it has.")

    def __post_init__(self) -> None:
        check(bool(self.path), "data.sources[].path", self.path, "a non-empty path")
        check(self.weight is None or self.weight > 0, "data.sources[].weight", self.weight, "greater than 0 or null")


def add_samples(source: PreferenceSourceConfig, config: Config, writer: SampleWriter, stats: dict) -> None:
    """Write one record per good row; count and report the bad ones (``data.strict`` stops at the first)."""
    from moetune.data.preference_records import BadPreference, PreferenceFields, read_preference
    from moetune.data.records import content_digest, sample_chars, to_json_line
    from moetune.data.sources._rows import BadRows, dataset_cache_dir, good_rows

    fields = PreferenceFields(source.field_prompt, source.field_chosen, source.field_rejected, source.field_completion,
                              source.field_label, source.field_expert_label, source.field_system, source.field_tools)
    bad = BadRows("preference", source.path, config.data.strict)
    counts: Counter = Counter()
    labels: Counter = Counter()
    for row in good_rows(source.path, (), dataset_cache_dir(config), bad, counts):
        try:
            found = read_preference(row.value, fields)
        except BadPreference as err:
            bad.add(row.where, str(err))
            continue
        implicit = found.pop("implicit_prompt")
        record = {"source": "preference", **found, **row.place}
        writer.write(content_digest(record), to_json_line(record), "preference", record["kind"], sample_chars(record))
        counts["pairs" if record["kind"] == "pair" else "unpaired"] += 1
        counts["desirable"] += bool(record.get("desirable"))
        counts["conversational"] += not isinstance(record["prompt"], str)
        counts["implicit_prompt"] += implicit
        labels[record["expert_label"] or ""] += 1
    missing_label = labels.pop("", 0)
    stats["preference_records_read"] += counts["read"]
    for key in ("pairs", "unpaired", "desirable", "conversational", "implicit_prompt"):
        stats[f"preference_{key}"] += counts[key]
    stats["preference_bad_records"] += bad.count
    stats["preference_missing_expert_label"] += missing_label
    stats["expert_labels"] = dict(sorted((Counter(stats["expert_labels"]) + labels).items()))
    stats["sources"].append({"type": "preference", "path": source.path, "records_read": counts["read"],
                             "pairs": counts["pairs"], "unpaired": counts["unpaired"], "bad_records": bad.count})
    bad.report(stats)


def new_stats() -> dict:
    """The kind's counters at zero; ``bad_line_details`` and ``expert_labels`` are shared with the other kinds."""
    return {"preference_records_read": 0, "preference_bad_records": 0, "preference_pairs": 0, "preference_unpaired": 0,
            "preference_desirable": 0, "preference_conversational": 0, "preference_implicit_prompt": 0,
            "preference_missing_expert_label": 0, "bad_line_details": [], "expert_labels": {}}


def summary_lines(stats: dict) -> list[str]:
    """The pairs and unpaired completions made; none when no preference source was read."""
    if not stats["preference_records_read"]:
        return []
    made = stats["samples"].get("preference", {})
    return [f"Created {made.get('pair', 0):,} preference pairs and {made.get('unpaired', 0):,} unpaired completions "
            f"({stats['preference_desirable']:,} desirable; {stats['preference_conversational']:,} conversations, "
            f"{stats['preference_implicit_prompt']:,} with an implicit prompt; {stats['preference_bad_records']:,} bad "
            f"records skipped, {stats['preference_missing_expert_label']:,} without a label)"]


def describe_empty(stats: dict) -> str:
    """How many records were read and how many of them were bad."""
    return f"{stats['preference_records_read']:,} preference records read, {stats['preference_bad_records']:,} bad"


def input_files(source: PreferenceSourceConfig) -> list[Path]:
    """The data files the entry reads (the path itself when it is not a folder)."""
    from moetune.data.tabular import data_files

    path = Path(source.path)
    return data_files(path) if path.is_dir() else [path]


def split_unit(record: dict) -> str:
    """The prompt (with its tools): every pair and completion of one prompt stays on one side of the split."""
    return "preference:" + json.dumps([record.get("prompt"), record.get("tools")], ensure_ascii=False, sort_keys=True)


def routing_group(record: dict) -> str:
    """``label:<expert_label>``, ``label:none`` for a record without one (as chat)."""
    return f"label:{record.get('expert_label') or 'none'}"


SOURCE = SourceKind.from_module(__name__, name="preference", config_class=PreferenceSourceConfig,
                                path_is="file or directory",
                                path_holds="a .jsonl, .json, .parquet or .arrow file of preference records, or a folder "
                                           "of them", evaluation="loss", long_samples="truncate")
