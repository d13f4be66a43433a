"""The repository walk: .gitignore, build output, vendored code, secret files, symlinks, crates."""

from __future__ import annotations

import os
from pathlib import Path

from moetune.data.walk import walk_rust_repo


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
