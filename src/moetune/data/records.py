"""The dataset line format: what one sample looks like on disk, and how it is read back.

Every line of the built JSONL is one JSON object with one content shape, plus ``source`` (the source kind
that wrote it: a name of :data:`moetune.plugins.SOURCE_MODULES`), ``kind`` and the source's metadata, which
the kind's module in :mod:`moetune.data.sources` lists. The shapes:

- ``text``: plain language-model samples (the loss is on every token);
- ``prompt`` + ``completion``: the loss is on the completion only;
- ``messages``: a conversation (see :mod:`moetune.data.conversations` for the message fields), rendered by
  the tokenizer's chat template when it is tokenized; the loss is on the messages whose ``train`` is true.
  Optional ``tools`` (JSON schemas) and ``train_reasoning``. A record may also carry ``prompt`` +
  ``completion``, used when the tokenizer has no chat template (instructions).
- preference (``source: preference``, :mod:`moetune.data.sources.preference`): ``prompt`` + ``chosen`` +
  ``rejected`` (``kind: pair``) or ``prompt`` + ``completion`` + ``desirable`` (``kind: unpaired``), each part a
  string or a list of messages. Such a record is never one sample: it becomes one per side
  (:mod:`moetune.data.preference_sides`), and only a preference objective trains on it.

How each shape becomes tokens and labels is :mod:`moetune.data.rendering`. With ``weight`` on the sources,
every record also carries ``entry``, the index of its source in ``data.sources`` (:mod:`moetune.data.mixing`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moetune.errors import UserError

# Characters per token used wherever no tokenizer exists yet (the file-level chunk budget and the
# token figures in the stats; data.chars_per_token overrides it). Measured on rust-src file-level
# samples with byte-level BPEs trained on 8 MB of them: 2.89 characters per token at 4,096 entries,
# 3.38 at 32,000. A chunk that still comes out too long is cut into windows when it is tokenized.
DEFAULT_CHARS_PER_TOKEN = 3.0

PREFERENCE_PARTS = ("prompt", "chosen", "rejected")
"""The content fields of a preference pair (an unpaired one has ``prompt`` and ``completion``)."""


def sample_chars(record: dict[str, Any]) -> int:
    """Characters of model input in a record (text, prompt plus completion, a conversation's contents, or a
    preference record's prompt and completions)."""
    if "messages" in record:
        return _messages_chars(record["messages"])
    if "text" in record:
        return len(record["text"])
    return sum(len(part) if isinstance(part, str) else _messages_chars(part)
               for part in (record[name] for name in PREFERENCE_PARTS + ("completion",) if name in record))


def _messages_chars(messages: list[dict]) -> int:
    return sum(len(m.get("content") or "") + len(m.get("reasoning_content") or "") for m in messages)


def is_preference(record: dict[str, Any]) -> bool:
    """Whether a dataset record is a preference record (a pair, or an unpaired completion with its label)."""
    return "chosen" in record or "desirable" in record


def record_text(record: dict[str, Any]) -> str:
    """All the text a record holds, in reading order: what a tokenizer trained on the data learns from."""
    if is_preference(record):
        parts = [record[name] for name in PREFERENCE_PARTS + ("completion",) if name in record]
        return "\n".join(part if isinstance(part, str) else record_text({"messages": part}) for part in parts)
    if "messages" in record:
        # Tool schemas and calls are rendered as JSON: a tokenizer that never saw them spends a token per character.
        calls = [json.dumps(m["tool_calls"], ensure_ascii=False) for m in record["messages"] if m.get("tool_calls")]
        tools = [json.dumps(record["tools"], ensure_ascii=False)] if record.get("tools") else []
        parts = [part for m in record["messages"] for part in (m.get("reasoning_content"), m.get("content")) if part]
        return "\n".join(tools + parts + calls)
    if "text" in record:
        return record["text"]
    return record["prompt"] + record["completion"]


def estimate_tokens(chars: int, chars_per_token: float = DEFAULT_CHARS_PER_TOKEN) -> int:
    """Token count estimated from a character count (rounded up)."""
    return math.ceil(chars / chars_per_token)


def content_digest(record: dict[str, Any]) -> bytes:
    """16-byte hash of what the model sees; two records with equal digests are exact duplicates."""
    if is_preference(record):
        parts = [record.get(name) for name in (*PREFERENCE_PARTS, "completion", "desirable", "tools")]
        content = json.dumps(parts, ensure_ascii=False, sort_keys=True)
    elif "messages" in record:
        content = json.dumps([record["messages"], record.get("tools")], ensure_ascii=False, sort_keys=True)
    elif "text" in record:
        content = record["text"]
    else:
        content = record["prompt"] + "\x00" + record["completion"]
    return hashlib.blake2b(content.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def to_json_line(record: dict[str, Any]) -> str:
    """One JSONL line (keys in insertion order, UTF-8 kept readable) with its newline."""
    return json.dumps(record, ensure_ascii=False) + "\n"


def read_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Stream the records of a built dataset file.

    Raises UserError when the file is missing (run `moetune data` first) or a line is not a record
    (not UTF-8, not JSON, or without string ``text`` / ``prompt`` + ``completion``), naming file:line.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Dataset {path} does not exist; build it first with `moetune data --config <file>` "
                        "(it writes data.output_path).")
    # Bytes, decoded line by line: a file that is not UTF-8 text is then reported at its line.
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"{where}: not UTF-8 text (byte {err.start + 1} of the line); is data.output_path "
                                "a dataset built by `moetune data`?") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{where}: not a JSON line ({err.msg}); rebuild it with `moetune data`.") from None
            check_record(record, where)
            yield record


def check_record(record: Any, where: str) -> None:
    """A dataset line is an object with a string ``text``, string ``prompt`` and ``completion``, a list of
    ``messages`` (objects with a string ``role``), or a preference record's parts (strings or lists)."""
    expected = "a dataset line needs `text` (a string), `prompt` + `completion` (strings) or `messages` (a list)"
    if not isinstance(record, dict):
        raise UserError(f"{where}: {expected}; got a JSON {_json_type(record)}.")
    if is_preference(record):
        names = PREFERENCE_PARTS if "chosen" in record else ("prompt", "completion")
        for name in names:
            if not isinstance(record.get(name), (str, list)):
                found = "missing" if name not in record else f"a JSON {_json_type(record[name])}"
                raise UserError(f"{where}: a preference record needs {', '.join(f'`{n}`' for n in names)} (strings or "
                                f"lists of messages); `{name}` is {found}; rebuild it with `moetune data`.")
        return
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise UserError(f"{where}: {expected}; `messages` must be a list of objects with a `role`.")
        return
    fields = ("text",) if "text" in record else ("prompt", "completion")
    for name in fields:
        if name not in record:
            present = ", ".join(f"`{key}`" for key in list(record)[:8]) or "none"
            raise UserError(f"{where}: {expected}; `{name}` is missing (keys: {present}).")
        if not isinstance(record[name], str):
            raise UserError(f"{where}: {expected}; `{name}` is a JSON {_json_type(record[name])}.")


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
