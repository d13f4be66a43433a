"""Source kind `chat`: conversations (OpenAI ``messages`` or ShareGPT ``conversations``), one a record.

Reading the rows is :mod:`moetune.data.tabular` (JSON lines, JSON, parquet, Arrow; a file or a folder);
turning a row into messages and marking the turns that train is :mod:`moetune.data.conversations`. Each
record becomes one ``messages`` sample, rendered by the tokenizer's chat template when it is tokenized
(:mod:`moetune.data.rendering`). A conversation is its own split unit, is grouped by its label like a QA
line, and is evaluated by generating its final assistant turn.

Its records carry ``messages``, ``tools`` (when the record had some), ``train_reasoning`` (when asked),
``expert_label`` (null when the record had none), ``file`` and ``line`` (JSON lines) or ``row``.
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

_ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True)
class ChatSourceConfig:
    """Conversations: OpenAI messages or ShareGPT conversations, in .jsonl, .json, .parquet or .arrow files."""

    path: str = required("A data file, or a folder of them (relative paths resolve against the current directory).")
    type: Literal["chat"] = opt("chat", "Source kind.")
    field_messages: str | None = opt(None, "Field holding each record's conversation; null detects `messages` (OpenAI) "
                                     "or `conversations` (ShareGPT) from each file's first record.")
    role_key: str | None = opt(None, "Key of a message's role; null = `role` (OpenAI) or `from` (ShareGPT).")
    content_key: str | None = opt(None, "Key of a message's text; null = `content` (OpenAI) or `value` (ShareGPT).")
    roles: dict[str, str] = opt({}, "The data's role names -> system, user, assistant or tool, e.g. {bot: assistant}; "
                                "ShareGPT's (human, gpt, observation, function_call) are known.")
    roles_to_train: tuple[str, ...] = opt(("assistant",), "Roles whose turns carry the loss (a message's own "
                                          "`train: true|false` overrides).")
    train_on_turns: Literal["all", "last"] = opt("all", "Train every turn of roles_to_train, or only the last one.")
    train_reasoning: bool = opt(False, "Train the assistant's reasoning as well (where the chat template renders it).")
    label_field: str = opt("expert_label", "Field of a record's label, which groups it in the routing report, ESFT "
                           "and label-guided routing (moe.router_supervision_weight).")
    system_field: str = opt("system", "Field of a record's system prompt (placed first unless the conversation has one).")
    tools_field: str = opt("tools", "Field of a record's tools: a list of JSON schemas (or JSON text of one).")
    weight: float | None = opt(None, "Share of each training epoch this source's samples make (relative to the other "
                               "sources' weights; up- or down-sampled, seeded); null = as many as it has.")

    def __post_init__(self) -> None:
        check(bool(self.path), "data.sources[].path", self.path, "a non-empty path")
        for name, role in self.roles.items():
            check(role in _ROLES, f"data.sources[].roles.{name}", role, f"one of {', '.join(_ROLES)}")
        check(bool(self.roles_to_train) and all(r in _ROLES for r in self.roles_to_train), "data.sources[].roles_to_train",
              list(self.roles_to_train), f"a non-empty list of {', '.join(_ROLES)}")
        check(self.weight is None or self.weight > 0, "data.sources[].weight", self.weight, "greater than 0 or null")


def add_samples(source: ChatSourceConfig, config: Config, writer: SampleWriter, stats: dict) -> None:
    """Write one sample per good record; count and report the bad ones (``data.strict`` stops at the first)."""
    from moetune.data.conversations import (
        BadConversation,
        detect_format,
        mark_trained,
        read_conversation,
        read_tools,
        with_system,
    )
    from moetune.data.records import content_digest, sample_chars, to_json_line
    from moetune.data.sources._rows import BadRows, dataset_cache_dir, good_rows

    bad = BadRows("chat", source.path, config.data.strict)
    counts: Counter = Counter()
    labels: Counter = Counter()
    formats: dict[str, object] = {}
    columns = (source.field_messages,) if source.field_messages else ()
    for row in good_rows(source.path, columns, dataset_cache_dir(config), bad, counts):
        try:
            fmt = formats.get(row.file) or detect_format(row.value, source.field_messages, source.role_key, source.content_key)
            formats[row.file] = fmt
            messages = with_system(read_conversation(row.value, fmt, source.roles), row.value.get(source.system_field))
            messages = mark_trained(messages, source.roles_to_train, source.train_on_turns)
            tools = read_tools(row.value.get(source.tools_field))
            label = _label(row.value.get(source.label_field), source.label_field)
        except BadConversation as err:
            bad.add(row.where, str(err))
            continue
        record = {"messages": messages, **({"tools": tools} if tools else {}),
                  **({"train_reasoning": True} if source.train_reasoning else {}),
                  "source": "chat", "kind": "conversation", "expert_label": label, **row.place}
        writer.write(content_digest(record), to_json_line(record), "chat", "conversation", sample_chars(record))
        counts["conversations"] += 1
        counts["messages"] += len(messages)
        counts["trained_turns"] += sum(m["train"] for m in messages)
        counts["tool_calls"] += sum(len(m.get("tool_calls", ())) for m in messages)
        counts["with_reasoning"] += any("reasoning_content" in m for m in messages)
        labels[label or ""] += 1
    missing_label = labels.pop("", 0)
    for key in ("read", "messages", "trained_turns", "tool_calls", "with_reasoning"):
        stats[f"chat_{key}" if key != "read" else "chat_records_read"] += counts[key]
    stats["chat_bad_records"] += bad.count
    stats["chat_missing_expert_label"] += missing_label
    stats["expert_labels"] = dict(sorted((Counter(stats["expert_labels"]) + labels).items()))
    stats["sources"].append({"type": "chat", "path": source.path, "records_read": counts["read"],
                             "conversations": counts["conversations"], "bad_records": bad.count,
                             "shapes": sorted({fmt.shape for fmt in formats.values()})})
    bad.report(stats)


def _label(value: object, field: str) -> str | None:
    from moetune.data.conversations import BadConversation

    if value is None:
        return None
    if not isinstance(value, str):
        raise BadConversation(f"`{field}` must be a string or null, got {type(value).__name__}")
    return value.strip() or None


def new_stats() -> dict:
    """The kind's counters at zero; ``bad_line_details`` and ``expert_labels`` are shared with the QA kind."""
    return {"chat_records_read": 0, "chat_bad_records": 0, "chat_messages": 0, "chat_trained_turns": 0,
            "chat_tool_calls": 0, "chat_with_reasoning": 0, "chat_missing_expert_label": 0, "bad_line_details": [],
            "expert_labels": {}}


