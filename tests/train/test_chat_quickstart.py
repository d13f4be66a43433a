"""The chat quickstart, end to end and short: conversations rendered by ChatML for training, validation, eval and
generate alike, the template saved with the run's tokenizer."""

import json
from pathlib import Path

from moetune.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_chat_quickstart_trains_evaluates_and_generates_with_one_rendering(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the config names its sample data relative to the repository root
    run = tmp_path / "run"
    overrides = [f"data.output_path={tmp_path / 'all.jsonl'}", f"training.output_dir={run}", "training.max_steps=4",
                 "training.eval_steps=4", "training.save_steps=4", "training.per_device_train_batch_size=2",
                 "inference.max_new_tokens=6"]
    config = ["--config", "configs/quickstart-chat.yaml"]
    assert main(["data", *config, *overrides]) == 0
    assert main(["train", *config, *overrides]) == 0
    saved = json.loads((run / "tokenizer" / "tokenizer_config.json").read_text())
    template = (run / "tokenizer" / "chat_template.jinja")
    assert "<|im_start|>" in (template.read_text() if template.is_file() else saved.get("chat_template", ""))
    assert any("eval_loss" in json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())

    assert main(["eval", *config, *overrides, "--max-samples", "3", "--output-dir", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    samples = report["qa"]["samples"]
    assert report["samples"]["qa"] == len(samples) > 0 and {s["source"] for s in samples} == {"chat"}
    assert all(s["gold"] and isinstance(s["tuned"], str) for s in samples)
    assert report["perplexity"]["tuned"]["tokens"] > 0

    out = tmp_path / "generated.jsonl"
    assert main(["generate", *config, *overrides, "--prompt", "Refund fee?", "--output", str(out)]) == 0
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    # The prompt became a user turn: <|im_start|>user\nRefund fee?<|im_end|>\n<|im_start|>assistant\n
    assert record["prompt_tokens"] > len("Refund fee?".split()) + 4 and record["completion_tokens"] <= 6
