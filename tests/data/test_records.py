"""Reading a built dataset back: a file that is not one gives exit 2 with file:line, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moetune.cli import main
from moetune.data.records import read_records
from moetune.errors import UserError

_GOOD = json.dumps({"text": "fn a() {}", "source": "rust_repo", "kind": "function"}) + "\n"


@pytest.mark.parametrize(("content", "expected"), [
    (b"\x7fELF\x02\x01\x01\x00\x00\x00\xff\xfe", "data.jsonl:1: not UTF-8 text (byte 11 of the line); "
     "is data.output_path a dataset built by `moetune data`?"),
    ((_GOOD + '{"text": 12345}\n').encode(), "data.jsonl:2: a dataset line needs `text` (a string), "
     "`prompt` + `completion` (strings) or `messages` (a list); `text` is a JSON number."),
    ((_GOOD * 3 + '{"completion": "x", "kind": "qa"}\n').encode(), "data.jsonl:4: a dataset line needs `text` "
     "(a string), `prompt` + `completion` (strings) or `messages` (a list); `prompt` is missing (keys: `completion`, `kind`)."),
    ((_GOOD + '{"prompt": "q", "completion": null}\n').encode(), "data.jsonl:2: a dataset line needs `text` "
     "(a string), `prompt` + `completion` (strings) or `messages` (a list); `completion` is a JSON null."),
    ((_GOOD + '["text"]\n').encode(), "data.jsonl:2: a dataset line needs `text` (a string), "
     "`prompt` + `completion` (strings) or `messages` (a list); got a JSON array."),
    ((_GOOD + '{"messages": [{"content": "x"}]}\n').encode(), "data.jsonl:2: a dataset line needs `text` (a string), "
     "`prompt` + `completion` (strings) or `messages` (a list); `messages` must be a list of objects with a `role`."),
    ((_GOOD + '{"text": "fn b() {').encode(), "data.jsonl:2: not a JSON line (Unterminated string starting at); "
     "rebuild it with `moetune data`."),
], ids=["binary", "text-not-a-string", "completion-without-prompt", "completion-null", "not-an-object", "message-without-role",
                            "truncated"])
def test_training_on_a_dataset_that_is_not_one_exits_2_naming_file_and_line(tmp_path: Path, capsys, content, expected):
    (tmp_path / "data.jsonl").write_bytes(content)
    config = tmp_path / "tiny.yaml"
    # Records are read (to train the tokenizer) before any model is built.
    config.write_text(f"model: {{name: tiny, architecture: mixtral, random_init: true, tokenizer_vocab_size: 256}}\n"
                      f"data: {{output_path: {tmp_path / 'data.jsonl'}}}\n"
                      f"training: {{output_dir: {tmp_path / 'run'}}}\n")

    assert main(["train", "--config", str(config)]) == 2

    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / expected}\n"


def test_every_record_of_a_good_dataset_is_read(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_text(_GOOD + "\n" + json.dumps({"prompt": "q", "completion": "a", "kind": "qa"}) + "\r\n")

    assert [r.get("text", r.get("completion")) for r in read_records(path)] == ["fn a() {}", "a"]


def test_a_record_with_text_of_the_wrong_type_is_reported_before_anything_uses_it(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_text(_GOOD + '{"text": ["a"], "prompt": "q", "completion": "a"}\n')

    with pytest.raises(UserError, match=r"d\.jsonl:2: .*`text` is a JSON array\.$"):
        list(read_records(path))
