"""The whole build: exact counts, no secret in the output, duplicates, determinism, atomic writes."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

import moetune.data.sources.qa_jsonl as qa_jsonl_source
from moetune.config import load_config
from moetune.data.build import build_dataset, stats_path_for
from moetune.errors import UserError

from .conftest import PLANTED_API_KEY, PLANTED_AWS_KEY, PLANTED_ENV_SECRET, PLANTED_PRIVATE_KEY_LINE


def _config(tmp_path: Path, sources: list[dict], **data):
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"data": {"output_path": str(tmp_path / "out" / "all.jsonl"), "sources": sources, **data}}))
    return load_config(path)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_build_counts_everything_exactly(tmp_path: Path, rust_crate: Path, qa_file: Path, capsys):
    config = _config(tmp_path, [{"type": "rust_repo", "path": str(rust_crate), "max_file_bytes": 20000},
                                {"type": "qa_jsonl", "path": str(qa_file)}])
    assert build_dataset(config) == 0
    out = tmp_path / "out" / "all.jsonl"
    stats = json.loads(stats_path_for(out).read_text())

    assert stats["rust_files_found"] == 11 and stats["rust_files_scanned"] == 7
    assert stats["files_skipped"] == {"binary": 1, "build_output": 1, "empty": 1, "generated": 1, "gitignored": 2,
                                      "non_utf8": 1, "secret_file": 2, "symlink_loop": 1, "symlink_outside_repo": 1,
                                      "too_large": 1, "vendored": 1}
    assert stats["samples"] == {
        "rust_repo": {"const": 2, "enum": 1, "file": 7, "function": 11, "impl": 2, "macro": 1, "module": 2,
                      "static": 1, "struct": 3, "trait": 1, "type": 1},
        "qa_jsonl": {"qa": 6},
    }
    assert stats["samples_total"] == 38
    # `shared()` is in copy_a.rs and copy_b.rs; `fmt` wrapped in its impl header is the whole one-method impl,
    # which is kept as the function.
    assert stats["duplicates_removed"] == 2
    assert stats["redactions"] == {"assigned_secret": 1, "aws_access_key": 1, "private_key": 1}
    assert (stats["files_with_syntax_errors"], stats["items_with_syntax_errors"]) == (1, 1)
    assert (stats["bad_lines"], stats["qa_missing_expert_label"]) == (11, 1)
    assert len(stats["bad_line_details"]) == 11 and stats["bad_line_details"][0].startswith(f"{qa_file}:6: invalid JSON")
    records = _read(out)
    assert len(records) == 38
    assert stats["characters"] == sum(len(r.get("text", "")) + len(r.get("prompt", "")) + len(r.get("completion", ""))
                                      for r in records)
    assert stats["estimated_tokens"] == -(-stats["characters"] // 3)
    printed = capsys.readouterr()
    assert "Found 7 Rust files" in printed.out and "Created 7 file-level samples" in printed.out
    assert "Created 25 granular samples" in printed.out and "Total 38 samples" in printed.out
    assert f"skipped bad line {qa_file}:16: not valid UTF-8" in printed.err


def test_a_one_method_impl_is_kept_once_as_its_method(tmp_path: Path):
    crate = tmp_path / "ledger"
    (crate / "src").mkdir(parents=True)
    (crate / "Cargo.toml").write_text('[package]\nname = "ledger"\nversion = "0.1.0"\n')
    lib = "pub struct Entry {\n    cents: i64,\n}\n\nimpl Entry {\n    /// The amount in cents.\n    pub fn cents(&self) -> i64 {\n        self.cents\n    }\n}\n"
    (crate / "src" / "lib.rs").write_text(lib)
    config = _config(tmp_path, [{"type": "rust_repo", "path": str(crate)}])
    assert build_dataset(config) == 0
    out = tmp_path / "out" / "all.jsonl"
    stats = json.loads(stats_path_for(out).read_text())
    assert stats["samples"] == {"rust_repo": {"file": 1, "function": 1, "struct": 1}}
    assert stats["duplicates_removed"] == 1
    [method] = [r for r in _read(out) if r["text"].startswith("impl Entry {")]
    assert method["text"] == lib[lib.index("impl Entry"):].rstrip("\n")
    assert (method["kind"], method["name"], method["module"]) == ("function", "cents", "ledger")
    assert (method["start_line"], method["end_line"]) == (6, 9)  # the doc comment and the method, not the impl


def test_no_planted_secret_reaches_the_dataset(tmp_path: Path, rust_crate: Path):
    config = _config(tmp_path, [{"type": "rust_repo", "path": str(rust_crate), "instructions": True}])
    build_dataset(config)
    written = (tmp_path / "out" / "all.jsonl").read_text() + stats_path_for(tmp_path / "out" / "all.jsonl").read_text()
    for secret in (PLANTED_API_KEY, PLANTED_PRIVATE_KEY_LINE, PLANTED_AWS_KEY, PLANTED_ENV_SECRET, "BEGIN PRIVATE KEY"):
        assert secret not in written
    assert "<REDACTED>" in written


def test_records_carry_their_metadata(tmp_path: Path, rust_crate: Path):
    config = _config(tmp_path, [{"type": "rust_repo", "path": str(rust_crate), "instructions": True}])
    build_dataset(config)
    records = _read(tmp_path / "out" / "all.jsonl")
    add = next(r for r in records if r["kind"] == "function" and r["name"] == "add")
    assert {k: add[k] for k in ("source", "repo", "crate", "path", "module", "start_line", "end_line")} == {
        "source": "rust_repo", "repo": "demo_repo", "crate": "demo_pay", "path": "src/money.rs",
        "module": "demo_pay::money", "start_line": 28, "end_line": 31}
    assert add["text"].startswith("impl<'a, C: Currency> Money<'a, C> {\n    /// Adds two amounts")
    lib = next(r for r in records if r["kind"] == "file" and r["path"] == "src/lib.rs")
    assert lib["text"].startswith("// crate: demo_pay | file: src/lib.rs\n//! Demo crate")
    instruction = next(r for r in records if r["kind"] == "instruction" and r["name"] == "add")
    assert "Adds two amounts of the same currency" in instruction["prompt"]
    assert "///" not in instruction["completion"] and "pub fn add(" in instruction["completion"]
    assert {r["name"] for r in records if r["kind"] == "instruction"} == {"API_KEY", "TEST_KEY", "template", "Money",
                                                                          "Currency", "decimals", "add"}


def test_identical_input_gives_identical_bytes(tmp_path: Path, rust_crate: Path, qa_file: Path):
    sources = [{"type": "rust_repo", "path": str(rust_crate), "instructions": True}, {"type": "qa_jsonl", "path": str(qa_file)}]
    out = tmp_path / "out" / "all.jsonl"
    build_dataset(_config(tmp_path, sources))
    first = out.read_bytes(), stats_path_for(out).read_bytes()
    build_dataset(_config(tmp_path, sources))
    assert (out.read_bytes(), stats_path_for(out).read_bytes()) == first


def test_worker_pool_writes_the_same_bytes_as_one_process(tmp_path: Path):
    repo = tmp_path / "many"
    (repo / "src").mkdir(parents=True)
    for i in range(80):  # above the size where the pool is used
        (repo / "src" / f"m{i:02d}.rs").write_text(f"/// Item {i}.\npub fn f{i}() -> u32 {{\n    {i}\n}}\n")
    sources = [{"type": "rust_repo", "path": str(repo)}]
    out = tmp_path / "out" / "all.jsonl"
    build_dataset(_config(tmp_path, sources, num_workers=1))
    single = out.read_bytes()
    build_dataset(_config(tmp_path, sources, num_workers=2))
    assert out.read_bytes() == single
    assert len(single.splitlines()) == 160


def test_a_failed_build_leaves_the_previous_dataset_untouched(tmp_path: Path, qa_file: Path):
    out = tmp_path / "out" / "all.jsonl"
    out.parent.mkdir()
    out.write_text("previous dataset\n")
    with pytest.raises(UserError, match=":6: invalid JSON"):
        build_dataset(_config(tmp_path, [{"type": "qa_jsonl", "path": str(qa_file)}], strict=True))
    assert out.read_text() == "previous dataset\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["all.jsonl"]  # no temporary file left behind


def test_missing_sources_and_empty_results_are_user_errors(tmp_path: Path):
    with pytest.raises(UserError, match=r"data.sources\[0\].path: .*nope is not a directory"):
        build_dataset(_config(tmp_path, [{"type": "rust_repo", "path": str(tmp_path / "nope")}]))
    (tmp_path / "empty_repo").mkdir()
    with pytest.raises(UserError, match="produced no samples"):
        build_dataset(_config(tmp_path, [{"type": "rust_repo", "path": str(tmp_path / "empty_repo")}]))
    with pytest.raises(UserError, match="data.sources is empty"):
        build_dataset(_config(tmp_path, []))


def test_a_script_without_a_main_guard_can_build_with_workers(tmp_path: Path):
    """Workers must not re-run the caller's script (with the spawn start method they would, and hang the pool)."""
    import subprocess
    import sys

    repo = tmp_path / "many"
    (repo / "src").mkdir(parents=True)
    for i in range(70):
        (repo / "src" / f"m{i:02d}.rs").write_text(f"pub fn f{i}() -> u32 {{ {i} }}\n")
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from moetune.config import load_config\n"
        "from moetune.data.build import build_dataset\n"
        f"build_dataset(load_config(None, ['data.output_path={tmp_path / 'o.jsonl'}', 'data.num_workers=2',\n"
        f"                                 'data.sources=[{{type: rust_repo, path: {repo}}}]']))\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Total 140 samples" in done.stdout


