"""Walk a repository for Rust source files the way git would see them.

Honours every ``.gitignore`` on the way down (plus extra patterns from the config), skips build
output, VCS folders and vendored code, and never follows a symlink (one leaving the repository,
one looping back to an ancestor, one naming a file the walk reaches anyway: each is counted).
Each file not taken is counted under a reason, so the stats say why it was left out.
Reading and checking file *contents* (binary, UTF-8, generated headers) happens later, in the
worker processes, so the walk itself stays a cheap metadata pass.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pathspec
import re2
from pathspec.pattern import RegexMatchResult
from pathspec.patterns.gitignore import GitIgnorePatternError
from pathspec.patterns.gitignore.spec import GitIgnoreSpecPattern

from moetune.data.secrets import is_secret_file_name
from moetune.errors import UserError

# Folders that never hold source worth learning from.
ALWAYS_SKIPPED_DIRS = frozenset({".git", ".hg", ".svn", "node_modules", "__pycache__", ".cargo"})
# Folder names that usually hold other people's code copied in; see `_is_vendored_dir`.
VENDOR_DIR_NAMES = frozenset({"vendor", "vendored", "third_party", "third-party", "thirdparty"})


@dataclass(frozen=True)
class RustFile:
    """One .rs file to process: where it is, and which crate it belongs to."""

    path: str  # relative to the repository root, always with "/" separators
    abs_path: str
    crate: str
    crate_dir: str  # relative path of the crate root ("" for the repository root)
    size: int


@dataclass
class WalkResult:
    """The files found and the count of everything left out, by reason."""

    files: list[RustFile] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)


def walk_rust_repo(root: str | Path, max_file_bytes: int, exclude: tuple[str, ...] = ()) -> WalkResult:
    """Collect the repository's .rs files in a fixed order: sorted names, a folder's files before its subfolders.

    ``exclude`` holds extra gitignore-style patterns, relative to ``root``. Files larger than
    ``max_file_bytes`` are skipped here (``too_large``) because the size is known from ``stat``.
    """
    root_real = os.path.realpath(root)
    result = WalkResult()
    root_specs = [("", gitignore_spec(exclude, "data.sources[].exclude"))] if exclude else []
    crate_names: dict[str, str | None] = {}
    seen_dirs: set[tuple[int, int]] = set()
    fallback_crate = _crate_ident(os.path.basename(root_real))
    # Explicit stack instead of recursion: deep trees cannot hit Python's recursion limit.
    stack: list[tuple[str, str, list]] = [(root_real, "", root_specs)]
    while stack:
        dir_abs, dir_rel, specs = stack.pop()
        try:
            st = os.stat(dir_abs)
        except OSError:
            result.skipped["unreadable"] += 1
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:  # a folder reached twice (bind mounts): walk it once
            result.skipped["already_walked"] += 1
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(dir_abs), key=lambda e: e.name)
        except OSError:
            result.skipped["unreadable"] += 1
            continue
        names = {e.name for e in entries}
        if ".gitignore" in names:
            specs = [*specs, (dir_rel, _read_gitignore(os.path.join(dir_abs, ".gitignore")))]
        if "Cargo.toml" in names and dir_rel not in crate_names:
            crate_names[dir_rel] = _read_crate_name(os.path.join(dir_abs, "Cargo.toml"))
        subdirs: list[tuple[str, str]] = []
        for entry in entries:
            rel = f"{dir_rel}/{entry.name}" if dir_rel else entry.name
            reason, is_dir = _classify(entry, rel, root_real, specs, names)
            if reason:
                if reason != "not_rust":
                    result.skipped[reason] += 1
                continue
            if is_dir:
                subdirs.append((entry.path, rel))
                continue
            try:
                size = os.stat(entry.path).st_size
            except OSError:  # removed or made unreadable since the directory was listed
                result.skipped["unreadable"] += 1
                continue
            if size > max_file_bytes:
                result.skipped["too_large"] += 1
                continue
            crate_dir, crate = _owning_crate(dir_rel, crate_names, fallback_crate)
            result.files.append(RustFile(rel, entry.path, crate, crate_dir, size))
        # Reversed so the stack pops them in sorted order.
        stack.extend((d_abs, d_rel, specs) for d_abs, d_rel in reversed(subdirs))
    return result


def _classify(entry: os.DirEntry, rel: str, root_real: str, specs: list, sibling_names: set[str]) -> tuple[str | None, bool]:
    """(skip reason or None, is_directory) for one directory entry."""
    try:
        if entry.is_symlink():
            # Symlinks are never followed (git does not follow them either): one pointing inside the
            # repository names a file or folder the walk reaches under its own name anyway, and
            # following it could only duplicate samples or loop.
            target = os.path.realpath(entry.path)
            if target != root_real and not target.startswith(root_real + os.sep):
                return "symlink_outside_repo", False
            if not os.path.exists(target):
                return "broken_symlink", False
            link_dir = os.path.realpath(os.path.dirname(entry.path))
            if os.path.isdir(target) and (link_dir == target or link_dir.startswith(target + os.sep)):
                return "symlink_loop", True
            return "symlink_inside_repo", False
        is_dir = entry.is_dir(follow_symlinks=False)
    except OSError:
        return "unreadable", False
    if is_dir:
        if entry.name in ALWAYS_SKIPPED_DIRS:
            return "vcs_or_tooling_dir", True
        if _is_ignored(rel + "/", specs):
            return "gitignored", True
        if entry.name == "target" and _is_cargo_target_dir(entry.path, sibling_names):
            return "build_output", True
        if _is_vendored_dir(entry, sibling_names):
            return "vendored", True
        return None, True
    if not entry.is_file():
        return "not_a_regular_file", False
    if is_secret_file_name(entry.name):
        return "secret_file", False
    if not entry.name.endswith(".rs"):
        return "not_rust", False
    if _is_ignored(rel, specs):
        return "gitignored", False
    return None, False


def _is_ignored(rel: str, specs: list) -> bool:
    """Ask each .gitignore from the root down; deeper files can re-include (`!pattern`)."""
    ignored = False
    for base, spec in specs:
        if base and not rel.startswith(base + "/"):
            continue
        local = rel[len(base) + 1:] if base else rel
        result = spec.check_file(local)
        if result.include is not None:
            ignored = result.include
    return ignored


def _is_cargo_target_dir(path: str, sibling_names: set[str]) -> bool:
    # A folder merely named `target` can be source (rustfmt's tests/target); Cargo's output sits
    # beside a Cargo.toml or carries Cargo's marker files.
    return ("Cargo.toml" in sibling_names or os.path.exists(os.path.join(path, "CACHEDIR.TAG"))
            or os.path.exists(os.path.join(path, ".rustc_info.json")))


def _is_vendored_dir(entry: os.DirEntry, sibling_names: set[str]) -> bool:
    if os.path.exists(os.path.join(entry.path, ".cargo-checksum.json")):
        return True  # `cargo vendor` output, whatever the folder is called
    if entry.name not in VENDOR_DIR_NAMES:
        return False
    # `src/vendor/` with a `vendor.rs` or `vendor/mod.rs` is an ordinary Rust module (core_simd has one).
    return f"{entry.name}.rs" not in sibling_names and not os.path.exists(os.path.join(entry.path, "mod.rs"))


def _read_gitignore(path: str) -> pathspec.GitIgnoreSpec:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    return gitignore_spec(lines, path)


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a failure is reported as a UserError below, not logged by the library


class _LinearTimePattern(GitIgnoreSpecPattern):
    """pathspec's gitignore pattern, matched by RE2 instead of Python's backtracking ``re``.

    pathspec turns ``a*a*a*b`` into ``a[^/]*a[^/]*a...``; Python's engine backtracks through every
    way of splitting a long name between the stars (26 stars, 60 characters: it never finishes),
    so one ``.gitignore`` line could stall a build. RE2 matches in time linear in the path.
    pathspec still parses the pattern, so its meaning (negation, anchoring, directory patterns,
    ``**``) is unchanged. Each pattern gets its own RE2 regex rather than pathspec's "re2" backend:
    that one combines them into an RE2 set, which fails to compile for a few thousand wildcard
    patterns and answers "no match" when its DFA runs out of memory; a single RE2 regex falls back
    to its NFA instead.
    """

    __slots__ = ("_linear",)

    def __init__(self, line: str):
        try:
            super().__init__(line)
        except GitIgnorePatternError:
            # git skips a line it cannot read as a pattern ("!" alone, a trailing backslash); so do we.
            super().__init__("")
        try:
            self._linear = re2.compile(self.regex.pattern, _RE2_OPTIONS) if self.regex is not None else None
        except re2.error:
            raise _PatternTooComplex(line) from None

    def match_file(self, file: str) -> RegexMatchResult | None:
        if self._linear is None:
            return None
        try:
            match = self._linear.search(file)
        except UnicodeEncodeError:
            # A file name that is not UTF-8 reaches Python as lone surrogates, which RE2 cannot take;
            # the .gitignore was read with the same bytes replaced by U+FFFD.
            match = self._linear.search(file.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
        return RegexMatchResult(match) if match is not None else None


class _PatternTooComplex(Exception):
    def __init__(self, line: str):
        super().__init__(line)
        self.line = line


def gitignore_spec(lines, source: str) -> pathspec.GitIgnoreSpec:
    """The gitignore patterns in ``lines`` (from ``source``, named in errors), matched in linear time."""
    try:
        # The "simple" backend asks each pattern in turn, so every match goes through RE2 above.
        return pathspec.GitIgnoreSpec.from_lines(list(lines), _LinearTimePattern, backend="simple")
    except _PatternTooComplex as err:
        raise UserError(f"{source}: the gitignore pattern {err.line[:80]!r}{'...' if len(err.line) > 80 else ''} "
                        "is too large to match; shorten or remove it.") from None


_NAME_LINE = re.compile(r"""^name\s*=\s*["']([^"'\n]+)["']""")


def _read_crate_name(path: str) -> str | None:
    """The [package] name of a Cargo.toml, or None for a workspace-only or unreadable manifest."""
    # Line by line rather than a TOML parser: tomllib needs Python 3.11, and only this one key matters.
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    in_package = False
    for line in lines:
        line = line.strip()
        if line.startswith("["):
            in_package = line.replace(" ", "") == "[package]"
        elif in_package and (match := _NAME_LINE.match(line)):
            return _crate_ident(match.group(1))
    return None


def _owning_crate(dir_rel: str, crate_names: dict[str, str | None], fallback: str) -> tuple[str, str]:
    """The nearest enclosing folder with a named Cargo.toml, else the repository itself."""
    probe = dir_rel
    while True:
        name = crate_names.get(probe)
        if name:
            return probe, name
        if not probe:
            return "", fallback
        probe = probe.rpartition("/")[0]


def _crate_ident(name: str) -> str:
    # Cargo names may contain `-`; the crate as Rust code names it uses `_`.
    return name.replace("-", "_") or "crate"
