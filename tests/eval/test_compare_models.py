"""`moetune eval` on a tiny trained run: every report field for QA and Rust samples, paths, merged models, errors."""

import json
import math
import runpy
import shutil
import sys
from pathlib import Path

import pytest

from moetune.cli import main
from moetune.config import load_config
from moetune.data.split import load_splits
from moetune.eval.generation import rust_generation_prompt
from moetune.eval.load import load_base, load_eval_tokenizer, load_tuned, resolve_tuned_model
from moetune.eval.qa_metrics import exact_match, token_f1
from moetune.eval.scoring import score_records

from .conftest import EVAL_OVERRIDES

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def full_report(trained_run, tmp_path_factory):
    config_path, run, metrics = trained_run
    out = tmp_path_factory.mktemp("eval-full")
    code = main(["eval", "--config", str(config_path), "--output-dir", str(out), *EVAL_OVERRIDES])
    return code, out, json.loads((out / "report.json").read_text()), metrics, load_config(config_path, EVAL_OVERRIDES)


def test_report_compares_base_and_tuned_loss(full_report):
    code, _, report, metrics, config = full_report
    assert code == 0
    p = report["perplexity"]
    validation = load_splits(config)[1]
    assert report["samples"] == {"validation": len(validation), "evaluated": len(validation),
                                 "qa": sum(r["source"] == "qa_jsonl" for r in validation),
                                 "rust_items": sum(rust_generation_prompt(r) is not None for r in validation),
                                 "preference_pairs": 0}
    assert report["preference"] is None  # no preference record in this dataset
    # The fine-tuned loss on the whole validation split is the trainer's last eval loss.
    assert p["tuned"]["loss"] == pytest.approx([r for r in metrics if "eval_loss" in r][-1]["eval_loss"], rel=1e-5)
    # The base figures (adapter switched off) are those of a freshly built base model.
    tokenizer = load_eval_tokenizer(config, resolve_tuned_model(config, None))
    fresh = score_records(load_base(config, tokenizer), tokenizer, validation, config.model.max_seq_length, 8)
    assert p["base"]["loss"] == pytest.approx(fresh.loss, rel=1e-6) and p["base"]["tokens"] == fresh.tokens
    for name in ("base", "tuned"):
        assert p[name]["perplexity"] == pytest.approx(math.exp(p[name]["loss"]))
    assert p["tuned"]["loss"] < p["base"]["loss"]
    assert p["loss_improvement_percent"] == pytest.approx((p["base"]["loss"] - p["tuned"]["loss"]) / p["base"]["loss"] * 100)
    assert p["perplexity_improvement_percent"] == pytest.approx(
        (p["base"]["perplexity"] - p["tuned"]["perplexity"]) / p["base"]["perplexity"] * 100)
    assert set(p["per_group"]) == {"kind:function", "label:payments", "label:refunds"} & {
        f"label:{r['expert_label']}" if r["source"] == "qa_jsonl" else f"kind:{r['kind']}" for r in validation}
    assert sum(g["tokens"] for g in p["per_group"].values()) == p["tuned"]["tokens"]


def test_report_scores_qa_answers_per_label(full_report):
    _, _, report, _, _ = full_report
    qa = report["qa"]
    assert len(qa["samples"]) == report["samples"]["qa"] > 0
    for name in ("base", "tuned"):
        for s in qa["samples"]:
            assert s[f"{name}_exact_match"] == exact_match(s[name], s["gold"])
            assert s[f"{name}_f1"] == pytest.approx(token_f1(s[name], s["gold"]))
        labels = {s["expert_label"] for s in qa["samples"]}
        assert set(qa[name]["per_label"]) == labels
        assert qa[name]["overall"]["count"] == len(qa["samples"])
        assert qa[name]["overall"]["f1"] == pytest.approx(sum(s[f"{name}_f1"] for s in qa["samples"]) / len(qa["samples"]))
        for label, score in qa[name]["per_label"].items():
            mine = [s for s in qa["samples"] if s["expert_label"] == label]
            assert score["count"] == len(mine)
            assert score["exact_match"] == pytest.approx(sum(s[f"{name}_exact_match"] for s in mine) / len(mine))


def test_report_shows_rust_bodies_side_by_side(full_report):
    _, out, report, _, _ = full_report
    samples = report["rust"]["samples"]
    assert len(samples) == report["samples"]["rust_items"] > 0
    for s in samples:
        assert s["prompt"].endswith("{") and f"fn {s['name']}(" in s["prompt"]
        assert s["reference"].strip() and isinstance(s["base"], str) and isinstance(s["tuned"], str)
    assert any(s["base"] != s["tuned"] for s in samples)  # the adapter changes what is generated
    md = (out / "report.md").read_text()
    for heading in ("## Summary", "## Loss per group", "## Question answering", "## Routing by group", "## Rust samples"):
        assert heading in md
    assert f"`{samples[0]['name']}`" in md


