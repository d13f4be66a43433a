"""Train/validation split of the built dataset, by source unit, deterministic in the seed.

Each source kind names the unit of its records (:attr:`SourceKind.split_unit`): all samples cut from
one Rust source file (its file-level chunks, items and instruction samples) land on the same side,
so validation never scores code the model trained on; a QA sample's unit is its prompt (the
question), so a question repeated with another label cannot leak either. A record of a kind that is
not registered is a unit by its text.
The assignment depends only on the seed and the units' names, never on file order or Python's
hash seed: the same dataset and seed give the same split on every machine.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable
from typing import Any

from moetune.config.schema import Config
from moetune.data.records import read_records
from moetune.data.sources import record_kind, unit_by_text


def split_unit(record: dict[str, Any]) -> str:
    """The name of the unit a record belongs to; a unit is never divided between train and validation."""
    kind = record_kind(record)
    return kind.split_unit(record) if kind is not None else unit_by_text(record)


def split_records(records: Iterable[dict[str, Any]], validation_split: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, validation) records; about ``validation_split`` of the *units* go to validation.

    With a positive split and at least two units, validation gets at least one unit. Records keep
    their dataset order on each side.
    """
    records = list(records)
    unit_of = [split_unit(r) for r in records]
    units = sorted(set(unit_of), key=lambda unit: ranked(unit, seed))
    n_val = round(len(units) * validation_split)
    if validation_split > 0 and n_val == 0 and len(units) > 1:
        n_val = 1
    val_units = set(units[:n_val])
    train, val = [], []
    for record, unit in zip(records, unit_of, strict=True):
        (val if unit in val_units else train).append(record)
    return train, val


def load_splits(config: Config) -> tuple[list[dict], list[dict]]:
    """Read ``data.output_path`` (its first ``data.max_samples`` records when set) and split it by
    ``validation.validation_split`` and ``training.seed``.

    Returns (train_records, val_records): lists of the dataset's JSON objects (see
    :mod:`moetune.data.records` for their fields). Raises UserError when the dataset is missing.
    """
    records = itertools.islice(read_records(config.data.output_path), config.data.max_samples)
    return split_records(records, config.validation.validation_split, config.training.seed)


def ranked(unit: str, seed: int) -> bytes:
    """A unit's place in the seeded order the split takes validation units from."""
    # A keyed hash is a seeded shuffle that does not depend on the other units.
    return hashlib.blake2b(unit.encode("utf-8", "surrogatepass"), digest_size=16, key=str(seed).encode()).digest()
