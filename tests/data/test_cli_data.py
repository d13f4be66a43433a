"""`moetune data` end to end through the CLI: exit codes, files, strict mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import moetune
from moetune.cli import main


@pytest.fixture
def config_file(tmp_path: Path, rust_crate: Path, qa_file: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)  # relative paths resolve against the current directory
    path = tmp_path / "c.yaml"
    path.write_text(
        "data:\n"
        "  output_path: built/all_data.jsonl\n"
        "  sources:\n"
        f"    - {{type: rust_repo, path: {rust_crate.name}}}\n"
        f"    - {{type: qa_jsonl, path: {qa_file.name}}}\n"
    )
    return path


def test_data_verb_writes_dataset_and_stats(config_file: Path, tmp_path: Path, capsys):
    assert main(["data", "--config", str(config_file)]) == 0
    dataset = tmp_path / "built" / "all_data.jsonl"
    stats = json.loads((tmp_path / "built" / "all_data.stats.json").read_text())
    lines = dataset.read_text().splitlines()
    # 38 as in test_build, plus big.rs (within the default max_file_bytes): 8 file chunks and 2 distinct consts
    # (the first carries the `// big` comment written above it; the other 1,999 are duplicates of each other).
    assert len(lines) == stats["samples_total"] == 48
    assert {json.loads(line)["source"] for line in lines} == {"rust_repo", "qa_jsonl"}
    assert "Total 48 samples" in capsys.readouterr().out


def test_strict_mode_exits_2_with_file_and_line_and_no_traceback(config_file: Path, tmp_path: Path, capsys):
    assert main(["data", "--config", str(config_file), "data.strict=true"]) == 2
    err = capsys.readouterr().err
    assert "qa.jsonl:6: invalid JSON" in err and "Traceback" not in err
    assert not (tmp_path / "built" / "all_data.jsonl").exists()


def test_a_missing_source_exits_2(config_file: Path, capsys):
    assert main(["data", "--config", str(config_file), "data.sources=[{type: qa_jsonl, path: missing.jsonl}]"]) == 2
    assert "missing.jsonl is not a file" in capsys.readouterr().err


def test_a_gitignore_pattern_with_many_stars_does_not_stall_the_build(tmp_path: Path):
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "lib.rs").write_text("fn a(){}\n")
    (repo / ".gitignore").write_text("*".join(["a"] * 26) + "b\n")
    (repo / "src" / ("a" * 60 + ".rs")).write_text("fn long_name() {}\n")
    output = tmp_path / "out.jsonl"
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  output_path: {output}\n  sources:\n    - {{type: rust_repo, path: {repo}}}\n")
    env = {**os.environ, "PYTHONPATH": str(Path(moetune.__file__).parents[1])}

    # A backtracking matcher needs ~4x longer per 2 more characters of name: 60 never finishes.
    done = subprocess.run(
        [sys.executable, "-m", "moetune", "data", "--config", str(config)],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )

    assert done.returncode == 0, done.stderr
    assert {json.loads(line)["path"] for line in output.read_text().splitlines()} == {"src/lib.rs", f"src/{'a' * 60}.rs"}
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