def summary_lines(stats: dict) -> list[str]:
    """The conversations made and what they hold; none when no chat source was read."""
    if not stats["chat_records_read"]:
        return []
    made = stats["samples"].get("chat", {}).get("conversation", 0)
    return [f"Created {made:,} conversations ({stats['chat_messages']:,} messages, {stats['chat_trained_turns']:,} "
            f"trained turns, {stats['chat_tool_calls']:,} tool calls, {stats['chat_with_reasoning']:,} with reasoning; "
            f"{stats['chat_bad_records']:,} bad records skipped, {stats['chat_missing_expert_label']:,} without a label)"]


def describe_empty(stats: dict) -> str:
    """How many records were read and how many of them were bad."""
    return f"{stats['chat_records_read']:,} chat records read, {stats['chat_bad_records']:,} bad"


def input_files(source: ChatSourceConfig) -> list[Path]:
    """The data files the entry reads (the path itself when it is not a folder)."""
    from moetune.data.tabular import source_files

    return source_files(source.path)


def split_unit(record: dict) -> str:
    """The conversation: identical conversations (written once) and their samples stay on one side."""
    from moetune.data.records import content_digest

    return "chat:" + content_digest(record).hex()


def routing_group(record: dict) -> str:
    """``label:<expert_label>``, ``label:none`` for a conversation without one (as QA lines)."""
    return f"label:{record.get('expert_label') or 'none'}"


SOURCE = SourceKind.from_module(__name__, name="chat", config_class=ChatSourceConfig, path_is="file or directory",
                                path_holds="a .jsonl, .json, .parquet or .arrow file of conversations, or a folder of them",
                                evaluation="answer", long_samples="truncate")
