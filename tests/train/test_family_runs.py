"""The families through the real CLI, from a tiny checkpoint written with save_pretrained (the files a
hub repository holds, tokenizer included): `moetune train` logs finite losses, the router's balance
loss and expert usage per MoE layer, and `moetune eval` writes its report.

Every model type passes the library-level matrix (tests/models/test_families.py); through the CLI run
one model type per router kind and model shape, which keeps this file within the suite's budget.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moetune.models.families.mpt.modeling  # noqa: F401  (registers mpt_moe with the Auto classes)
from moetune.cli import main
from moetune.data.tokenizer import train_bpe_tokenizer
from moetune.models.families import all_families, family_for_model_type
from moetune.models.layout import find_moe_blocks
from moetune.models.routing.balance import switch_balance_loss

from .conftest import read_metrics, write_dataset

# model_type -> also evaluated with `moetune eval`. One per router kind and shape: softmax with
# transformers' Switch loss (mixtral), a shared expert (qwen2_moe), top-k of biased logits with eager
# attention (gpt_oss), sigmoid + correction bias + groups after dense layers (deepseek_v3), a router
# returning (scores, logits) (llama4_text), a softmax whose loss moetune computes (hunyuan_v1_moe), a
# frozen bias Parameter (ernie4_5_moe), probabilities from a router in the decoder layer (gemma4_text),
# linear attention with padded rows (qwen3_next), Mamba and gate-less experts (nemotron_h), per-expert
# modules (mpt_moe) and a dense model with no routing (mpt).
CLI_TYPES = {"mixtral": True, "qwen2_moe": True, "gpt_oss": True, "deepseek_v3": True, "llama4_text": True,
             "hunyuan_v1_moe": False, "ernie4_5_moe": False, "gemma4_text": False, "qwen3_next": True,
             "nemotron_h": False, "mpt_moe": False, "mpt": True}

RUN_CONFIG = """
model: {{name: {model}, torch_dtype: float32, max_seq_length: 64}}
lora: {{r: 4, lora_alpha: 8, lora_dropout: 0.0}}
moe: {{use_auxiliary_loss: true, auxiliary_loss_weight: 0.01, freeze_router: false}}
data: {{output_path: {data}}}
validation: {{validation_split: 0.2}}
training:
  output_dir: {out}
  max_steps: 4
  per_device_train_batch_size: 4
  per_device_eval_batch_size: 8
  learning_rate: 1.0e-2
  warmup_steps: 0
  logging_steps: 1
  eval_steps: 4
  save_steps: 1000
  seed: 3
logging: {{tensorboard: false}}
"""
EVAL_OVERRIDES = ["inference.do_sample=false", "inference.max_new_tokens=4", "inference.repetition_penalty=1.0"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run faster on one thread than on several, which only wait for each other (on a shared
    2-core runner the matrix took 4.7x as long with torch's default threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """(root, dataset path, tokenizer) shared by every family's run."""
    root = tmp_path_factory.mktemp("family-runs")
    data = write_dataset(root / "data.jsonl", samples=40)
    texts = [r.get("text") or r["prompt"] + r["completion"] for r in map(json.loads, data.read_text().splitlines())]
    return root, data, train_bpe_tokenizer(texts, 300)


def save_hub_checkpoint(folder: Path, model_type: str, tokenizer, **extra) -> Path:
    """A tiny random ``model_type`` model and its tokenizer, saved as a hub repository holds them."""
    values = dict(family_for_model_type(model_type).tiny_configs[model_type], vocab_size=len(tokenizer),
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **values))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def moe_layers(model_type: str) -> int:
    """How many MoE blocks the tiny ``model_type`` model has (dense layers and dense MPT have none)."""
    spec = family_for_model_type(model_type)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **spec.tiny_configs[model_type]))
    return len(find_moe_blocks(model, spec.router_name))


def write_run_config(root: Path, model: Path, data: Path, name: str) -> tuple[Path, Path]:
    out = root / f"run-{name}"
    config = root / f"{name}.yaml"
    config.write_text(textwrap.dedent(RUN_CONFIG.format(model=model, data=data, out=out)))
    return config, out


def test_the_cli_cases_are_model_types_moetune_supports():
    assert set(CLI_TYPES) <= {t for spec in all_families() for t in spec.model_types}


