"""The `instruction` and `text` source kinds, and sources mixed by weight."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moetune.config import load_config
from moetune.data.build import build_dataset, stats_path_for
from moetune.data.dataloaders import build_train_eval_datasets, data_lines
from moetune.data.encode import encode
from moetune.data.mixing import mix_by_weight
from moetune.data.tokenizer import train_bpe_tokenizer
from moetune.errors import ConfigError

from .chat_template_fixtures import template_tokenizer
from .test_chat_render import trained_runs

ALPACA = [{"instruction": "Name the fee for card refunds.", "input": "", "output": "2% of the amount."},
          {"instruction": "Convert to cents.", "input": "0.50 EUR", "output": "50 cents.", "system": "Be exact.",
           "expert_label": "fx"},
          {"instruction": "Missing its output."}]


def _config(tmp_path: Path, sources: list[dict], **data):
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"data": {"output_path": str(tmp_path / "out" / "all.jsonl"), "sources": sources, **data}}))
    return load_config(path)


def _built(tmp_path: Path) -> tuple[list[dict], dict]:
    out = tmp_path / "out" / "all.jsonl"
    return [json.loads(line) for line in out.read_text().splitlines()], json.loads(stats_path_for(out).read_text())


def test_instructions_render_with_the_chat_template_or_the_prompt_template(tmp_path: Path):
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(ALPACA))
    assert build_dataset(_config(tmp_path, [{"type": "instruction", "path": str(data)}])) == 0
    records, stats = _built(tmp_path)
    assert (stats["instruction_records_read"], stats["instruction_bad_records"]) == (3, 1)
    assert stats["bad_line_details"] == [f"{data}: row 3: missing `output`"]
    plain, with_input = records
    assert [(m["role"], m["content"]) for m in with_input["messages"]] == [
        ("system", "Be exact."), ("user", "Convert to cents.\n\n0.50 EUR"), ("assistant", "50 cents.")]
    assert with_input["prompt"] == "Be exact.\n\n### Instruction:\nConvert to cents.\n\n### Input:\n0.50 EUR\n\n### Response:\n"
    assert plain["prompt"] == "### Instruction:\nName the fee for card refunds.\n\n### Response:\n"
    assert (with_input["expert_label"], with_input["row"], plain["expert_label"]) == ("fx", 2, None)

    chat_tokenizer = template_tokenizer("qwen3")  # has a chat template: the conversation is rendered
    [row] = encode([with_input], chat_tokenizer, 512).dataset
    assert chat_tokenizer.decode(row["input_ids"]).startswith("<|im_start|>system\nBe exact.<|im_end|>")
    assert trained_runs(chat_tokenizer, row) == ["50 cents.<|im_end|>"]
    plain_tokenizer = train_bpe_tokenizer([with_input["prompt"] + with_input["completion"]], 300)  # none: the prompt template
    [row] = encode([with_input], plain_tokenizer, 512).dataset
    assert plain_tokenizer.decode(row["input_ids"][1:]) == with_input["prompt"] + "50 cents.</s>"
    assert trained_runs(plain_tokenizer, row) == ["50 cents.</s>"]


def test_text_documents_from_parquet_and_jsonl(tmp_path: Path):
    from datasets import Dataset

    Dataset.from_list([{"body": "A ledger balances debits and credits."}, {"body": ""}]).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "e.jsonl").write_text(json.dumps({"body": "Chargebacks reverse card payments."}) + "\n")
    assert build_dataset(_config(tmp_path, [{"type": "text", "path": str(tmp_path), "text_field": "body"}])) == 0
    records, stats = _built(tmp_path)
    assert [(r["text"], Path(r["file"]).name) for r in records] == [
        ("A ledger balances debits and credits.", "d.parquet"), ("Chargebacks reverse card payments.", "e.jsonl")]
    assert (stats["text_records_read"], stats["text_bad_records"]) == (3, 1)


def test_sources_mix_by_weight(tmp_path: Path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"alpha {i}"}) + "\n" for i in range(30)))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": f"beta {i}"}) + "\n" for i in range(10)))
    sources = [{"type": "text", "path": str(tmp_path / "a.jsonl"), "weight": 1},
               {"type": "text", "path": str(tmp_path / "b.jsonl"), "weight": 3}]
    config = _config(tmp_path, sources)
    assert build_dataset(config) == 0
    records, _ = _built(tmp_path)
    assert [r["entry"] for r in records] == [0] * 30 + [1] * 10
    mixed, counts = mix_by_weight(records, config.data.sources, seed=7)
    assert [(c["records"], c["samples"]) for c in counts] == [(30, 10), (10, 30)]  # 40 a epoch: a quarter, three quarters
    beta = [r["text"] for r in mixed if r["entry"] == 1]
    assert sorted(set(beta)) == sorted(f"beta {i}" for i in range(10)) and len(beta) == 30  # every one three times
    assert mix_by_weight(records, config.data.sources, seed=7)[0] == mixed
    assert mix_by_weight(records, config.data.sources, seed=8)[0] != mixed  # another seed, another sample of alpha
    # The trainer mixes its Arrow table of the training split the same way, and says so.
    trained = load_config(tmp_path / "config.yaml", ["validation.validation_split=0", "training.seed=7"])
    data = build_train_eval_datasets(trained, train_bpe_tokenizer([r["text"] for r in records], 260),
                                     cache_dir=tmp_path / "cache")
    assert data.stats["mixture"] == counts and data.stats["train_samples"] == 40
    assert data_lines(data.stats)[-1] == f"mixture: data.sources[1] (text: {tmp_path / 'b.jsonl'}) weight 3: 30 samples per " \
                                         "epoch from 10 records"
    with pytest.raises(ConfigError, match=r"data.sources\[1\].weight is not set while another source's is"):
        _config(tmp_path, [sources[0], {"type": "text", "path": "b.jsonl"}])