def test_a_pathological_file_is_skipped_and_counted_not_fatal(tmp_path: Path, capsys):
    repo = tmp_path / "deep"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "deep.rs").write_text("mod m { " * 3000 + "fn f() {}" + " }" * 3000 + "\n")
    (repo / "src" / "ok.rs").write_text("pub fn ok() {}\n")
    build_dataset(_config(tmp_path, [{"type": "rust_repo", "path": str(repo)}], chars_per_token=1.0))
    stats = json.loads(stats_path_for(tmp_path / "out" / "all.jsonl").read_text())
    assert stats["files_skipped"] == {"processing_error": 1}
    assert stats["rust_files_scanned"] == 1
    assert "deep.rs: RecursionError" in capsys.readouterr().err


def test_temporary_files_of_a_killed_build_are_removed_by_the_next_one(tmp_path: Path, qa_file: Path):
    config = _config(tmp_path, [{"type": "qa_jsonl", "path": str(qa_file)}])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid now names no process, like a build killed with SIGKILL
    alive = os.getppid()  # a concurrent build to the same file must keep its files
    stale = [out_dir / f".all.jsonl.tmp-{gone.pid}", out_dir / f".all.stats.json.tmp-{gone.pid}"]
    kept = [out_dir / f".all.jsonl.tmp-{alive}", out_dir / "notes.tmp-1"]
    for path in stale + kept:
        path.write_text("half-written\n")

    assert build_dataset(config) == 0

    assert sorted(p.name for p in out_dir.iterdir()) == sorted(["all.jsonl", "all.stats.json", *(p.name for p in kept)])


def test_sigterm_during_a_build_exits_143_and_leaves_no_temporary_file(tmp_path: Path, qa_file: Path, monkeypatch):
    config = _config(tmp_path, [{"type": "qa_jsonl", "path": str(qa_file)}])
    real_add = qa_jsonl_source.SOURCE.add_samples

    def add_then_get_terminated(*args):
        real_add(*args)  # the temporary dataset now holds samples
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(qa_jsonl_source, "SOURCE", dataclasses.replace(qa_jsonl_source.SOURCE,
                                                                       add_samples=add_then_get_terminated))
    previous = signal.getsignal(signal.SIGTERM)

    with pytest.raises(SystemExit) as exit_info:
        build_dataset(config)

    assert exit_info.value.code == 128 + signal.SIGTERM
    assert list((tmp_path / "out").iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is previous
