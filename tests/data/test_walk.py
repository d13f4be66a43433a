"""The repository walk: .gitignore, build output, vendored code, secret files, symlinks, crates."""

from __future__ import annotations

import os
from pathlib import Path

import pathspec
import pytest

from moetune.data.walk import gitignore_spec, walk_rust_repo
from moetune.errors import UserError


def test_walk_lists_rust_files_in_order_and_counts_every_skip(rust_crate: Path):
    result = walk_rust_repo(rust_crate, max_file_bytes=20_000)

    assert [f.path for f in result.files] == [
        "src/binary.rs", "src/broken.rs", "src/copy_a.rs", "src/copy_b.rs", "src/crlf.rs", "src/empty.rs",
        "src/gen.rs", "src/keys.rs", "src/latin1.rs", "src/lib.rs", "src/money.rs",
    ]
    assert dict(result.skipped) == {
        "secret_file": 2,  # .env, server.pem
        "gitignored": 2,  # ignored/, src/old.bak.rs
        "build_output": 1,  # target/ beside Cargo.toml
        "vendored": 1,  # vendor/
        "too_large": 1,  # src/big.rs
        "symlink_outside_repo": 1,  # src/outside.rs
        "symlink_loop": 1,  # src/loop -> ..
    }
    assert {f.crate for f in result.files} == {"demo_pay"}


def test_nested_gitignore_can_reinclude_and_exclude_patterns_apply(tmp_path: Path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".gitignore").write_text("*.gen.rs\n")
    (tmp_path / "a" / ".gitignore").write_text("!keep.gen.rs\n")
    for rel in ("x.gen.rs", "a/keep.gen.rs", "a/b/plain.rs", "a/b/skip_me.rs", "a/other.gen.rs"):
        (tmp_path / rel).write_text("fn f() {}\n")

    result = walk_rust_repo(tmp_path, 1000, exclude=("skip_*.rs",))

    assert [f.path for f in result.files] == ["a/keep.gen.rs", "a/b/plain.rs"]  # a folder's files before its subfolders
    assert result.skipped["gitignored"] == 3


def test_each_file_belongs_to_its_nearest_named_crate(tmp_path: Path):
    (tmp_path / "Cargo.toml").write_text("[workspace]\nmembers = [\"crates/*\"]\n")
    (tmp_path / "crates" / "core-lib" / "src").mkdir(parents=True)
    (tmp_path / "crates" / "core-lib" / "Cargo.toml").write_text('[package]\nname = "core-lib"\n')
    (tmp_path / "crates" / "core-lib" / "src" / "lib.rs").write_text("fn a() {}\n")
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "x.rs").write_text("fn b() {}\n")

    files = {f.path: (f.crate, f.crate_dir) for f in walk_rust_repo(tmp_path, 1000).files}

    assert files == {
        "crates/core-lib/src/lib.rs": ("core_lib", "crates/core-lib"),
        "tools/x.rs": (tmp_path.name.replace("-", "_"), ""),  # no named crate: the repository's name
    }


def test_a_module_folder_named_vendor_is_kept_and_symlinks_inside_the_repo_are_not_followed(tmp_path: Path):
    (tmp_path / "src" / "vendor").mkdir(parents=True)
    (tmp_path / "src" / "vendor.rs").write_text("mod arm;\n")
    (tmp_path / "src" / "vendor" / "arm.rs").write_text("fn arm() {}\n")
    os.symlink("vendor.rs", tmp_path / "src" / "alias.rs")
    os.symlink("vendor", tmp_path / "src" / "also_vendor")
    os.symlink("src", tmp_path / "src" / "vendor" / "dangling")  # resolves to src/vendor/src, which does not exist
    os.symlink("..", tmp_path / "src" / "vendor" / "parent")  # src/vendor/parent -> src: a loop

    result = walk_rust_repo(tmp_path, 1000)

    # Each file once, under its real name; the links are counted, never walked.
    assert [f.path for f in result.files] == ["src/vendor.rs", "src/vendor/arm.rs"]
    assert dict(result.skipped) == {"symlink_inside_repo": 2, "broken_symlink": 1, "symlink_loop": 1}