@pytest.mark.parametrize("model_type", CLI_TYPES)
def test_train_logs_losses_and_expert_usage_and_eval_writes_the_report(workspace, model_type):
    root, data, tokenizer = workspace
    checkpoint = save_hub_checkpoint(root / model_type, model_type, tokenizer)
    config, out = write_run_config(root, checkpoint, data, model_type)
    assert main(["train", "--config", str(config)]) == 0

    records = read_metrics(out)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    layers = moe_layers(model_type)
    for r in train:
        assert math.isfinite(r["loss"]) and math.isfinite(r["lm_loss"])
        assert r["loss"] == pytest.approx(r["lm_loss"] + 0.01 * r["aux_loss"], rel=1e-5)
        if layers == 0:
            assert r["aux_loss"] == 0.0 and "expert_usage" not in r
            continue
        assert len(r["expert_usage"]) == layers and all(len(layer) == 4 for layer in r["expert_usage"])
        assert all(sum(layer) == pytest.approx(1.0, abs=1e-3) for layer in r["expert_usage"])
        # Switch (pooled over layers): even routing gives top_k = 2; DeepSeek's sequence-wise loss:
        # about 1 per MoE layer. A zero here would mean the routing was never captured.
        router = family_for_model_type(model_type).router_of(AutoConfig.from_pretrained(checkpoint))
        low = 1.0 if router.balance_loss is switch_balance_loss else 0.5 * layers
        assert low <= r["aux_loss"] < 4.0 * layers
    assert train[-1]["lm_loss"] < train[0]["lm_loss"]
    assert [r["step"] for r in records if "eval_loss" in r] == [4]
    if not CLI_TYPES[model_type]:
        return

    report_dir = root / f"eval-{model_type}"
    assert main(["eval", "--config", str(config), "--output-dir", str(report_dir), "--max-samples", "4",
                 *EVAL_OVERRIDES]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert (report_dir / "report.md").read_text().strip()
    assert report["samples"]["evaluated"] == 4 and report["tuned_model"]["kind"] == "adapter"
    for name in ("base", "tuned"):
        assert math.isfinite(report["perplexity"][name]["loss"])
    assert report["perplexity"]["tuned"]["loss"] != report["perplexity"]["base"]["loss"]
    if layers == 0:
        assert report["routing"] is None
    else:
        assert set(report["routing"]) == {"base", "tuned"}
        assert (report_dir / report["routing"]["tuned"]["heatmap"]).is_file()


# ------------------------------------------------------------------- aux-loss-free balancing, end to end


def test_bias_updates_follow_the_logged_load_are_saved_in_the_adapter_and_used_by_eval(workspace):
    from safetensors.torch import load_file

    from moetune.config import load_config
    from moetune.eval.load import load_base, load_eval_tokenizer, load_tuned, resolve_tuned_model

    root, data, tokenizer = workspace
    # One group of experts: with two groups of two, top-2 always takes a whole group, and the
    # pairwise-equal loads can cancel out over a few steps.
    checkpoint = save_hub_checkpoint(root / "deepseek_v3-bias", "deepseek_v3", tokenizer, n_group=1, topk_group=1)
    config_path, out = write_run_config(root, checkpoint, data, "deepseek_v3-bias")
    rate = 0.01
    overrides = [f"moe.router_bias_update_rate={rate}", "moe.freeze_router=true", "moe.use_auxiliary_loss=false"]
    assert main(["train", "--config", str(config_path), *overrides]) == 0

    # DeepSeek-V3's rule, replayed from the logged load of each step (one batch per step): every
    # expert's bias moved by `rate` up when it took less than the mean share, down when more.
    usage = torch.tensor([r["expert_usage"] for r in read_metrics(out) if "loss" in r])  # (steps, layers, experts)
    expected = rate * torch.sign(usage.mean(-1, keepdim=True) - usage).sum(0)
    saved = {k: v for k, v in load_file(out / "adapter_model.safetensors").items() if k.endswith("e_score_correction_bias")}
    assert len(saved) == 1 and expected.abs().sum() > 0  # one MoE layer (the first is dense), and it moved
    [(key, bias)] = saved.items()
    assert torch.allclose(bias, expected[0], atol=1e-6)
    # The router rides in the adapter for its bias; its weight stays frozen, the checkpoint's own.
    router_weight = load_file(out / "adapter_model.safetensors")["base_model.model.model.layers.1.mlp.gate.weight"]
    assert torch.equal(router_weight, load_file(checkpoint / "model.safetensors")["model.layers.1.mlp.gate.weight"])

    config = load_config(config_path, overrides)
    tuned_path = resolve_tuned_model(config, None)
    eval_tokenizer = load_eval_tokenizer(config, tuned_path)
    tuned = load_tuned(config, tuned_path, eval_tokenizer, base=load_base(config, eval_tokenizer)).eval()
    buffers = [b for n, b in tuned.named_buffers() if n.endswith("modules_to_save.default.e_score_correction_bias")]
    assert len(buffers) == 1 and torch.equal(buffers[0], bias)
    ids = torch.tensor([eval_tokenizer("fn main() { let amount = refund(capture); }")["input_ids"]])
    with torch.no_grad():
        with_bias = tuned(ids).logits
        buffers[0].zero_()  # the checkpoint's own bias: the routing, and so the logits, differ
        assert not torch.allclose(tuned(ids).logits, with_bias)
    report_dir = root / "eval-deepseek_v3-bias"
    assert main(["eval", "--config", str(config_path), "--output-dir", str(report_dir), "--max-samples", "4",
                 *EVAL_OVERRIDES, *overrides]) == 0
    assert json.loads((report_dir / "report.json").read_text())["routing"]["tuned"]


# ---------------------------------------------------------------- Mixtral in the per-expert hub layout


def per_expert_keys(keys) -> set[str]:
    return {k for k in keys if ".block_sparse_moe.experts." in k and k.endswith((".w1.weight", ".w2.weight", ".w3.weight"))}


def test_a_per_expert_bf16_sharded_mixtral_loads_exactly_and_merges_back_in_that_layout(workspace):
    from peft import PeftModel
    from safetensors.torch import load_file

    from moetune.config import load_config
    from moetune.models.load.factory import build_base_model

    root, data, tokenizer = workspace
    folder = root / "mixtral-hub"
    values = dict(family_for_model_type("mixtral").tiny_configs["mixtral"], vocab_size=len(tokenizer),
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    fused = AutoModelForCausalLM.from_config(AutoConfig.for_model("mixtral", **values)).to(torch.bfloat16).eval()
    fused.save_pretrained(folder, max_shard_size="200KB")
    tokenizer.save_pretrained(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    hub = {k: v for shard in sorted(set(index.values())) for k, v in load_file(folder / shard).items()}
    assert len(set(index.values())) > 1 and len(per_expert_keys(hub)) == 2 * 4 * 3  # layers x experts x w1/w2/w3
    assert not any("gate_up_proj" in k or k.endswith("experts.down_proj") for k in hub)
    assert all(t.dtype == torch.bfloat16 for t in hub.values())

    config_path, out = write_run_config(root, folder, data, "mixtral-hub")
    overrides = ["model.torch_dtype=bfloat16", "training.max_steps=2", "training.eval_steps=1000",
                 "post_training.merge_and_save=true"]
    config = load_config(config_path, overrides)
    ids = torch.tensor([tokenizer("fn main() { let amount = refund(capture); }")["input_ids"]])
    loaded = build_base_model(config, tokenizer, seed=config.training.seed).eval()
    # The reference: the same weights saved in transformers' fused layout, loaded in bf16 with the
    # kernels moetune chose, so any difference would come from the per-expert conversion.
    fused.save_pretrained(root / "mixtral-fused", save_original_format=False)
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in load_file(root / "mixtral-fused" / "model.safetensors"))
    reference = AutoModelForCausalLM.from_pretrained(
        root / "mixtral-fused", dtype=torch.bfloat16, attn_implementation=loaded.config._attn_implementation,
        experts_implementation=loaded.config._experts_implementation).eval()
    with torch.no_grad():
        assert (loaded(ids).logits - reference(ids).logits).abs().max().item() == 0.0

    assert main(["train", "--config", str(config_path), *overrides]) == 0
    merged_files = sorted((out / "merged").glob("model*.safetensors"))
    merged = {k: v for f in merged_files for k, v in load_file(f).items()}
    assert per_expert_keys(merged) == per_expert_keys(hub)
    assert not any("gate_up_proj" in k or k.endswith("experts.down_proj") for k in merged)
    # The experts were frozen: each one is written back bit for bit; attention carries the merged LoRA.
    assert all(torch.equal(merged[k], hub[k]) for k in per_expert_keys(hub))
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], hub["model.layers.0.self_attn.q_proj.weight"])
    reloaded = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), out).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits.float(), tuned(ids).logits.float(), atol=0.02)
        assert reloaded.dtype == torch.bfloat16
