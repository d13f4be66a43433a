"""`moetune data`: every source in ``data.sources`` -> one JSONL dataset plus its stats file.

Samples stream straight to a temporary file beside the output, exact duplicates are dropped by
content hash on the way, and only a build that finishes renames the files into place, so a failed
or interrupted build never leaves a half-written dataset where a good one was. The stats file
records what the build read (``build_inputs``), so :func:`build_dataset_unless_current` can tell
a dataset that still matches its sources from a stale one.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from tqdm import tqdm

from moetune.config.loader import config_to_dict
from moetune.config.schema import Config, QaJsonlSourceConfig, RustRepoSourceConfig
from moetune.data.qa_jsonl import QaStats, read_qa_jsonl
from moetune.data.records import content_digest, estimate_tokens, sample_chars, to_json_line
from moetune.data.rust_repo import RustSampleOptions, rust_file_results
from moetune.data.walk import walk_rust_repo
from moetune.errors import UserError

# Tokens kept free in a file-level chunk for its header line and the end-of-sequence token.
_CHUNK_HEADER_TOKENS = 32
MAX_BAD_LINES_PRINTED = 20
MAX_BAD_LINES_IN_STATS = 1000
# How much of a file a sample kind spans; of two identical samples the narrower kind is kept (a
# one-method impl is its method). Kinds not listed are single items.
_KIND_BREADTH = {"file": 3, "module": 2, "impl": 1, "trait": 1}


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
        if isinstance(source, RustRepoSourceConfig) and not Path(source.path).is_dir():
            raise UserError(f"data.sources[{i}].path: {source.path} is not a directory (rust_repo needs the root of a "
                            f"Rust repository; relative paths resolve against {Path.cwd()}).")
        if isinstance(source, QaJsonlSourceConfig) and not Path(source.path).is_file():
            raise UserError(f"data.sources[{i}].path: {source.path} is not a file (qa_jsonl needs a JSONL file; "
                            f"relative paths resolve against {Path.cwd()}).")
    output = Path(data.output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    stats = _new_stats(data.chars_per_token)
    stats["build_inputs"] = build_inputs(config)  # before reading: a source changed meanwhile makes it stale
    started = time.perf_counter()
    _remove_stale_tmp_files(output)
    tmp_output, tmp_stats = (output.with_name(f"{prefix}{os.getpid()}") for prefix in _tmp_prefixes(output))
    with _exit_cleanly_on_termination(), _removed_unless_renamed(tmp_output, tmp_stats):
        with tmp_output.open("w", encoding="utf-8", newline="\n") as out:
            writer = _DedupWriter(out, stats)
            for source in data.sources:
                if isinstance(source, RustRepoSourceConfig):
                    _add_rust_repo(source, config, writer, stats)
                else:
                    _add_qa_jsonl(source, data.strict, writer, stats)
        stats["estimated_tokens"] = estimate_tokens(stats["characters"], data.chars_per_token)
        stats["samples"] = {source: dict(sorted(kinds.items())) for source, kinds in stats["samples"].items()}
        if stats["samples_total"] == 0:
            raise UserError("The build produced no samples: " + _skipped_text(stats) + ". Check data.sources.")
        tmp_stats.write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp_output, output)
        os.replace(tmp_stats, stats_path_for(output))
    _print_summary(stats, output, time.perf_counter() - started)
    return 0


def build_inputs(config: Config) -> dict | None:
    """What a build of ``data.output_path`` read and how, as plain JSON: the data settings and each source
    file's size and modification time. None when that cannot be told cheaply: a rust_repo source (any file
    under it may change) or a source file that is missing."""
    files = []
    for source in config.data.sources:
        path = Path(source.path)
        if not isinstance(source, QaJsonlSourceConfig) or not path.is_file():
            return None
        stat = path.stat()
        files.append({"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    # Keys that only matter after the build (which samples are used, how they are tokenized) are left out.
    settings = {key: value for key, value in config_to_dict(config.data).items()
                if key not in ("output_path", "num_workers", "packing", "max_samples", "max_target_length")}
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

    def write_file_samples(self, samples: list[tuple[bytes, str, str, int]], source: str) -> None:
        """Write one file's samples; of identical ones, the sample of the narrowest kind (function over impl
        over file) is kept, with its name and lines, in its own place.

        Identical samples of different kinds come from one file (file chunks carry the path in their
        header; a one-method impl and its method are found together), so across files the first
        one written is kept.
        """
        kept: dict[bytes, int] = {}
        for index, (digest, _, kind, _) in enumerate(samples):
            best = kept.get(digest)
            if best is None or _KIND_BREADTH.get(kind, 0) < _KIND_BREADTH.get(samples[best][2], 0):
                kept[digest] = index
        for index, (digest, line, kind, chars) in enumerate(samples):
            if kept[digest] == index:
                self.write(digest, line, source, kind, chars)
            else:
                self.stats["duplicates_removed"] += 1

    def write(self, digest: bytes, line: str, source: str, kind: str, chars: int) -> None:
        if digest in self.seen:
            self.stats["duplicates_removed"] += 1
            return
        self.seen.add(digest)
        self.out.write(line)
        samples = self.stats["samples"].setdefault(source, {})
        samples[kind] = samples.get(kind, 0) + 1
        self.stats["samples_total"] += 1
        self.stats["characters"] += chars


def _add_rust_repo(source: RustRepoSourceConfig, config: Config, writer: _DedupWriter, stats: dict) -> None:
    root = Path(source.path)
    walked = walk_rust_repo(root, source.max_file_bytes, source.exclude)
    skipped = Counter(walked.skipped)
    redactions: Counter = Counter()
    budget_tokens = max(config.model.max_seq_length - _CHUNK_HEADER_TOKENS, 16)
    options = RustSampleOptions(
        repo=root.resolve().name, file_level=source.file_level, granular=source.granular,
        instructions=source.instructions, chunk_budget_chars=int(budget_tokens * config.data.chars_per_token),
        max_file_bytes=source.max_file_bytes,
    )
    scanned = scanned_bytes = syntax_errors = items_with_errors = 0
    with rust_file_results(walked.files, options, config.data.num_workers) as results:
        bar = tqdm(results, total=len(walked.files), unit="file", desc=f"rust_repo {options.repo}",
                   disable=len(walked.files) < 200, file=sys.stderr)
        for file, result in zip(walked.files, bar, strict=True):
            if result.skip_reason:
                skipped[result.skip_reason] += 1
                if result.error:
                    print(f"skipped {root / file.path}: {result.error}", file=sys.stderr)
                continue
            scanned += 1
            scanned_bytes += file.size
            syntax_errors += result.syntax_error
            items_with_errors += result.items_with_errors
            redactions.update(result.redactions)
            writer.write_file_samples(result.samples, "rust_repo")
        bar.close()
    stats["rust_files_found"] += len(walked.files)
    stats["rust_files_scanned"] += scanned
    stats["rust_bytes_scanned"] += scanned_bytes
    stats["files_skipped"] = dict(sorted((Counter(stats["files_skipped"]) + skipped).items()))
    stats["files_with_syntax_errors"] += syntax_errors
    stats["items_with_syntax_errors"] += items_with_errors
    stats["redactions"] = dict(sorted((Counter(stats["redactions"]) + redactions).items()))
    stats["sources"].append({"type": "rust_repo", "path": source.path, "rust_files_found": len(walked.files),
                             "rust_files_scanned": scanned, "rust_bytes_scanned": scanned_bytes, "files_skipped": dict(sorted(skipped.items())),
                             "redactions": dict(sorted(redactions.items()))})


def _add_qa_jsonl(source: QaJsonlSourceConfig, strict: bool, writer: _DedupWriter, stats: dict) -> None:
    qa = QaStats()
    for record in read_qa_jsonl(source.path, source.prompt_template, strict, qa):
        writer.write(content_digest(record), to_json_line(record), "qa_jsonl", "qa", sample_chars(record))
    stats["qa_lines_read"] += qa.lines_read
    stats["bad_lines"] += len(qa.bad_lines)
    room = MAX_BAD_LINES_IN_STATS - len(stats["bad_line_details"])
    stats["bad_line_details"].extend(qa.bad_lines[:max(room, 0)])
    stats["qa_missing_expert_label"] += qa.missing_expert_label
    stats["expert_labels"] = dict(sorted((Counter(stats["expert_labels"]) + qa.expert_labels).items()))
    stats["sources"].append({"type": "qa_jsonl", "path": source.path, "lines_read": qa.lines_read,
                             "blank_lines": qa.blank_lines, "bad_lines": len(qa.bad_lines),
                             "missing_expert_label": qa.missing_expert_label})
    for where in qa.bad_lines[:MAX_BAD_LINES_PRINTED]:
        print(f"skipped bad line {where}", file=sys.stderr)
    if len(qa.bad_lines) > MAX_BAD_LINES_PRINTED:
        print(f"... and {len(qa.bad_lines) - MAX_BAD_LINES_PRINTED} more bad lines in {source.path} "
              "(listed in the stats file)", file=sys.stderr)


def _new_stats(chars_per_token: float) -> dict:
    return {
        "samples_total": 0, "samples": {}, "duplicates_removed": 0, "characters": 0, "estimated_tokens": 0,
        "chars_per_token": chars_per_token, "rust_files_found": 0, "rust_files_scanned": 0, "rust_bytes_scanned": 0, "files_skipped": {},
        "files_with_syntax_errors": 0, "items_with_syntax_errors": 0, "redactions": {},
        "qa_lines_read": 0, "bad_lines": 0, "bad_line_details": [], "qa_missing_expert_label": 0,
        "expert_labels": {}, "sources": [],
    }


def _skipped_text(stats: dict) -> str:
    return f"{stats['rust_files_found']:,} Rust files found, {_skip_breakdown(stats['files_skipped'])}"


def _skip_breakdown(skipped: dict) -> str:
    if not skipped:
        return "none skipped"
    reasons = ", ".join(f"{n:,} {reason}" for reason, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"skipped {sum(skipped.values()):,}: {reasons}"


def _print_summary(stats: dict, output: Path, seconds: float) -> None:
    rust = stats["samples"].get("rust_repo", {})
    granular = sum(n for kind, n in rust.items() if kind not in ("file", "instruction"))
    lines = []
    if stats["rust_files_found"] or stats["files_skipped"]:
        lines.append(f"Found {stats['rust_files_scanned']:,} Rust files ({_skip_breakdown(stats['files_skipped'])})")
        lines.append(f"Created {rust.get('file', 0):,} file-level samples")
        lines.append(f"Created {granular:,} granular samples "
                     f"({', '.join(f'{n:,} {k}' for k, n in sorted(rust.items()) if k not in ('file', 'instruction'))})")
        if rust.get("instruction"):
            lines.append(f"Created {rust['instruction']:,} instruction samples")
    if stats["qa_lines_read"]:
        qa = stats["samples"].get("qa_jsonl", {}).get("qa", 0)
        lines.append(f"Created {qa:,} QA samples ({stats['bad_lines']:,} bad lines skipped, "
                     f"{stats['qa_missing_expert_label']:,} without expert_label)")
    lines.append(f"Removed {stats['duplicates_removed']:,} exact duplicates; redacted {sum(stats['redactions'].values()):,} secrets")
    lines.append(f"Total {stats['samples_total']:,} samples, {stats['characters']:,} characters, "
                 f"~{stats['estimated_tokens']:,} tokens (at {stats['chars_per_token']:g} chars/token) "
                 f"-> {output} in {seconds:.1f}s")
    print("\n".join(lines))
