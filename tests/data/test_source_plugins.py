"""A source kind is one module plus one registry line: a plain-text kind written here, registered by
patching moetune.plugins.SOURCE_MODULES, is loaded, built, split, grouped and evaluated like the shipped ones."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from moetune import plugins
from moetune.config import load_config
from moetune.data.build import build_dataset, dataset_is_current, stats_path_for
from moetune.data.split import split_records, split_unit
from moetune.errors import ConfigError, UserError
from moetune.eval.compare_models import _evaluated_as
from moetune.eval.routing_report import group_of

MODULE_NAME = "moetune_test_plain_text_source"
PLAIN_TEXT_SOURCE = '''\
"""Source kind `plain_text`: every non-empty paragraph of a text file is one {"text": ...} sample."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from moetune.config.fields import check, opt, required
from moetune.data.records import content_digest, sample_chars, to_json_line
from moetune.data.sources import SourceKind


@dataclass(frozen=True)
class PlainTextSourceConfig:
    """A text file cut into paragraphs at blank lines."""

    path: str = required("Text file.")
    type: Literal["plain_text"] = opt("plain_text", "Source kind.")
    min_chars: int = opt(1, "Paragraphs shorter than this are dropped (and counted).")

    def __post_init__(self):
        check(self.min_chars >= 1, "data.sources[].min_chars", self.min_chars, "at least 1")


def add_samples(source, config, writer, stats):
    paragraphs = [p.strip() for p in Path(source.path).read_text(encoding="utf-8").split("\\n\\n") if p.strip()]
    short = 0
    for number, paragraph in enumerate(paragraphs, 1):
        if len(paragraph) < source.min_chars:
            short += 1
            continue
        record = {"text": paragraph, "source": "plain_text", "kind": "paragraph", "file": source.path,
                  "paragraph": number}
        writer.write(content_digest(record), to_json_line(record), "plain_text", "paragraph", sample_chars(record))
    stats["paragraphs_read"] += len(paragraphs)
    stats["paragraphs_too_short"] += short
    stats["sources"].append({"type": "plain_text", "path": source.path, "paragraphs": len(paragraphs)})


def new_stats():
    return {"paragraphs_read": 0, "paragraphs_too_short": 0}


def summary_lines(stats):
    if not stats["paragraphs_read"]:
        return []
    made = stats["samples"].get("plain_text", {}).get("paragraph", 0)
    return [f"Created {made} paragraph samples ({stats['paragraphs_too_short']} too short)"]


def describe_empty(stats):
    return f"{stats['paragraphs_read']} paragraphs read"


def input_files(source):
    return [Path(source.path)]


def split_unit(record):
    return "plain_text:" + record["file"]


def routing_group(record):
    return "document:" + Path(record["file"]).stem


SOURCE = SourceKind.from_module(__name__, name="plain_text", config_class=PlainTextSourceConfig, path_is="file",
                                path_holds="a text file")
