"""`moetune data`: every source in ``data.sources`` -> one JSONL dataset plus its stats file.

Samples stream straight to a temporary file beside the output, exact duplicates are dropped by
content hash on the way, and only a build that finishes renames the files into place, so a failed
or interrupted build never leaves a half-written dataset where a good one was. The stats file
records what the build read (``build_inputs``), so :func:`build_dataset_unless_current` can tell
a dataset that still matches its sources from a stale one. How each source kind reads its samples
and what it counts are its module's (:mod:`moetune.data.sources`); nothing here depends on a kind.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from moetune.config.loader import config_to_dict
from moetune.config.schema import Config
from moetune.data.records import estimate_tokens
from moetune.data.sources import SourceKind, registered_kinds, source_kind
from moetune.errors import UserError


def stats_path_for(output_path: str | Path) -> Path:
    """``data/all_data.jsonl`` -> ``data/all_data.stats.json``."""
    output_path = Path(output_path)
    return output_path.with_name(output_path.stem + ".stats.json")


def build_dataset(config: Config) -> int:
    """Build ``data.output_path`` and its stats file from ``data.sources``; print a summary. Returns 0.

    Raises UserError for a missing source path, a bad line under ``data.strict``, or a build that
    produced no sample at all.
    """
    data = config.data
    if not data.sources:
        raise UserError("data.sources is empty: add at least one source, e.g. "
                        "{type: rust_repo, path: ./my-crate} or {type: qa_jsonl, path: data/sample_qa.jsonl}.")
    for i, source in enumerate(data.sources):
        _check_path(source_kind(source.type), source.path, f"data.sources[{i}].path")
    output = Path(data.output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    kinds = registered_kinds()
    stats = _new_stats(data.chars_per_token, kinds)
    stats["build_inputs"] = build_inputs(config)  # before reading: a source changed meanwhile makes it stale
    started = time.perf_counter()
    _remove_stale_tmp_files(output)
    tmp_output, tmp_stats = (output.with_name(f"{prefix}{os.getpid()}") for prefix in _tmp_prefixes(output))
    with _exit_cleanly_on_termination(), _removed_unless_renamed(tmp_output, tmp_stats):
        with tmp_output.open("w", encoding="utf-8", newline="\n") as out:
            writer = _DedupWriter(out, stats)
            weighted = any(getattr(source, "weight", None) is not None for source in data.sources)
            for entry, source in enumerate(data.sources):
                writer.entry = entry if weighted else None  # weights mix by entry (moetune.data.mixing)
                source_kind(source.type).add_samples(source, config, writer, stats)
        stats["estimated_tokens"] = estimate_tokens(stats["characters"], data.chars_per_token)
        stats["samples"] = {source: dict(sorted(counts.items())) for source, counts in stats["samples"].items()}
        if stats["samples_total"] == 0:
            read = dict.fromkeys(source_kind(source.type).describe_empty(stats) for source in data.sources)
            raise UserError(f"The build produced no samples: {'; '.join(read)}. Check data.sources.")
        tmp_stats.write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp_output, output)
        os.replace(tmp_stats, stats_path_for(output))
    _print_summary(stats, kinds, output, time.perf_counter() - started)
    return 0


def build_inputs(config: Config) -> dict | None:
    """What a build of ``data.output_path`` read and how, as plain JSON: the data settings and each source
    file's size and modification time. None when that cannot be told cheaply: a source whose kind cannot
    list its input files (a rust_repo: any file under it may change) or a source file that is missing."""
    files = []
    for source in config.data.sources:
        list_files = source_kind(source.type).input_files
        if list_files is None:
            return None
        for path in list_files(source):
            if not path.is_file():
                return None
            stat = path.stat()
            files.append({"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    # Keys that only matter after the build (which samples are used, how they are tokenized) are left out.
    settings = {key: value for key, value in config_to_dict(config.data).items()
                if key not in ("output_path", "num_workers", "packing", "max_samples", "max_target_length", "long_samples",
                               "chat_template")}
    return json.loads(json.dumps({"files": files, "settings": settings}))


def dataset_is_current(config: Config) -> bool:
    """Whether ``data.output_path`` was built from ``data.sources`` as they are now, with these settings."""
    inputs = build_inputs(config)
    output = Path(config.data.output_path)
    if inputs is None or not output.is_file():
        return False
    try:
        stats = json.loads(stats_path_for(output).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(stats, dict) and stats.get("build_inputs") == inputs


def build_dataset_unless_current(config: Config) -> int:
    """:func:`build_dataset`, unless :func:`dataset_is_current`. Returns 0.

    Several processes of one launch may call it at once: a lock beside the dataset lets the first
    build while the others wait, and then find the dataset current.
    """
    from filelock import FileLock

    output = Path(config.data.output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(output.with_name(f".{output.name}.lock"))):
        if dataset_is_current(config):
            print(f"data: {output} is up to date with data.sources; not rebuilt", file=sys.stderr)
            return 0
        return build_dataset(config)


def _tmp_prefixes(output: Path) -> list[str]:
    return [f".{output.name}.tmp-", f".{stats_path_for(output).name}.tmp-"]


def _remove_stale_tmp_files(output: Path) -> None:
    """Delete temporary files left beside ``output`` by builds whose process no longer exists (killed with -9)."""
    prefixes = _tmp_prefixes(output)
    try:
        names = os.listdir(output.parent)
    except OSError:
        return
    for name in names:
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        pid = name[len(prefix):] if prefix else ""
        if pid.isdigit() and int(pid) != os.getpid() and not _process_exists(int(pid)):
            (output.parent / name).unlink(missing_ok=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


@contextmanager
def _removed_unless_renamed(*paths: Path) -> Iterator[None]:
    try:
        yield
    finally:
        for path in paths:
            path.unlink(missing_ok=True)


@contextmanager
def _exit_cleanly_on_termination() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into SystemExit while building, so `finally` blocks remove the temporary files.

    By default those signals end the process on the spot and leave the files behind.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    owner = os.getpid()

    def _exit(signum: int, frame) -> None:
        if os.getpid() != owner:  # a forked worker: die as the signal would have it
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise SystemExit(128 + signum)

    wanted = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {signum: signal.signal(signum, _exit) for signum in wanted}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class _DedupWriter:
    """Write JSON lines, dropping any whose content hash was already written."""

    def __init__(self, out: IO[str], stats: dict):
        self.out, self.stats, self.seen = out, stats, set()
        self.entry: int | None = None  # when set, written into every record as `entry`

    def write_file_samples(self, samples: list[tuple[bytes, str, str, int]], source: str,
                           breadth: Mapping[str, int]) -> None:
        """Write one file's ``(digest, line, kind, chars)`` samples; of identical ones, the sample whose kind has
        the smallest ``breadth`` (function over impl over file; 0 when not listed) is kept, with its name and
        lines, in its own place.

        Identical samples of different kinds come from one file (file chunks carry the path in their
        header; a one-method impl and its method are found together), so across files the first
        one written is kept.
        """
        kept: dict[bytes, int] = {}
        for index, (digest, _, kind, _) in enumerate(samples):
            best = kept.get(digest)
            if best is None or breadth.get(kind, 0) < breadth.get(samples[best][2], 0):
                kept[digest] = index
        for index, (digest, line, kind, chars) in enumerate(samples):
            if kept[digest] == index:
                self.write(digest, line, source, kind, chars)
            else:
                self.stats["duplicates_removed"] += 1

    def write(self, digest: bytes, line: str, source: str, kind: str, chars: int) -> None:
        """Write one sample unless one with the same content hash was written."""
        if digest in self.seen:
            self.stats["duplicates_removed"] += 1
            return
        self.seen.add(digest)
        if self.entry is not None:  # the kind wrote one JSON object: add its source's index before the closing brace
            line = f'{line.rstrip().removesuffix("}")}, "entry": {self.entry}}}\n'
        self.out.write(line)
        samples = self.stats["samples"].setdefault(source, {})
        samples[kind] = samples.get(kind, 0) + 1
        self.stats["samples_total"] += 1
        self.stats["characters"] += chars


def _check_path(kind: SourceKind, path: str, key: str) -> None:
    exists = {"directory": Path(path).is_dir, "file": Path(path).is_file, "file or directory": Path(path).exists}[kind.path_is]()
    if not exists:
        raise UserError(f"{key}: {path} is not a {kind.path_is} ({kind.name} needs {kind.path_holds}; "
                        f"relative paths resolve against {Path.cwd()}).")


def _new_stats(chars_per_token: float, kinds: list[SourceKind]) -> dict:
    """The stats at zero: the build's own counters, then every registered kind's, then the sources read."""
    stats = {"samples_total": 0, "samples": {}, "duplicates_removed": 0, "characters": 0, "estimated_tokens": 0,
             "chars_per_token": chars_per_token}
    for kind in kinds:
        stats.update(kind.new_stats())
    stats.setdefault("redactions", {})  # shared by the kinds that redact secrets; the summary totals it
    stats["sources"] = []
    return stats


def _print_summary(stats: dict, kinds: list[SourceKind], output: Path, seconds: float) -> None:
    lines = [line for kind in kinds for line in kind.summary_lines(stats)]
    lines.append(f"Removed {stats['duplicates_removed']:,} exact duplicates; "
                 f"redacted {sum(stats['redactions'].values()):,} secrets")
    lines.append(f"Total {stats['samples_total']:,} samples, {stats['characters']:,} characters, "
                 f"~{stats['estimated_tokens']:,} tokens (at {stats['chars_per_token']:g} chars/token) "
                 f"-> {output} in {seconds:.1f}s")
    print("\n".join(lines))
