"""ESFT expert scores and selection: a forced routing gives known scores, the threshold rule, and the
`moetune experts` verb end to end (experts.json + PNG), then an esft run trained, resumed and evaluated
from its selection."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moetune.cli import main
from moetune.data.tokenizer import train_bpe_tokenizer
from moetune.eval.expert_selection import score_experts, select_experts
from moetune.models.families import get_family

from ..train.conftest import WORDS, read_metrics, write_tiny_run

RECORDS = ([{"prompt": f"Question: what is {w}?\nAnswer:", "completion": f" {w} {w}", "source": "qa_jsonl", "kind": "qa",
             "expert_label": label} for w, label in zip(WORDS, ["payments", "refunds"] * 10, strict=False)]
           + [{"text": f"fn {w}() {{ let x = {w}; }}", "source": "rust_repo", "kind": "function"} for w in WORDS[:6]])


def forced_gpt_oss(tokenizer):
    """A tiny gpt-oss whose router sends every token to experts 0 and 3 (zero weights, bias 5 / 4)."""
    spec = get_family("gpt_oss")
    values = {**spec.tiny_configs["gpt_oss"], "vocab_size": len(tokenizer)}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt_oss", **values))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.weight.zero_()
            layer.mlp.router.bias.copy_(torch.tensor([5.0, 0.0, 0.0, 4.0]))
    return model


def test_scores_of_a_forced_routing_are_the_known_gate_weights_and_token_ratios():
    tokenizer = train_bpe_tokenizer([r.get("text") or r["prompt"] + r["completion"] for r in RECORDS], 300)
    scores = score_experts(forced_gpt_oss(tokenizer), tokenizer, RECORDS, max_seq_length=64, batch_size=4)
    top = 1 / (1 + math.exp(-1.0))  # softmax over the chosen pair (5, 4)
    expected_gate = torch.tensor([[top, 0.0, 0.0, 1 - top]] * 2, dtype=torch.float64)
    expected_token = torch.tensor([[0.5, 0.0, 0.0, 0.5]] * 2, dtype=torch.float64)
    assert scores.samples == len(RECORDS) and scores.top_k == 2
    assert torch.allclose(scores.gate, expected_gate, atol=1e-6)
    assert torch.allclose(scores.token, expected_token, atol=1e-12)
    assert set(scores.per_group) == {"label:payments", "label:refunds", "kind:function"}
    assert [g["samples"] for g in scores.per_group.values()] == [6, 10, 9]  # 19 words, labels alternating
    for group in scores.per_group.values():
        assert torch.allclose(group["gate"], expected_gate, atol=1e-6)
    assert select_experts(scores.gate, 0.1) == [[0], [0]]  # 0.73 alone passes the paper's gate threshold
    assert select_experts(scores.gate, 0.8) == [[0, 3], [0, 3]]
    assert select_experts(scores.token, 0.2) == [[0], [0]]  # a tie (0.5, 0.5) goes to the lower index
    assert select_experts(scores.token, 0.6) == [[0, 3], [0, 3]]


def test_selection_takes_the_best_experts_until_the_threshold_share():
    scores = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.05, 0.05, 0.0, 0.9], [2.0, 1.0, 1.0, 0.0]])
    assert select_experts(scores, 0.5) == [[1, 3], [3], [0]]  # 0.4 < 0.5, 0.4 + 0.3 >= 0.5; unnormalised row: share
    assert select_experts(scores, 0.7) == [[1, 3], [3], [0, 1]]  # exactly reaching the threshold stops
    assert select_experts(scores, 1.0) == [[0, 1, 2, 3], [0, 1, 3], [0, 1, 2]]  # zero scores never count
    assert select_experts(torch.zeros(1, 4), 0.5) == [[]]


def test_experts_verb_writes_the_selection_and_heatmap_and_esft_trains_resumes_and_evaluates(tmp_path, capsys):
    config, out = write_tiny_run(tmp_path)
    experts = tmp_path / "sel" / "experts.json"
    assert main(["experts", "--config", str(config), "--max-samples", "24", "--output", str(experts)]) == 0
    report = json.loads(experts.read_text())
    assert report["method"] == "gate" and report["threshold"] == 0.1 and report["samples"] == 24
    assert report["selected"] == select_experts(torch.tensor(report["scores"]["gate"]), 0.1)
    assert report["summary"]["experts_per_layer"] == [len(layer) for layer in report["selected"]]
    assert set(report["per_group"]) == {"kind:function", "label:payments", "label:refunds"}
    assert sum(g["samples"] for g in report["per_group"].values()) == 24
    for table in report["scores"].values():
        assert len(table) == 2 and all(len(row) == 4 and abs(sum(row) - 1) < 1e-5 for row in table)
    assert experts.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert f"per MoE layer: {' '.join(str(n) for n in report['summary']['experts_per_layer'])}" in printed

    assert main(["experts", "--config", str(config), "--method", "token", "--threshold", "1.5"]) == 2
    assert "--threshold must be in (0, 1], got 1.5" in capsys.readouterr().err

    esft = ["moe.expert_training=esft", f"moe.esft.experts={experts}", "lora.enabled=false", "logging.tensorboard=false",
            "training.max_steps=2", "training.save_steps=1", "training.eval_steps=2"]
    assert main(["train", "--config", str(config), *esft]) == 0
    selection = json.loads((out / "esft_experts.json").read_text())["selected"]
    assert selection == report["selected"]
    assert not (out / "model.safetensors").exists()  # the artefact is the selected experts, not the model
    assert main(["train", "--config", str(config), *esft, "training.max_steps=3",
                 "training.resume_from_checkpoint=latest"]) == 0
    assert [m["step"] for m in read_metrics(out) if "loss" in m][-2:] == [2, 3]
    assert main(["eval", "--config", str(config), "--max-samples", "4", "inference.max_new_tokens=2"]) == 0
    evaluated = json.loads((out / "eval" / "report.json").read_text())
    assert evaluated["tuned_model"]["kind"] == "esft"
    assert evaluated["perplexity"]["tuned"]["loss"] != evaluated["perplexity"]["base"]["loss"]


@pytest.mark.parametrize("flag", [["--output", "x.yaml"], ["--max-samples", "0"]])
def test_experts_verb_rejects_bad_flags(tmp_path, capsys, flag):
    config, _ = write_tiny_run(tmp_path)
    assert main(["experts", "--config", str(config), *flag]) == 2
    assert "must" in capsys.readouterr().err