# Ordinary .gitignore contents and paths; the linear-time matcher must give pathspec's answer for each.
_PATTERN_TABLE = [
    ["*.rs"], ["/top.rs"], ["src/"], ["src"], ["/src/"], ["doc/*.rs"], ["**/gen"], ["**/gen/*.rs"], ["a/**/b.rs"],
    ["a/**"], ["*.rs", "!keep.rs"], ["*.rs", "!/src/keep.rs"], ["build/", "!build/keep.rs"], ["[a-c]?.rs"],
    ["[!a]*.rs"], ["\\#hash.rs"], ["\\!bang.rs"], ["trailing.rs   "], ["# comment", ""], ["**"], ["*/lib.rs"],
    ["src/**/*.rs", "!src/**/mod.rs"], ["x*y*z.rs"], ["ünï*.rs"],
]
_PATHS = [
    "top.rs", "src/top.rs", "src/", "src/lib.rs", "src/keep.rs", "keep.rs", "doc/x.rs", "doc/sub/x.rs", "gen/",
    "a/gen/", "a/gen/x.rs", "a/b.rs", "a/x/y/b.rs", "a/", "build/", "build/keep.rs", "ab.rs", "dx.rs", "bz.rs",
    "#hash.rs", "!bang.rs", "trailing.rs", "src/deep/mod.rs", "src/deep/other.rs", "xayaz.rs", "ünïcode.rs",
]


@pytest.mark.parametrize("lines", _PATTERN_TABLE, ids=lambda lines: "|".join(lines))
def test_the_linear_time_matcher_agrees_with_pathspec(lines: list[str]):
    ours = gitignore_spec(lines, ".gitignore")
    reference = pathspec.GitIgnoreSpec.from_lines(lines, backend="simple")

    assert [ours.check_file(p).include for p in _PATHS] == [reference.check_file(p).include for p in _PATHS]


def test_a_pattern_with_many_stars_keeps_its_meaning(tmp_path: Path):
    # The same pattern against a 60-character name is the data build test in test_cli_data.py.
    (tmp_path / ".gitignore").write_text("*".join(["a"] * 26) + "b\n")
    (tmp_path / ("a" * 20 + ".rs")).write_text("fn a() {}\n")
    (tmp_path / ("a" * 30 + "b")).mkdir()
    (tmp_path / ("a" * 30 + "b") / "x.rs").write_text("fn x() {}\n")

    result = walk_rust_repo(tmp_path, 1000)

    assert [f.path for f in result.files] == ["a" * 20 + ".rs"]
    assert dict(result.skipped) == {"gitignored": 1}  # the folder ending in "ab"


def test_lines_that_are_no_pattern_and_names_that_are_not_utf8_are_handled(tmp_path: Path):
    (tmp_path / ".gitignore").write_bytes(b"!\n\\\n*.skip.rs\nbad\xff*.rs\n")
    (tmp_path / "a.rs").write_text("fn a() {}\n")
    (tmp_path / "b.skip.rs").write_text("fn b() {}\n")
    with open(os.path.join(os.fsencode(tmp_path), b"bad\xffname.rs"), "wb") as f:
        f.write(b"fn c() {}\n")

    result = walk_rust_repo(tmp_path, 1000)

    # "!" and a lone backslash mean nothing to git; the undecodable byte reads as U+FFFD on both sides.
    assert [f.path for f in result.files] == ["a.rs"]
    assert result.skipped["gitignored"] == 2


def test_a_gitignore_pattern_too_large_to_compile_is_a_user_error(tmp_path: Path):
    with pytest.raises(UserError, match=r"^data.sources\[\].exclude: the gitignore pattern '\?{80}'\.\.\. is too large"):
        gitignore_spec(["?" * 100_000], "data.sources[].exclude")
