"""Rows of the data files a source points at: JSON lines, JSON, parquet and Arrow, each row named by where it is.

``.jsonl`` files are read line by line (a bad line is reported at its line and the rest still read);
``.json`` holds one array of objects (or JSON lines); ``.parquet`` and ``.arrow`` (a ``datasets``
``save_to_disk`` shard) are read with ``datasets``, memory-mapped and a batch at a time, so a file larger
than memory streams. Local files only: nothing is fetched. A path may be a folder: every such file under
it, in name order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moetune.errors import UserError

SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Row:
    """One row: ``where`` is ``file:line`` (JSON lines) or ``file:row N`` (counted from 1); ``value`` is the parsed
    object, or None with ``problem`` saying why the row could not be read."""

    where: str
    file: str
    number: int
    value: dict[str, Any] | None
    problem: str = ""

    @property
    def place(self) -> dict[str, Any]:
        """The record fields that say where it came from: ``file`` and ``line`` (JSON lines) or ``row``."""
        return {"file": self.file, ("line" if self.file.endswith(".jsonl") else "row"): self.number}


class MissingColumn(UserError):
    """A tabular file without a column the source maps."""


def data_files(path: str | Path) -> list[Path]:
    """``path`` itself, or every data file under the folder ``path`` (sorted). A UserError when there is none."""
    path = Path(path)
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise UserError(f"{path}: not a data file moetune reads ({', '.join(SUFFIXES)}).")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES and not p.name.startswith("."))
    if not files:
        raise UserError(f"{path} holds no data file ({', '.join(SUFFIXES)}).")
    return files


def source_files(path: str | Path) -> list[Path]:
    """The files a source entry reads: the data files under the folder ``path``, or ``path`` itself when it is
    not a folder (its reader then says what is wrong with it)."""
    path = Path(path)
    return data_files(path) if path.is_dir() else [path]


def read_rows(path: Path, columns: Sequence[str] = (), cache_dir: str | Path | None = None) -> Iterator[Row]:
    """The rows of one data file, in order. ``columns``: names a tabular file must have (MissingColumn otherwise;
    JSON rows are checked row by row by their reader)."""
    if path.suffix == ".jsonl":
        yield from _json_lines(path)
    elif path.suffix == ".json":
        yield from _json_file(path)
    else:
        yield from _arrow_rows(path, columns, cache_dir)


def _json_lines(path: Path) -> Iterator[Row]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1:
                raw = raw.removeprefix(_BOM)
            if not raw.strip():
                continue
            yield _parsed(raw, f"{path}:{number}", str(path), number)


def _json_file(path: Path) -> Iterator[Row]:
    raw = path.read_bytes().removeprefix(_BOM)
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        yield from _json_lines(path)  # a .json file of JSON lines
        return
    if not isinstance(value, list):
        raise UserError(f"{path}: a .json data file holds an array of objects (or JSON lines), got a JSON "
                        f"{type(value).__name__}.")
    for number, item in enumerate(value, 1):
        yield Row(f"{path}: row {number}", str(path), number, item if isinstance(item, dict) else None,
                  "" if isinstance(item, dict) else f"expected a JSON object, got {type(item).__name__}")


def _parsed(raw: bytes, where: str, file: str, number: int) -> Row:
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        return Row(where, file, number, None, f"not valid UTF-8 (byte {err.start})")
    except json.JSONDecodeError as err:
        return Row(where, file, number, None, f"invalid JSON ({err.msg} at column {err.colno})")
    except RecursionError:
        return Row(where, file, number, None, "invalid JSON (nested too deeply)")
    if not isinstance(value, dict):
        return Row(where, file, number, None, f"expected a JSON object, got {type(value).__name__}")
    return Row(where, file, number, value)


def _arrow_rows(path: Path, columns: Sequence[str], cache_dir: str | Path | None) -> Iterator[Row]:
    from datasets import Dataset

    try:
        if path.suffix == ".arrow":
            dataset = Dataset.from_file(str(path))
        else:
            dataset = Dataset.from_parquet(str(path), cache_dir=str(cache_dir) if cache_dir else None)
    except Exception as err:  # pyarrow and datasets raise many types for a file that is not what its name says
        raise UserError(f"{path}: cannot be read as {path.suffix[1:]} ({type(err).__name__}: {err}).") from None
    missing = [name for name in columns if name not in dataset.column_names]
    if missing:
        raise MissingColumn(f"{path}: no column {', '.join(repr(m) for m in missing)} (its columns: "
                            f"{', '.join(dataset.column_names)}); map the data's own with the source's field options.")
    number = 0
    for batch in dataset.iter(batch_size=1000):
        for i in range(len(next(iter(batch.values()), []))):
            number += 1
            yield Row(f"{path}: row {number}", str(path), number, {key: values[i] for key, values in batch.items()})
