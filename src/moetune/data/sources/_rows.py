"""What the kinds that read data files (chat, instruction, text) share: their rows, and their bad ones.

A bad row is never dropped silently: under ``data.strict`` the first one stops the build with a UserError
naming its file and line (or row); otherwise each is counted, the first ones printed, and up to
MAX_BAD_IN_STATS kept in the stats file's ``bad_line_details`` (which the QA kind fills the same way).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

from moetune.errors import UserError

MAX_BAD_PRINTED = 20
MAX_BAD_IN_STATS = 1000


class BadRows:
    """The bad rows of one source entry."""

    def __init__(self, kind: str, path: str, strict: bool):
        self.kind, self.path, self.strict = kind, path, strict
        self.details: list[str] = []
        self.count = 0

    def add(self, where: str, reason: str) -> None:
        """One bad row: a UserError under strict, else counted (and its first MAX_BAD_IN_STATS described)."""
        if self.strict:
            raise UserError(f"{where}: {reason} (data.strict is true, so the build stops at the first bad record; set "
                            "data.strict: false to skip and count bad records instead).")
        self.count += 1
        if len(self.details) < MAX_BAD_IN_STATS:
            self.details.append(f"{where}: {reason}")

    def report(self, stats: dict) -> None:
        """Print the first bad rows and add them to ``stats["bad_line_details"]``."""
        for detail in self.details[:MAX_BAD_PRINTED]:
            print(f"skipped bad record {detail}", file=sys.stderr)
        if self.count > MAX_BAD_PRINTED:
            print(f"... and {self.count - MAX_BAD_PRINTED} more bad records in {self.path} (listed in the stats file)",
                  file=sys.stderr)
        room = MAX_BAD_IN_STATS - len(stats["bad_line_details"])
        stats["bad_line_details"].extend(self.details[:max(room, 0)])


def good_rows(path: str, columns: tuple[str, ...], cache_dir: Path, bad: BadRows, counts: dict) -> Iterator:
    """The readable rows (:class:`moetune.data.tabular.Row`) of every data file under ``path``; rows that are not
    JSON objects, and files missing a mapped column, go to ``bad``. ``counts["read"]`` counts every row."""
    from moetune.data.tabular import MissingColumn, data_files, read_rows

    for file in data_files(path):
        try:
            for row in read_rows(file, columns, cache_dir):
                counts["read"] = counts.get("read", 0) + 1
                if row.value is None:
                    bad.add(row.where, row.problem)
                    continue
                yield row
        except MissingColumn as err:
            bad.add(str(file), str(err).removeprefix(f"{file}: "))


def dataset_cache_dir(config) -> Path:
    """Where a build keeps ``datasets``' copies of parquet files: beside the dataset, like the tokenized cache."""
    return Path(config.data.output_path).parent / ".cache" / "sources"
