"""`moetune data --show N`: the training samples as the model sees them, trained tokens marked; --json."""

from __future__ import annotations

import json
from pathlib import Path

from moetune.cli import main

CONVERSATIONS = [
    {"messages": [{"role": "system", "content": "You are a payments assistant."},
                  {"role": "user", "content": "What fee applies to card refunds?"},
                  {"role": "assistant", "content": "A 2% fee."}]},
    {"messages": [{"role": "user", "content": "And bank transfers?"}, {"role": "assistant", "content": "0.50 EUR."}]},
]


def _config(tmp_path: Path) -> Path:
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS))
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{random_init: true, architecture: mixtral, tokenizer_vocab_size: 300}}\n"
                      f"data: {{output_path: {tmp_path / 'out' / 'all.jsonl'}, chat_template: chatml, "
                      f"sources: [{{type: chat, path: {data}}}]}}\n"
                      f"validation: {{validation_split: 0}}\ntraining: {{output_dir: {tmp_path / 'run'}}}\n")
    return config


def test_show_marks_the_trained_tokens(tmp_path: Path, capsys):
    assert main(["data", "--config", str(_config(tmp_path)), "--show", "2"]) == 0
    shown = capsys.readouterr().out
    assert ("<|im_start|>system\nYou are a payments assistant.<|im_end|>\n<|im_start|>user\nWhat fee applies to card "
            "refunds?<|im_end|>\n<|im_start|>assistant\n⟦A 2% fee.<|im_end|>⟧\n") in shown
    assert "<|im_start|>assistant\n⟦0.50 EUR.<|im_end|>⟧\n" in shown
    assert shown.count("── sample ") == 2 and "(trained tokens between ⟦ and ⟧; 2 of the first 2 training records)" in shown
    assert (tmp_path / "out" / "all.jsonl").is_file()  # built on the way


def test_show_json_writes_ids_tokens_and_labels(tmp_path: Path, capsys):
    assert main(["data", "--config", str(_config(tmp_path)), "--show", "1", "--json"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    sample = json.loads(line)
    assert (sample["sample"], sample["source"], sample["where"].endswith("chats.jsonl:1")) == (1, "chat", True)
    assert len(sample["input_ids"]) == len(sample["tokens"]) == len(sample["labels"])
    trained = [token for token, label in zip(sample["tokens"], sample["labels"], strict=True) if label != -100]
    assert trained[-1] == "<|im_end|>" and sample["tokens"][0] == "<|im_start|>"


def test_json_without_show_is_bad_input(tmp_path: Path, capsys):
    assert main(["data", "--config", str(_config(tmp_path)), "--json"]) == 2
    assert "--json goes with --show N" in capsys.readouterr().err
