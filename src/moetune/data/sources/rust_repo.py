"""Source kind `rust_repo`: a Rust repository walked into file-level, per-item and instruction samples.

The walk is :mod:`moetune.data.walk`; reading, redacting and parsing each file is
:mod:`moetune.data.rust_samples` (a pool of worker processes). Both need tree-sitter, pathspec and re2,
so they are imported when a build reads a repository, never when a config is loaded.

Its records carry ``repo``, ``crate``, ``path`` (relative to the repository root), ``name``, ``module``,
``start_line`` and ``end_line``; instruction samples add ``item_kind``.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from moetune.config.fields import check, opt, required
from moetune.data.sources._kind import SampleWriter, SourceKind

if TYPE_CHECKING:
    from moetune.config.schema import Config

# Tokens kept free in a file-level chunk for its header line and the end-of-sequence token.
_CHUNK_HEADER_TOKENS = 32
# How much of a file a sample kind spans; of two identical samples the narrower kind is kept (a
# one-method impl is its method). Kinds not listed are single items.
_KIND_BREADTH = {"file": 3, "module": 2, "impl": 1, "trait": 1}
# Sample kinds that are not one item of the file.
_WHOLE_FILE_KINDS = ("file", "instruction")


@dataclass(frozen=True)
class RustRepoSourceConfig:
    """A Rust repository walked into file-level and per-item samples."""

    path: str = required("Root of the repository (relative paths resolve against the current directory).")
    type: Literal["rust_repo"] = opt("rust_repo", "Source kind.")
    file_level: bool = opt(True, "Emit whole-file samples, split at item boundaries to fit model.max_seq_length.")
    granular: bool = opt(True, "Emit one sample per item (function, struct, enum, trait, impl, ...).")
    instructions: bool = opt(False, "Emit instruction samples: the doc comment as the request, the item as the answer.")
    max_file_bytes: int = opt(1_000_000, "Skip files larger than this. Chunking is linear in the file's size, but a file is "
                              "parsed whole: tree-sitter's syntax tree alone takes about 25 times the file's size in "
                              "memory (a worker peaks near 90 times), so raise it with the memory of every worker in mind.")
    exclude: tuple[str, ...] = opt((), "Extra gitignore-style patterns to skip.")

    def __post_init__(self) -> None:
        check(bool(self.path), "data.sources[].path", self.path, "a non-empty path")
        check(self.max_file_bytes > 0, "data.sources[].max_file_bytes", self.max_file_bytes, "greater than 0")


def add_samples(source: RustRepoSourceConfig, config: Config, writer: SampleWriter, stats: dict) -> None:
    """Walk ``source.path``, write every kept file's samples and count files, skips, syntax errors and secrets."""
    from tqdm import tqdm

    from moetune.data.rust_samples import RustSampleOptions, rust_file_results
    from moetune.data.walk import walk_rust_repo

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
            writer.write_file_samples(result.samples, "rust_repo", _KIND_BREADTH)
        bar.close()
    stats["rust_files_found"] += len(walked.files)
    stats["rust_files_scanned"] += scanned
    stats["rust_bytes_scanned"] += scanned_bytes
    stats["files_skipped"] = dict(sorted((Counter(stats["files_skipped"]) + skipped).items()))
    stats["files_with_syntax_errors"] += syntax_errors
    stats["items_with_syntax_errors"] += items_with_errors
    stats["redactions"] = dict(sorted((Counter(stats["redactions"]) + redactions).items()))
    stats["sources"].append({"type": "rust_repo", "path": source.path, "rust_files_found": len(walked.files),
                             "rust_files_scanned": scanned, "rust_bytes_scanned": scanned_bytes,
                             "files_skipped": dict(sorted(skipped.items())), "redactions": dict(sorted(redactions.items()))})


def new_stats() -> dict:
    """The kind's counters at zero; ``redactions`` is the shared count of secrets redacted, by type."""
    return {"rust_files_found": 0, "rust_files_scanned": 0, "rust_bytes_scanned": 0, "files_skipped": {},
            "files_with_syntax_errors": 0, "items_with_syntax_errors": 0, "redactions": {}}


def summary_lines(stats: dict) -> list[str]:
    """Files found and skipped, and the samples made of them by kind; none when no repository was read."""
    if not (stats["rust_files_found"] or stats["files_skipped"]):
        return []
    rust = stats["samples"].get("rust_repo", {})
    items = {kind: n for kind, n in sorted(rust.items()) if kind not in _WHOLE_FILE_KINDS}
    lines = [f"Found {stats['rust_files_scanned']:,} Rust files ({_skip_breakdown(stats['files_skipped'])})",
             f"Created {rust.get('file', 0):,} file-level samples",
             f"Created {sum(items.values()):,} granular samples ({', '.join(f'{n:,} {k}' for k, n in items.items())})"]
    if rust.get("instruction"):
        lines.append(f"Created {rust['instruction']:,} instruction samples")
    return lines


def describe_empty(stats: dict) -> str:
    """How many files were found and why each was skipped."""
    return f"{stats['rust_files_found']:,} Rust files found, {_skip_breakdown(stats['files_skipped'])}"


def split_unit(record: dict) -> str:
    """The source file: all samples cut from one file land on the same side of the split."""
    return f"rust_repo:{record.get('repo', '')}/{record.get('path', '')}"


def _skip_breakdown(skipped: dict) -> str:
    if not skipped:
        return "none skipped"
    reasons = ", ".join(f"{n:,} {reason}" for reason, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"skipped {sum(skipped.values()):,}: {reasons}"


# No input_files: any file under the tree may change, so a build always walks it again.
SOURCE = SourceKind.from_module(__name__, name="rust_repo", config_class=RustRepoSourceConfig, path_is="directory",
                                path_holds="the root of a Rust repository", evaluation="body")
