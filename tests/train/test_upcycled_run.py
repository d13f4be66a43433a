"""Training an MPT upcycled on the fly through the same loop: padding instead of packing, experts that diverge."""

import json
import math

import pytest
from safetensors.torch import load_file

from moetune.cli import main

from .conftest import read_metrics

MPT = "{d_model: 64, n_heads: 4, n_layers: 2, expansion_ratio: 2, max_seq_len: 256}"


@pytest.mark.parametrize("expert_training", ["lora", "full"])
def test_upcycled_mpt_trains_with_aux_loss_and_expert_usage(tiny_run, expert_training):
    config, out = tiny_run
    assert main(["train", "--config", str(config), "model.architecture=mpt", f"model.config_overrides={MPT}",
                 "moe.upcycling.enabled=true", "moe.upcycling.num_experts=4", "moe.upcycling.top_k=2",
                 "moe.upcycling.expert_noise_std=0.01", "moe.router_z_loss_weight=0.001",
                 f"moe.expert_training={expert_training}",
                 "lora.target_modules=[Wqkv, out_proj]", "lora.modules_to_save=[wte]",
                 "training.max_steps=4", "training.save_steps=4", "training.eval_steps=4"]) == 0
    train = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        assert r["aux_loss"] > 1.0 and r["z_loss"] > 0.0
        assert r["loss"] == pytest.approx(r["lm_loss"] + 0.01 * r["aux_loss"] + 0.001 * r["z_loss"], rel=1e-5)
        assert len(r["expert_usage"]) == 2 and all(len(layer) == 4 for layer in r["expert_usage"])
    adapter = load_file(out / "adapter_model.safetensors")
    assert any(".router." in k for k in adapter)  # the new router always trains and is saved
    expert_keys = [k for k in adapter if ".experts." in k]
    if expert_training == "lora":
        assert expert_keys and all("lora_" in k for k in expert_keys)
    else:
        assert expert_keys and not any("lora_" in k for k in expert_keys)

    # The run evaluates like any other: the base is upcycled again from the same seed, the adapter goes on top.
    # A few generated tokens: the checks below are on perplexity, and the upcycled MPT generates without a KV cache.
    assert main(["eval", "--config", str(out / "config.yaml"), "--max-samples", "8", "inference.max_new_tokens=4"]) == 0
    report = json.loads((out / "eval" / "report.json").read_text())
    base, tuned = report["perplexity"]["base"], report["perplexity"]["tuned"]
    assert math.isfinite(base["loss"]) and math.isfinite(tuned["loss"]) and tuned["loss"] != base["loss"]
    assert base["tokens"] == tuned["tokens"] > 0
