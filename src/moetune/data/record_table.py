"""The built dataset as memory-mapped Arrow tables, split by unit: what the trainer reads, whatever its size.

``datasets`` reads ``data.output_path`` once into an Arrow file (kept in the dataset's ``.cache`` folder
and memory-mapped), one row per line; a second pass notes each record's split rank, source ``entry``
and label in small columns. The split, the weighted mixture and the encoding then work on row indices
and those columns, so no record is ever held in a Python list: the memory a run needs before its
first step does not grow with the number of records (docs/benchmarks.md). The split is exactly
:func:`moetune.data.split.split_records`'s: the units are ranked by the same seeded hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moetune.config.schema import Config
from moetune.errors import UserError

# Datasets smaller than this are read in well under a second: no progress bars for them.
QUIET_BELOW_BYTES = 64 * 2**20
# Below this many lines per process, starting processes costs more than it saves.
MIN_LINES_PER_PROCESS = 50_000


@dataclass(frozen=True)
class SplitTables:
    """``train`` and ``validation``: ``datasets.Dataset`` views of the built dataset's rows (columns ``json``, the line;
    ``entry``, the index of the source that wrote it or -1; ``label``, its ``expert_label`` or None; ``digest``, a hash
    of the line, so a cache key over the records need not read them again)."""

    train: Any
    validation: Any


def load_split_tables(config: Config, cache_dir: str | Path | None = None) -> SplitTables:
    """``data.output_path`` (its first ``data.max_samples`` records when set) split by ``validation.validation_split``
    and ``training.seed``, as Arrow tables. ``cache_dir`` defaults to ``<dataset folder>/.cache``.

    Raises UserError when the dataset is missing or a line is not a record (naming file:line).
    """
    path = Path(config.data.output_path)
    if not path.is_file():
        raise UserError(f"Dataset {path} does not exist; build it first with `moetune data --config <file>` "
                        "(it writes data.output_path).")
    cache = Path(cache_dir) if cache_dir is not None else path.parent / ".cache"
    with _progress_bars(path.stat().st_size >= QUIET_BELOW_BYTES):
        return _split_tables(config, path, cache)


def _split_tables(config: Config, path: Path, cache: Path) -> SplitTables:
    import numpy as np
    import pyarrow.compute as pc
    from datasets import Dataset, concatenate_datasets

    try:
        lines = Dataset.from_text(str(path), cache_dir=str(cache / "lines"), keep_in_memory=False)
    except Exception:  # not UTF-8 text (datasets wraps the error): reading it line by line names the line
        from moetune.data.records import read_records

        for _ in read_records(path):
            pass
        raise
    # Worker processes read the lines for the large datasets, so this process never touches their mapped pages.
    processes = min(config.data.num_workers or os.cpu_count() or 1, len(lines) // MIN_LINES_PER_PROCESS)
    facts = lines.map(_record_facts, batched=True, batch_size=1000, with_indices=True, remove_columns=["text"],
                      num_proc=processes if processes > 1 else None,
                      fn_kwargs={"path": str(path), "seed": config.training.seed}, desc="Reading records")
    table = concatenate_datasets([lines.rename_column("text", "json"), facts], axis=1)
    ranks = facts.data.column("rank")
    positions = np.flatnonzero(pc.not_equal(ranks, "").to_numpy(zero_copy_only=False))  # blank lines are no record
    if config.data.max_samples is not None:
        positions = positions[:config.data.max_samples]
    kept = ranks.take(positions)
    units = pc.unique(kept).sort()
    n_val = round(len(units) * config.validation.validation_split)
    if config.validation.validation_split > 0 and n_val == 0 and len(units) > 1:
        n_val = 1
    held_out = pc.is_in(kept, value_set=units[:n_val]).to_numpy(zero_copy_only=False)
    columns = ["json", "entry", "label", "digest"]
    return SplitTables(table.select(positions[~held_out]).select_columns(columns),
                       table.select(positions[held_out]).select_columns(columns))


@contextlib.contextmanager
def _progress_bars(shown: bool) -> Iterator[None]:
    """``datasets``' progress bars on or off for a while (a small dataset is read before a bar could say anything)."""
    import datasets as bars

    was_off = bars.are_progress_bars_disabled()
    if shown or was_off:
        yield
        return
    bars.disable_progress_bars()
    try:
        yield
    finally:
        bars.enable_progress_bars()


def table_records(table) -> list[dict]:
    """The records of a table as dicts (for the small tables evaluation reads)."""
    return [json.loads(line) for line in table["json"]]


def iter_records(table, batch_size: int = 1000):
    """The records of a table as dicts, a batch at a time."""
    for batch in table.iter(batch_size=batch_size):
        yield from (json.loads(line) for line in batch["json"])


def _record_facts(batch: dict[str, list], indices: list[int], path: str, seed: int) -> dict[str, list]:
    from moetune.data.records import check_record
    from moetune.data.split import ranked, split_unit

    out: dict[str, list] = {"rank": [], "entry": [], "label": [], "digest": []}
    for line, index in zip(batch["text"], indices, strict=True):
        out["digest"].append(hashlib.blake2b(line.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest())
        if not line.strip():
            out["rank"].append("")
            out["entry"].append(-1)
            out["label"].append(None)
            continue
        where = f"{path}:{index + 1}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: not a JSON line ({err.msg}); rebuild it with `moetune data`.") from None
        check_record(record, where)
        out["rank"].append(ranked(split_unit(record), seed).hex())
        entry = record.get("entry")
        out["entry"].append(entry if isinstance(entry, int) else -1)
        label = record.get("expert_label")
        out["label"].append(label if isinstance(label, str) and label else None)
    return out
