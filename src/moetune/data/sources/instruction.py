"""Source kind `instruction`: Alpaca-style records (``instruction``, ``input``, ``output``, optional ``system``).

Each record becomes a conversation (the system prompt, the instruction and its input as the user turn,
the output as the trained assistant turn), rendered by the tokenizer's chat template like any ``chat``
record. For a tokenizer without one it also carries the ``prompt_template`` rendering as ``prompt`` +
``completion``, which is then used instead (:mod:`moetune.data.rendering`). Grouped by its label and
evaluated by generating the output, as QA lines are.

Its records carry ``messages``, ``prompt`` and ``completion``, ``expert_label`` (null when the record had
none), ``file`` and ``line`` (JSON lines) or ``row``.
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

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


@dataclass(frozen=True)
class InstructionSourceConfig:
    """Alpaca-style instructions (instruction, input, output, system) in .jsonl, .json, .parquet or .arrow files."""

    path: str = required("A data file, or a folder of them (relative paths resolve against the current directory).")
    type: Literal["instruction"] = opt("instruction", "Source kind.")
    field_instruction: str = opt("instruction", "Column of the instruction (the request).")
    field_input: str = opt("input", "Column of the optional input the instruction works on (may be absent or empty).")
    field_output: str = opt("output", "Column of the answer: the trained turn.")
    field_system: str = opt("system", "Column of the optional system prompt.")
    label_field: str = opt("expert_label", "Column of a record's label (routing report, ESFT, label-guided routing).")
    prompt_template: str = opt(ALPACA_PROMPT, "Prompt for a tokenizer without a chat template, with {instruction} and "
                               "{input}; the output follows it. A system prompt goes first, then a blank line.")
    prompt_template_no_input: str = opt(ALPACA_PROMPT_NO_INPUT, "prompt_template for records with an empty input.")
    weight: float | None = opt(None, "Share of each training epoch this source's samples make (relative to the other "
                               "sources' weights; up- or down-sampled, seeded); null = as many as it has.")

    def __post_init__(self) -> None:
        check(bool(self.path), "data.sources[].path", self.path, "a non-empty path")
        check("{instruction}" in self.prompt_template and "{input}" in self.prompt_template,
              "data.sources[].prompt_template", self.prompt_template, "a template containing {instruction} and {input}")
        check("{instruction}" in self.prompt_template_no_input, "data.sources[].prompt_template_no_input",
              self.prompt_template_no_input, "a template containing {instruction}")
        check(self.weight is None or self.weight > 0, "data.sources[].weight", self.weight, "greater than 0 or null")


def add_samples(source: InstructionSourceConfig, config: Config, writer: SampleWriter, stats: dict) -> None:
    """Write one sample per good record; count and report the bad ones (``data.strict`` stops at the first)."""
    from moetune.data.records import content_digest, sample_chars, to_json_line
    from moetune.data.sources._rows import BadRows, dataset_cache_dir, good_rows

    bad = BadRows("instruction", source.path, config.data.strict)
    counts: Counter = Counter()
    labels: Counter = Counter()
    columns = (source.field_instruction, source.field_output)
    for row in good_rows(source.path, columns, dataset_cache_dir(config), bad, counts):
        try:
            record = _record(row.value, source)
        except ValueError as err:
            bad.add(row.where, str(err))
            continue
        record.update(row.place)
        writer.write(content_digest(record), to_json_line(record), "instruction", "instruction", sample_chars(record))
        counts["made"] += 1
        labels[record["expert_label"] or ""] += 1
    missing_label = labels.pop("", 0)
    stats["instruction_records_read"] += counts["read"]
    stats["instruction_bad_records"] += bad.count
    stats["instruction_missing_expert_label"] += missing_label
    stats["expert_labels"] = dict(sorted((Counter(stats["expert_labels"]) + labels).items()))
    stats["sources"].append({"type": "instruction", "path": source.path, "records_read": counts["read"],
                             "instructions": counts["made"], "bad_records": bad.count})
    bad.report(stats)


def _record(row: dict, source: InstructionSourceConfig) -> dict:
    """The conversation (and prompt/completion fallback) of one row; ValueError naming what is wrong."""
    instruction, output = (_text(row, field, required=True) for field in (source.field_instruction, source.field_output))
    given, system = _text(row, source.field_input), _text(row, source.field_system)
    label = row.get(source.label_field)
    if label is not None and not isinstance(label, str):
        raise ValueError(f"`{source.label_field}` must be a string or null, got {type(label).__name__}")
    request = instruction + ("\n\n" + given if given else "")
    messages = ([{"role": "system", "content": system, "train": False}] if system else []) + [
        {"role": "user", "content": request, "train": False}, {"role": "assistant", "content": output, "train": True}]
    template = source.prompt_template if given else source.prompt_template_no_input
    prompt = (system + "\n\n" if system else "") + template.replace("{instruction}", instruction).replace("{input}", given)
    return {"messages": messages, "prompt": prompt, "completion": output, "source": "instruction", "kind": "instruction",
            "expert_label": (label or "").strip() or None}


def _text(row: dict, field: str, required: bool = False) -> str:
    value = row.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise ValueError(f"{'missing' if value is None else 'empty'} `{field}`")
        return ""
    if not isinstance(value, str):
        raise ValueError(f"`{field}` must be a string, got {type(value).__name__}")
    return value.strip()


def new_stats() -> dict:
    """The kind's counters at zero; ``bad_line_details`` and ``expert_labels`` are shared with the QA kind."""
    return {"instruction_records_read": 0, "instruction_bad_records": 0, "instruction_missing_expert_label": 0,
            "bad_line_details": [], "expert_labels": {}}


def summary_lines(stats: dict) -> list[str]:
    """The instruction samples made and the bad records skipped; none when no instruction source was read."""
    if not stats["instruction_records_read"]:
        return []
    made = stats["samples"].get("instruction", {}).get("instruction", 0)
    return [f"Created {made:,} instruction samples ({stats['instruction_bad_records']:,} bad records skipped, "
            f"{stats['instruction_missing_expert_label']:,} without a label)"]


def describe_empty(stats: dict) -> str:
    """How many records were read and how many of them were bad."""
    return f"{stats['instruction_records_read']:,} instruction records read, {stats['instruction_bad_records']:,} bad"


def input_files(source: InstructionSourceConfig) -> list[Path]:
    """The data files the entry reads (the path itself when it is not a folder)."""
    from moetune.data.tabular import source_files

    return source_files(source.path)


def split_unit(record: dict) -> str:
    """The request (system prompt, instruction and input): one asked twice cannot be on both sides."""
    return "instruction:" + "\x00".join(m["content"] for m in record.get("messages", [])[:-1])


def routing_group(record: dict) -> str:
    """``label:<expert_label>``, ``label:none`` for a record without one (as QA lines)."""
    return f"label:{record.get('expert_label') or 'none'}"


SOURCE = SourceKind.from_module(__name__, name="instruction", config_class=InstructionSourceConfig,
                                path_is="file or directory",
                                path_holds="a .jsonl, .json, .parquet or .arrow file of instructions, or a folder of them",
                                evaluation="answer", long_samples="truncate")
