"""The dataset line format: what one sample looks like on disk, and how it is read back.

Every line of the built JSONL is one JSON object with either ``text`` (plain language-model
samples) or ``prompt`` + ``completion`` (the loss is taken on the completion only), plus
``source`` (the source kind that wrote it: a name of :data:`moetune.plugins.SOURCE_MODULES`),
``kind`` and the source's metadata, which the kind's module in :mod:`moetune.data.sources` lists.
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


def sample_chars(record: dict[str, Any]) -> int:
    """Characters of model input in a record (text, or prompt plus completion)."""
    if "text" in record:
        return len(record["text"])
    return len(record["prompt"]) + len(record["completion"])


def estimate_tokens(chars: int, chars_per_token: float = DEFAULT_CHARS_PER_TOKEN) -> int:
    """Token count estimated from a character count (rounded up)."""
    return math.ceil(chars / chars_per_token)


def content_digest(record: dict[str, Any]) -> bytes:
    """16-byte hash of what the model sees; two records with equal digests are exact duplicates."""
    if "text" in record:
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
            _check_record(record, where)
            yield record


def _check_record(record: Any, where: str) -> None:
    """A dataset line is an object with a string ``text``, or string ``prompt`` and ``completion``."""
    expected = "a dataset line needs `text` (a string) or `prompt` + `completion` (strings)"
    if not isinstance(record, dict):
        raise UserError(f"{where}: {expected}; got a JSON {_json_type(record)}.")
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
