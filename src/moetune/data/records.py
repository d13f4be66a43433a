"""The dataset line format: what one sample looks like on disk, and how it is read back.

Every line of the built JSONL is one JSON object with either ``text`` (plain language-model
samples) or ``prompt`` + ``completion`` (the loss is taken on the completion only), plus
``source`` (``rust_repo`` | ``qa_jsonl``), ``kind`` and the source's metadata:

- rust_repo: ``repo``, ``crate``, ``path`` (relative to the repository root), ``name``,
  ``module``, ``start_line``, ``end_line``; instruction samples add ``item_kind``.
- qa_jsonl: ``expert_label`` (null when the line had none), ``file``, ``line``.
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

    Raises UserError when the file is missing (run `moetune data` first) or a line is not a record.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Dataset {path} does not exist; build it first with `moetune data --config <file>` "
                        "(it writes data.output_path).")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{lineno}: not a JSON line ({err.msg}); rebuild it with `moetune data`.") from None
            if not isinstance(record, dict) or ("text" not in record and "completion" not in record):
                raise UserError(f"{path}:{lineno}: a dataset line needs `text` or `prompt` + `completion`.")
            yield record
