"""Parameter counts of the shipped production configs, from the models' hub config.json (tests/data/hub_configs,
written from the published files), against the figures their publishers give.

Published figures and where they are stated:

* Mixtral-8x7B: 46.7B total, 12.9B used per token (Mistral AI, https://mistral.ai/news/mixtral-of-experts;
  "47B / 13B" in the paper, https://arxiv.org/abs/2401.04088). Every parameter a token touches.
* Qwen3-30B-A3B: 30.5B total, 3.3B activated, 29.9B non-embedding (model card,
  https://huggingface.co/Qwen/Qwen3-30B-A3B). Every parameter a token touches.
* gpt-oss-20b: 20.91B total, 3.61B active (model card, https://arxiv.org/abs/2508.10925, table 1; "21B / 3.6B"
  on https://huggingface.co/openai/gpt-oss-20b). Without the input embedding; the unembedding counts.
* DeepSeek-V2-Lite: 15.7B total, 2.4B activated per token (model card,
  https://huggingface.co/deepseek-ai/DeepSeek-V2-Lite; paper appendix, https://arxiv.org/abs/2405.04434).
  Without the input embedding, as for DeepSeek-V2's 21B.

* GLM-4.5-Air (no shipped config; its hub config.json is test data for the families): 106B total, 12B active
  (Zhipu, https://github.com/zai-org/GLM-4.5 README). The count: 106.85B total; 12.80B active without the
  input embedding, 13.42B with it, so "12B" is the first convention cut to whole billions.

* Qwen3.5-35B-A3B: 35B total, 3B activated (model card, https://huggingface.co/Qwen/Qwen3.5-35B-A3B; "35B
  total/3B active" in transformers' docs, docs/source/en/model_doc/qwen3_5_moe.md). The total is the
  multimodal checkpoint's: 35.11B, the vision tower's 0.45B included; the language model moetune trains is
  34.66B. Active: every parameter a token touches, as for Qwen3-30B-A3B: 3.455B (2.946B without the input
  embedding; both cut to one digit are 3B, the first is Qwen's convention of Qwen3-30B-A3B).
* Llama-4-Scout-17B-16E: 109B total, 17B activated (model card, https://huggingface.co/meta-llama/Llama-4-Scout-17B-16E,
  "17B (Activated) 109B (Total)"; https://ai.meta.com/blog/llama-4-multimodal-intelligence/). The total is the
  multimodal checkpoint's: 108.64B, the vision encoder and projector's 0.87B included; the text model is
  107.77B. Active: every parameter of the text model a token touches (shared expert, one of 16 routed
  experts, attention, both embedding matrices): 17.17B; 16.14B without the input embedding would not be "17B".

Qwen's 3.3B and 3B, DeepSeek's 2.4B and Meta's 17B are the counts cut (not rounded) to the digits given: 3.353B,
3.455B, 2.451B and 17.17B; the other figures agree within 0.4%.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

from moetune.cli import main
from moetune.config import load_config
from moetune.errors import UserError
from moetune.models.families import family_for_model_type
from moetune.models.load.hf_config import config_values, read_hf_config
from moetune.plan.gpus import resolve_gpu
from moetune.plan.model import build_planned_model

ROOT = Path(__file__).resolve().parents[2]
HUB = ROOT / "tests" / "data" / "hub_configs"
PUBLISHED = [  # run config (a shipped file, or the hub model a default config trains), hub config.json, total,
    # active, convention, digits the active figure is given to
    ("config.yaml", "mixtral-8x7b", 46.7e9, 12.9e9, "active", 3),
    ("configs/qwen3-30b-a3b.yaml", "qwen3-30b-a3b", 30.5e9, 3.3e9, "active", 2),
    ("configs/gpt-oss-20b.yaml", "gpt-oss-20b", 20.91e9, 3.61e9, "active_without_input_embedding", 3),
    ("configs/deepseek-v2-lite.yaml", "deepseek-v2-lite", 15.7e9, 2.4e9, "active_without_input_embedding", 2),
    ("Qwen/Qwen3.5-35B-A3B", "qwen3.5-35b-a3b", 35e9, 3e9, "active", 1),
    ("meta-llama/Llama-4-Scout-17B-16E", "llama-4-scout-17b-16e", 109e9, 17e9, "active", 2),
]


def run_config(config: str):
    return load_config(ROOT / config) if config.endswith(".yaml") else load_config(None, [f"model.name={config}"])


@pytest.fixture(scope="module")
def counts():
    return {hub: build_planned_model(run_config(config), HUB / hub / "config.json").counts
            for config, hub, *_ in PUBLISHED}


def hub_config(hub: str):
    """The hub config.json of ``hub`` as moetune reads it (with its family's fixes)."""
    path = HUB / hub / "config.json"
    return read_hf_config(path, fixes=family_for_model_type(config_values(path)["model_type"]).config_fixes)


def checkpoint_counts(hub: str) -> tuple[int, int]:
    """A multimodal checkpoint's parameters, and those of its language model, built whole on the meta device
    (publishers' totals count the vision tower, which moetune does not load)."""
    hf_config = hub_config(hub)
    with torch.device("meta"):
        whole = AutoModelForImageTextToText.from_config(hf_config)
    vision = ("visual.", "vision_model.", "multi_modal_projector.")
    return (sum(p.numel() for p in whole.parameters()),
            sum(p.numel() for name, p in whole.named_parameters() if not any(part in name for part in vision)))


@pytest.mark.parametrize(("config", "hub", "total", "active", "convention", "digits"), PUBLISHED,
                         ids=[hub for _, hub, *_ in PUBLISHED])
def test_counts_of_the_production_shapes_match_the_published_figures(counts, config, hub, total, active, convention,
                                                                     digits):
    planned = counts[hub]
    if hasattr(hub_config(hub), "vision_config"):
        whole, language = checkpoint_counts(hub)
        assert planned.total == language < whole  # the language model, weight for weight
        assert whole == pytest.approx(total, rel=0.01)
    else:
        assert planned.total == pytest.approx(total, rel=0.01)
    ours = getattr(planned, convention)
    if digits == 3:
        assert ours == pytest.approx(active, rel=0.01)
    else:  # the publisher cut the count to one or two digits
        scale = 10 ** (math.floor(math.log10(ours)) - digits + 1)
        assert math.floor(ours / scale) * scale == pytest.approx(active)
        if digits == 2:
            assert ours == pytest.approx(active, rel=0.025)


def test_glm_4_5_air_total_matches_the_published_figure():
    config = load_config(None, ["model.name=zai-org/GLM-4.5-Air"])
    planned = build_planned_model(config, HUB / "glm-4.5-air" / "config.json").counts
    assert planned.total == pytest.approx(106e9, rel=0.01)
    assert math.floor(planned.active_without_input_embedding / 1e9) == 12


def test_the_other_convention_is_reported_beside_it(counts):
    mixtral = counts["mixtral-8x7b"]
    assert mixtral.active - mixtral.active_without_input_embedding == 32000 * 4096  # the embedding matrix
    qwen = counts["qwen3-30b-a3b"]
    assert qwen.total - 2 * 151936 * 2048 == pytest.approx(29.9e9, rel=0.01)  # Qwen's "non-embedding" 29.9B


def test_what_trains_is_counted_by_part_as_the_lora_shapes_give(counts):
    # Mixtral, LoRA r 16 on q/k/v/o (4096 -> 4096, 1024, 1024, 4096) in 32 layers, routers trained whole.
    lora = 16 * ((4096 + 4096) + (4096 + 1024) * 2 + (4096 + 4096))
    assert counts["mixtral-8x7b"].trainable == {"attention": 32 * lora, "router": 32 * 8 * 4096, "experts": 0,
                                                "shared experts": 0, "other": 0}
    # DeepSeek-V2-Lite: MLA projections q_proj (2048 -> 16 x 192), kv_a (2048 -> 576), kv_b (512 -> 16 x 256), o.
    mla = 16 * ((2048 + 3072) + (2048 + 576) + (512 + 4096) + (2048 + 2048))
    assert counts["deepseek-v2-lite"].trainable["attention"] == 27 * mla
    assert counts["deepseek-v2-lite"].trainable["router"] == 26 * 64 * 2048  # the first layer is dense
    # Qwen3.5-35B-A3B, the default attention LoRA (r 16) on every token mixer: 10 gated full-attention layers,
    # q_proj 2048 -> 2 x 16 x 256 (queries and their gate), k/v 2048 -> 2 x 256, o 4096 -> 2048; 30 Gated
    # DeltaNet layers, in_proj_qkv 2048 -> 2 x 16 x 128 + 32 x 128, in_proj_z 2048 -> 32 x 128, in_proj_b and
    # in_proj_a 2048 -> 32, out_proj 4096 -> 2048.
    full = 16 * ((2048 + 8192) + 2 * (2048 + 512) + (4096 + 2048))
    linear = 16 * ((2048 + 8192) + (2048 + 4096) + 2 * (2048 + 32) + (4096 + 2048))
    assert counts["qwen3.5-35b-a3b"].trainable == {"attention": 10 * full + 30 * linear, "router": 0, "experts": 0,
                                                   "shared experts": 0, "other": 0}
    # Llama-4-Scout: q/k/v/o (5120 -> 40 x 128, 8 x 128, 8 x 128; 5120 -> 5120) in 48 layers.
    assert counts["llama-4-scout-17b-16e"].trainable["attention"] == 48 * 16 * (
        (5120 + 5120) + 2 * (5120 + 1024) + (5120 + 5120))


def test_a_config_json_not_on_this_machine_is_one_paragraph_and_exit_2(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    code = main(["plan", "--config", str(ROOT / "config.yaml")])
    err = capsys.readouterr().err
    assert code == 2
    assert "mistralai/Mixtral-8x7B-v0.1" in err and "--model-config" in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_an_unknown_gpu_is_one_paragraph_and_exit_2(capsys):
    code = main(["plan", "--config", str(ROOT / "config.yaml"), "--gpu", "h300",
                 "--model-config", str(HUB / "mixtral-8x7b" / "config.json")])
    err = capsys.readouterr().err
    assert code == 2 and "h100, h200, a100-80, l40s" in err and err.count("\n") == 1
    with pytest.raises(UserError, match="positive"):
        resolve_gpu(memory_gib=0)


def test_the_verb_prints_the_plan_as_json_and_exits_1_when_it_does_not_fit(capsys):
    args = ["plan", "--config", str(ROOT / "configs" / "qwen3-30b-a3b.yaml"), "--model-config",
            str(HUB / "qwen3-30b-a3b" / "config.json"), "--json"]
    assert main([*args, "--gpu", "h100"]) == 0
    fits = json.loads(capsys.readouterr().out)
    assert fits["fits"] is True and fits["largest_micro_batch"] >= 1
    assert fits["parameters"]["total"] == pytest.approx(30.5e9, rel=0.01)
    memory = fits["memory_bytes_per_gpu"]
    assert memory["total"] == memory["allocated"] + memory["allowance"]
    assert fits["compute"]["steps_per_hour"] > 0
    assert main([*args, "--gpu", "l40s"]) == 1  # 57 GiB of bf16 weights on a 44 GiB card
    too_small = json.loads(capsys.readouterr().out)
    assert too_small["fits"] is False and too_small["remedies"]