def test_report_has_routing_by_group_for_both_models(full_report):
    _, out, report, _, _ = full_report
    for name in ("base", "tuned"):
        routing = report["routing"][name]
        assert set(routing["groups"]) == set(report["perplexity"]["per_group"])
        for shares in routing["shares"].values():
            assert len(shares) == 2 and all(len(layer) == 4 and sum(layer) == pytest.approx(1.0, abs=1e-5) for layer in shares)
        assert len(routing["mutual_information_bits"]) == 2
        assert 0.0 <= routing["specialisation"] <= 1.0
        assert (out / routing["heatmap"]).read_bytes()[:4] == b"\x89PNG"


def test_a_checkpoint_through_the_evaluate_moe_shim(trained_run, monkeypatch, capsys):
    config_path, run, _ = trained_run
    checkpoint = run / "checkpoint-4"
    monkeypatch.setattr(sys, "argv", ["evaluate_moe.py", "--config", str(config_path), "--adapter-path", str(checkpoint),
                                      "--max-samples", "6", *EVAL_OVERRIDES])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "evaluate_moe.py"), run_name="__main__")
    assert exit_info.value.code == 0
    report = json.loads((checkpoint / "eval" / "report.json").read_text())  # default: <adapter>/eval
    assert report["samples"]["evaluated"] == 6 and report["tuned_model"] == {"path": str(checkpoint), "kind": "adapter"}
    assert "perplexity" in capsys.readouterr().out  # the table goes to stdout


def test_a_merged_model_scores_like_its_adapter(trained_run, tmp_path):
    config_path, run, _ = trained_run
    config = load_config(config_path, EVAL_OVERRIDES)
    adapter = resolve_tuned_model(config, None)
    tokenizer = load_eval_tokenizer(config, adapter)
    merged = tmp_path / "merged"
    load_tuned(config, adapter, tokenizer).merge_and_unload().save_pretrained(merged)
    tokenizer.save_pretrained(merged)
    for path, out in ((run, tmp_path / "a"), (merged, tmp_path / "m")):
        assert main(["eval", "--config", str(config_path), "--adapter-path", str(path), "--max-samples", "5",
                     "--output-dir", str(out), *EVAL_OVERRIDES]) == 0
    from_adapter, from_merged = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("a", "m"))
    assert from_merged["tuned_model"]["kind"] == "merged"
    assert from_merged["perplexity"]["tuned"]["loss"] == pytest.approx(from_adapter["perplexity"]["tuned"]["loss"], rel=1e-4)
    assert from_merged["perplexity"]["base"]["loss"] == pytest.approx(from_adapter["perplexity"]["base"]["loss"], rel=1e-6)


def _eval_error(config_path, capsys, *args):
    code = main(["eval", "--config", str(config_path), "--max-samples", "2", *args, *EVAL_OVERRIDES])
    return code, capsys.readouterr().err


def test_a_missing_adapter_path_is_a_clear_error(trained_run, tmp_path, capsys):
    code, err = _eval_error(trained_run[0], capsys, "--adapter-path", str(tmp_path / "nope"))
    assert code == 2 and "is not a directory" in err and "Traceback" not in err


def test_an_unfinished_run_points_at_its_checkpoints(trained_run, tmp_path, capsys):
    shutil.copytree(trained_run[1] / "checkpoint-8", tmp_path / "run" / "checkpoint-8")
    code, err = _eval_error(trained_run[0], capsys, "--adapter-path", str(tmp_path / "run"))
    assert code == 2 and "holds neither a PEFT adapter" in err and "checkpoint-8" in err


@pytest.mark.parametrize("damage, message", [
    ({"adapter_config.json": "{not json"}, "is corrupt"),
    ({"adapter_model.safetensors": "garbage"}, "cannot be loaded"),
    ({"adapter_model.safetensors": None}, "no adapter weights"),
    ({"adapter_config.json": "[1, 2]"}, "adapter_config.json is not a PEFT adapter config: it holds a JSON list"),
    ({"adapter_config.json": '{"peft_type": "LORA", "r": 8, "target_modules": 42}'},
     'adapter_config.json: "target_modules" must be a list of module names (or null), got 42'),
])
def test_a_corrupt_adapter_is_a_clear_error(trained_run, tmp_path, capsys, damage, message):
    checkpoint = shutil.copytree(trained_run[1] / "checkpoint-4", tmp_path / "checkpoint-4")
    for name, text in damage.items():
        (checkpoint / name).unlink()
        if text is not None:
            (checkpoint / name).write_text(text)
    code, err = _eval_error(trained_run[0], capsys, "--adapter-path", str(checkpoint))
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("model_shape, message", [
    ("num_hidden_layers: 1, hidden_size: 64", "does not fit"),  # adapter weights for a layer the base lacks
    ("num_hidden_layers: 2, hidden_size: 32", "cannot be loaded onto the base model"),  # other weight shapes
])
def test_an_adapter_for_another_model_is_a_clear_error(trained_run, capsys, model_shape, message):
    override = (f"model.config_overrides={{{model_shape}, intermediate_size: 128, num_attention_heads: 4, "
                "num_key_value_heads: 2, num_local_experts: 4, num_experts_per_tok: 2, max_position_embeddings: 256}")
    code, err = _eval_error(trained_run[0], capsys, override)
    assert code == 2 and message in err and "Traceback" not in err