'''


@pytest.fixture
def plain_text(tmp_path: Path, monkeypatch):
    """The plain_text kind, as a module outside moetune, in the registry for one test."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / f"{MODULE_NAME}.py").write_text(PLAIN_TEXT_SOURCE)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(plugins, "SOURCE_MODULES", {**plugins.SOURCE_MODULES, "plain_text": MODULE_NAME})
    yield
    sys.modules.pop(MODULE_NAME, None)


def _config(tmp_path: Path, sources: list[dict]):
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"data": {"output_path": str(tmp_path / "out" / "all.jsonl"), "sources": sources}}))
    return load_config(path)


def _texts(tmp_path: Path) -> tuple[Path, Path]:
    guide = tmp_path / "guide.txt"
    guide.write_text("Refunds take five days.\n\nA chargeback reverses a card payment.\n\n\n\nok\n")
    notes = tmp_path / "notes.txt"
    notes.write_text("Ledgers balance debits and credits.\n\nA chargeback reverses a card payment.\n")
    return guide, notes


def test_a_registered_kind_loads_with_strict_keys(tmp_path: Path, plain_text):
    guide, _ = _texts(tmp_path)
    config = _config(tmp_path, [{"type": "plain_text", "path": str(guide), "min_chars": 3}])
    [source] = config.data.sources
    assert (type(source).__name__, source.path, source.min_chars) == ("PlainTextSourceConfig", str(guide), 3)

    with pytest.raises(ConfigError) as unknown:
        _config(tmp_path, [{"type": "plain_text", "path": str(guide), "min_char": 3}])
    assert "unknown key 'data.sources[0].min_char'. Did you mean data.sources[0].min_chars?" in unknown.value.message
    with pytest.raises(ConfigError, match=r"data.sources\[1\].min_chars must be at least 1, got 0"):
        _config(tmp_path, [{"type": "qa_jsonl", "path": "q.jsonl"}, {"type": "plain_text", "path": "x", "min_chars": 0}])
    with pytest.raises(ConfigError) as typo:
        _config(tmp_path, [{"type": "plain_txt", "path": str(guide)}])
    assert typo.value.message.endswith("config.yaml:1: data.sources[0].type must be one of rust_repo, qa_jsonl, chat, "
                                       "instruction, text, preference, plain_text; got 'plain_txt'. Did you mean 'plain_text'?")
    with pytest.raises(ConfigError, match=r"data.sources\[0\].type must be one of rust_repo, qa_jsonl, chat, instruction, "
                       r"text, preference, plain_text; got \[1\]"):
        _config(tmp_path, [{"type": [1], "path": str(guide)}])  # not a name at all: no TypeError either


def test_a_registered_kind_builds_splits_and_groups(tmp_path: Path, plain_text, qa_file: Path, capsys):
    guide, notes = _texts(tmp_path)
    config = _config(tmp_path, [{"type": "plain_text", "path": str(guide), "min_chars": 3},
                                {"type": "plain_text", "path": str(notes)}, {"type": "qa_jsonl", "path": str(qa_file)}])
    assert build_dataset(config) == 0

    out = tmp_path / "out" / "all.jsonl"
    records = [json.loads(line) for line in out.read_text().splitlines()]
    paragraphs = [r for r in records if r["source"] == "plain_text"]
    assert [(r["text"], Path(r["file"]).name, r["paragraph"]) for r in paragraphs] == [
        ("Refunds take five days.", "guide.txt", 1),
        ("A chargeback reverses a card payment.", "guide.txt", 2),
        ("Ledgers balance debits and credits.", "notes.txt", 1),
    ]  # notes.txt's second paragraph is guide.txt's: the build drops the exact duplicate for every kind
    stats = json.loads(stats_path_for(out).read_text())
    assert stats["samples"] == {"plain_text": {"paragraph": 3}, "qa_jsonl": {"qa": 6}}
    assert (stats["paragraphs_read"], stats["paragraphs_too_short"], stats["samples_total"]) == (5, 1, 9)
    assert stats["duplicates_removed"] == 1
    assert stats["sources"][:2] == [{"type": "plain_text", "path": str(guide), "paragraphs": 3},
                                    {"type": "plain_text", "path": str(notes), "paragraphs": 2}]
    assert (stats["rust_files_found"], stats["qa_lines_read"], stats["redactions"]) == (0, 18, {})
    printed = capsys.readouterr().out
    assert "Created 3 paragraph samples (1 too short)\nRemoved 1 exact duplicates" in printed  # registry order
    assert "Created 6 QA samples" in printed
    assert "Found 0 Rust files" not in printed  # no rust_repo source: no Rust lines
    assert dataset_is_current(config)  # the kind lists its input files, so an unchanged build is current
    notes.write_text(notes.read_text() + "\nA third paragraph.\n")
    assert not dataset_is_current(config)

    assert {split_unit(r) for r in paragraphs} == {f"plain_text:{guide}", f"plain_text:{notes}"}
    train, validation = split_records(paragraphs, 0.5, seed=0)
    assert sorted([len(train), len(validation)]) == [1, 2]  # one file on each side, all of its paragraphs
    assert len({r["file"] for r in train}) == len({r["file"] for r in validation}) == 1
    assert [group_of(r) for r in paragraphs] == ["document:guide"] * 2 + ["document:notes"]
    assert {_evaluated_as(r) for r in paragraphs} == {"loss"}  # the default: scored by loss only


def test_a_registered_kind_checks_its_path_and_explains_an_empty_build(tmp_path: Path, plain_text):
    with pytest.raises(UserError, match=r"data.sources\[0\].path: .*missing.txt is not a file \(plain_text needs a "
                                        r"text file; relative paths resolve against"):
        build_dataset(_config(tmp_path, [{"type": "plain_text", "path": str(tmp_path / "missing.txt")}]))
    (tmp_path / "short.txt").write_text("a\n\nb\n")
    with pytest.raises(UserError, match="The build produced no samples: 2 paragraphs read. Check data.sources."):
        build_dataset(_config(tmp_path, [{"type": "plain_text", "path": str(tmp_path / "short.txt"), "min_chars": 5}]))


def test_records_of_a_kind_no_longer_registered_fall_back_as_before():
    old = {"text": "fn main() {}", "source": "c_repo", "kind": "function", "path": "a.c"}
    assert split_unit(old) == "text:fn main() {}"
    assert group_of(old) == "kind:function"
    assert _evaluated_as(old) == "loss"
    assert split_unit({"prompt": "Q?", "completion": " A"}) == "text:Q?"


def test_a_kind_module_missing_a_hook_is_named(tmp_path: Path, monkeypatch):
    # The plain_text module above, less two of the functions every kind defines.
    text = PLAIN_TEXT_SOURCE.replace("def summary_lines(", "def _summary_lines(").replace("def new_stats(", "def _new(")
    (tmp_path / "moetune_test_incomplete_source.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TypeError, match="source kind module moetune_test_incomplete_source defines no new_stats, "
                                        "summary_lines: each kind's module defines these functions"):
        importlib.import_module("moetune_test_incomplete_source")
