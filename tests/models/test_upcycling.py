"""Sparse upcycling of MPT: equivalence with the dense model, the symmetry problem, routing,
save/load through moetune and through AutoModelForCausalLM, generation, and `moetune upcycle`."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, MptForCausalLM

from moetune.config import MoeConfig, UpcyclingConfig
from moetune.errors import UserError
from moetune.models.families.mpt.modeling import MoeFeedForward, MptMoeForCausalLM
from moetune.models.families.mpt.upcycle import moe_layer_indices, upcycle_checkpoint, upcycle_mpt
from moetune.models.layout import is_expert_parameter
from moetune.models.load.factory import build_base_model, build_model
from moetune.models.loss.objective import compute_losses


def upcycling(**values) -> MoeConfig:
    """The moe section with these moe.upcycling values."""
    return MoeConfig(upcycling=UpcyclingConfig(**values))


def dense_mpt(mpt_config) -> MptForCausalLM:
    return build_model(mpt_config("lora.enabled=false"), seed=42).eval()


@pytest.mark.parametrize("top_k, every", [(1, 1), (2, 1), (2, 2)])
def test_upcycled_model_computes_the_dense_logits(mpt_config, tokens, top_k, every):
    dense = dense_mpt(mpt_config)
    moe = upcycle_mpt(dense, upcycling(num_experts=4, top_k=top_k, every_n_blocks=every)).eval()
    assert [i for i, b in enumerate(moe.transformer.blocks) if isinstance(b.ffn, MoeFeedForward)] == \
        moe_layer_indices(2, every)
    out = moe(tokens, output_router_logits=True)
    assert torch.allclose(out.logits, dense(tokens).logits, atol=1e-5)
    assert len(out.router_logits) == len(moe_layer_indices(2, every))
    assert out.router_logits[0].shape == (tokens.numel(), 4)


def test_expert_noise_breaks_the_symmetry_and_the_router_has_its_init_std(mpt_config):
    moe = upcycle_mpt(dense_mpt(mpt_config), upcycling(num_experts=4, expert_noise_std=0.01, router_init_std=0.1))
    assert moe.transformer.blocks[0].ffn.router.weight.std().item() == pytest.approx(0.1, rel=0.15)
    experts = moe.transformer.blocks[0].ffn.experts
    assert not torch.equal(experts[0].up_proj.weight, experts[1].up_proj.weight)
    relative = (experts[0].up_proj.weight - experts[1].up_proj.weight).std() / experts[0].up_proj.weight.std()
    assert 0.005 < relative.item() < 0.03  # two independent draws of 1% noise: sqrt(2) * 1%


def test_identical_experts_get_identical_gradients_and_the_router_no_lm_gradient(mpt_config, tokens):
    # The reason docs/upcycling.md gives for training the experts: nothing else breaks the symmetry.
    moe = upcycle_mpt(dense_mpt(mpt_config), upcycling(num_experts=2, top_k=2))
    block = moe.transformer.blocks[0].ffn
    with torch.no_grad():
        block.router.weight.zero_()  # a symmetric router: every token goes to both experts, weight 1/2 each
    moe.train()
    moe(tokens, labels=tokens).loss.backward()  # LM loss only (no router logits requested)
    first, second = (expert.up_proj.weight.grad for expert in block.experts)
    assert first.abs().sum() > 0 and torch.equal(first, second)
    # The output is the dense FFN whatever the routing weights are, so the LM loss gives the router nothing.
    for moe_block in (block, moe.transformer.blocks[1].ffn):
        assert moe_block.router.weight.grad.abs().max().item() < 1e-7


def test_router_jitter_applies_in_training_only(mpt_config, tokens):
    moe = upcycle_mpt(dense_mpt(mpt_config), upcycling(num_experts=4, router_jitter=0.5))
    moe.eval()
    evaluated = [moe(tokens, output_router_logits=True).router_logits[0] for _ in range(2)]
    assert torch.equal(*evaluated)
    moe.train()
    assert not torch.allclose(moe(tokens, output_router_logits=True).router_logits[0], evaluated[0])


def test_capacity_drops_second_choices_first():
    from transformers import MptConfig

    from moetune.models.families.mpt.modeling import MptMoeConfig

    config = MptMoeConfig(**MptConfig(d_model=8, n_heads=2, n_layers=1).to_dict() | {"model_type": "mpt_moe"},
                          num_local_experts=2, num_experts_per_tok=2, capacity_factor=0.5)
    block = MoeFeedForward(config)
    chosen = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])
    # capacity = ceil(0.5 * 4 tokens * 2 / 2 experts) = 2 per expert, first choices served first:
    # expert 0 takes tokens 0 and 1, expert 1 token 2 (first choices); token 3's first choice overflows;
    # of the second choices only token 0's still fits (expert 1's second place).
    assert block.within_capacity(chosen).tolist() == [[1, 1], [1, 0], [1, 0], [0, 0]]


def test_default_training_plan_trains_experts_and_router(mpt_config):
    model = build_model(mpt_config("moe.upcycling.enabled=true"), seed=42)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".ffn.router.modules_to_save." in n for n in names)
    expert_names = [n for n in names if is_expert_parameter(n)]
    assert len(expert_names) == 2 * 4 * 2  # layers * experts * (up, down): full expert training
    assert {n.split(".")[-4] for n in names if "lora_A" in n} == {"Wqkv", "out_proj"}


def test_expert_training_lora_and_frozen(mpt_config):
    lora = build_model(mpt_config("moe.upcycling.enabled=true", "moe.expert_training=lora"), seed=42)
    expert_trainable = [n for n, p in lora.named_parameters() if p.requires_grad and is_expert_parameter(n)]
    assert expert_trainable and all("lora_" in n for n in expert_trainable)
    frozen = build_model(mpt_config("moe.upcycling.enabled=true", "moe.expert_training=frozen"), seed=42)
    assert not any(p.requires_grad for n, p in frozen.named_parameters() if is_expert_parameter(n))
    with pytest.raises(UserError, match="needs|lora.enabled is false"):
        build_model(mpt_config("moe.upcycling.enabled=true", "moe.expert_training=lora", "lora.enabled=false"), seed=42)


def test_upcycled_losses_work_like_mixtral(mpt_config, tokens):
    config = mpt_config("moe.upcycling.enabled=true", "moe.router_z_loss_weight=0.01")
    model = build_model(config, seed=42, gradient_checkpointing=True)
    model.train()
    parts = compute_losses(model, {"input_ids": tokens}, config)
    assert len(parts.router_logits) == 2 and parts.z_loss.item() > 0
    parts.aux_loss.backward()
    router_grad = model.base_model.model.transformer.blocks[0].ffn.router.modules_to_save["default"].weight.grad
    assert router_grad is not None and router_grad.abs().sum() > 0


def test_saved_upcycled_model_reloads_identically_through_moetune_and_auto(mpt_config, tokens, tmp_path):
    model = upcycle_mpt(dense_mpt(mpt_config), upcycling(num_experts=4, top_k=2, expert_noise_std=0.05)).eval()
    expected = model(tokens).logits
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mpt_moe"

    auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(auto, MptMoeForCausalLM)
    assert torch.equal(auto(tokens).logits, expected)
    loaded = build_model(mpt_config("model.random_init=false", f"model.name={tmp_path}", "model.architecture=null",
                                    "lora.enabled=false"), seed=42).eval()
    assert isinstance(loaded, MptMoeForCausalLM)
    assert torch.equal(loaded(tokens).logits, expected)


def test_missing_or_unexpected_weights_are_errors(mpt_config, tmp_path):
    upcycle_mpt(dense_mpt(mpt_config), upcycling(num_experts=4)).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    removed = weights.pop("transformer.blocks.1.ffn.experts.3.down_proj.weight")
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"missing keys: \['transformer.blocks.1.ffn.experts.3.down_proj.weight'\]"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    weights["transformer.blocks.1.ffn.experts.3.down_proj.weight"] = removed
    weights["transformer.blocks.1.ffn.experts.4.down_proj.weight"] = removed.clone()
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="unexpected keys"):
        build_model(mpt_config("model.random_init=false", f"model.name={tmp_path}", "lora.enabled=false"), seed=42)


def test_generation_after_upcycling_uses_the_cache(mpt_config, tokens):
    moe = upcycle_mpt(dense_mpt(mpt_config), upcycling(num_experts=4, top_k=2, expert_noise_std=0.05)).eval()
    prompt = tokens[:1, :5]
    cached = moe.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = moe.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (1, 11)
    assert torch.equal(cached, uncached)


def test_forward_and_cached_generation_raise_no_future_warning(mpt_config, tokens):
    import warnings

    moe = upcycle_mpt(dense_mpt(mpt_config), upcycling(num_experts=4, top_k=2, expert_noise_std=0.05)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        full = moe(tokens, output_router_logits=True)
        prefix = moe(tokens[:, :-1], use_cache=True)
        assert prefix.cache.get_seq_length() == tokens.shape[1] - 1
        step = moe(tokens[:, -1:], cache=prefix.cache, use_cache=True)
        generated = moe.generate(tokens[:1, :5], max_new_tokens=3, do_sample=False)
    # The cached step computes what the whole sequence does for its last token.
    assert torch.allclose(step.logits[:, -1], full.logits[:, -1], atol=1e-5)
    assert full.aux_loss is not None and generated.shape == (1, 8)


def test_upcycle_checkpoint_writes_model_and_tokenizer(mpt_config, tokens, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    dense = dense_mpt(mpt_config)
    dense.save_pretrained(tmp_path / "dense")
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(tmp_path / "dense")

    config = mpt_config("moe.upcycling.num_experts=2", "moe.upcycling.top_k=1")
    assert upcycle_checkpoint(config, str(tmp_path / "dense"), str(tmp_path / "moe")) == 0
    written = {p.name for p in (tmp_path / "moe").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= written
    saved = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert (saved["model_type"], saved["num_local_experts"], saved["num_experts_per_tok"]) == ("mpt_moe", 2, 1)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert torch.allclose(reloaded(tokens).logits, dense(tokens).logits, atol=1e-5)


def test_upcycle_checkpoint_rejects_bad_model_dirs(mpt_config, tmp_path):
    config = mpt_config()
    with pytest.raises(UserError, match="no such directory"):
        upcycle_checkpoint(config, str(tmp_path / "nowhere"), str(tmp_path / "out"))
    with pytest.raises(UserError, match="has no config.json"):
        upcycle_checkpoint(config, str(tmp_path), str(tmp_path / "out"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mpt"}))
    with pytest.raises(UserError, match="the weights could not be read"):
        upcycle_checkpoint(config, str(tmp_path), str(tmp_path / "out"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(UserError, match="is a 'mixtral' model; sparse upcycling takes a dense MPT"):
        upcycle_checkpoint(config, str(tmp_path), str(tmp_path / "out"))


def test_adapter_trained_on_an_upcycled_model_reloads_onto_a_rebuilt_base(mpt_config, tokens, tmp_path):
    # Upcycling at train time draws a random router and expert noise; evaluation rebuilds the base,
    # which must come out identical for the adapter to mean the same thing.
    overrides = ("moe.upcycling.enabled=true", "moe.upcycling.expert_noise_std=0.01", "moe.expert_training=lora")
    model = build_model(mpt_config(*overrides), seed=42)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    model.eval()
    expected = model(tokens).logits
    model.save_pretrained(tmp_path)
    torch.manual_seed(1234)  # a different global RNG state must not matter
    base = build_base_model(mpt_config(*overrides), seed=42)
    reloaded = PeftModel.from_pretrained(base, tmp_path).eval()
    assert torch.allclose(reloaded(tokens).logits, expected, atol=1e-6)


def test_moetune_upcycle_command(mpt_config, tokens, tmp_path, monkeypatch, capsys):
    from moetune.cli import main

    dense = dense_mpt(mpt_config)
    dense.save_pretrained(tmp_path / "dense")
    monkeypatch.chdir(tmp_path)
    assert main(["upcycle", "--model", "dense", "--num-experts", "4", "--top-k", "2", "--output", "moe"]) == 0
    saved = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert (saved["model_type"], saved["num_local_experts"], saved["num_experts_per_tok"]) == ("mpt_moe", 4, 2)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert torch.allclose(reloaded(tokens).logits, dense(tokens).logits, atol=1e-5)
    assert main(["upcycle", "--model", "dense", "--top-k", "3", "--output", "moe2"]) == 2
    assert "moe.upcycling.top_k must be 1 or 2, got 3." in capsys.readouterr().err
    assert not (tmp_path / "moe2").exists()
    assert main(["upcycle", "--model", "mosaicml/mpt-7b", "--output", "moe3"]) == 2  # only a folder is read
    err = capsys.readouterr().err
    assert "--model mosaicml/mpt-7b: no such directory" in err and "hf download mosaicml/mpt-7b" in err
    assert "Traceback" not in err and not (tmp_path / "moe3").exists()


def test_upcycle_reads_a_config_only_when_given_and_keeps_the_dense_dtype(mpt_config, tokens, tmp_path, monkeypatch):
    from moetune.cli import main

    dense = dense_mpt(mpt_config)
    dense.save_pretrained(tmp_path / "dense")
    monkeypatch.chdir(tmp_path)  # a config.yaml here, as at the repository root, must not be read
    (tmp_path / "config.yaml").write_text("model:\n  torch_dtype: bfloat16\n"
                                          "moe:\n  upcycling: {top_k: 1}\n  auxiliary_loss_weight: 0.05\n")
    assert main(["upcycle", "--model", "dense", "--num-experts", "4", "--output", "plain"]) == 0
    saved = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert (saved["num_experts_per_tok"], saved["router_aux_loss_coef"], saved["dtype"]) == (2, 0.001, "float32")
    upcycled = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    assert {p.dtype for p in upcycled.parameters()} == {torch.float32}
    assert (upcycled(tokens).logits - dense(tokens).logits).abs().max().item() < 1e-5

    assert main(["upcycle", "--config", "config.yaml", "--model", "dense", "--num-experts", "4", "--output", "configured"]) == 0
    saved = json.loads((tmp_path / "configured" / "config.json").read_text())
    assert (saved["num_experts_per_tok"], saved["router_aux_loss_coef"], saved["dtype"]) == (1, 0.05, "float32")

    assert main(["upcycle", "--model", "dense", "--num-experts", "4", "--dtype", "bfloat16", "--output", "half"]) == 0
    assert {t.dtype for t in load_file(tmp_path / "half" / "model.safetensors").values()} == {torch.bfloat16}


def test_upcycle_at_the_repository_root_prints_no_deepspeed_notice(mpt_config, tokens, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    dense = dense_mpt(mpt_config)
    dense.save_pretrained(tmp_path / "dense")
    root = Path(__file__).resolve().parents[2]  # holds the production config.yaml (bfloat16)
    result = subprocess.run([sys.executable, "-m", "moetune", "upcycle", "--model", str(tmp_path / "dense"),
                             "--num-experts", "4", "--top-k", "2", "--output", str(tmp_path / "moe")],
                            cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Setting accelerator" not in result.stderr + result.stdout
    assert "(top-2, float32) written to" in result.stderr
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert (reloaded(tokens).logits - dense(tokens).logits).abs().max().item() < 1e-5
