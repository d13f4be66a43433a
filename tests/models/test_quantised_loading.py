"""QLoRA: 4-bit NF4 attention weights through bitsandbytes (an optional extra), LoRA on top."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from moetune.config import load_config
from moetune.errors import ConfigError, UserError
from moetune.models.load.factory import build_model

HAS_BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None


@pytest.mark.skipif(not HAS_BITSANDBYTES, reason="bitsandbytes (the moetune[quant] extra) is not installed")
def test_4bit_loading_quantises_attention_and_trains_lora(mixtral_config, tokens, tmp_path):
    import bitsandbytes as bnb

    build_model(mixtral_config("lora.enabled=false"), seed=42).save_pretrained(tmp_path)
    config = mixtral_config("model.random_init=false", f"model.name={tmp_path}", "model.load_in_4bit=true")
    model = build_model(config, seed=42)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    assert q_proj.base_layer.weight.quant_state.quant_type == "nf4"
    assert q_proj.base_layer.weight.quant_state.nested  # double quantisation
    assert q_proj.base_layer.compute_dtype == torch.float32  # model.torch_dtype
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    assert torch.isfinite(loss) and q_proj.lora_B["default"].weight.grad is not None


def test_missing_bitsandbytes_says_how_to_install_it(mixtral_config, monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    build_model(mixtral_config("lora.enabled=false"), seed=42).save_pretrained(tmp_path)
    config = mixtral_config("model.random_init=false", f"model.name={tmp_path}", "model.load_in_4bit=true")
    with pytest.raises(UserError, match=r"model.load_in_4bit needs the bitsandbytes package.*pip install moetune\[quant\]"):
        build_model(config, seed=42)


def test_random_weights_cannot_be_quantised(mixtral_config):
    with pytest.raises(ConfigError, match="model.random_init builds random weights, which cannot be loaded in 4/8-bit"):
        mixtral_config("model.load_in_4bit=true")


# Fused-expert families, with expert LoRA (PEFT's target_parameters) on the 4-bit base too; CPU runs the eager
# experts kernel, and batched_mm is the other kernel that takes no dtype cast of its own.
FUSED = [("mixtral", ()), ("qwen3_moe", ("moe.expert_training=lora",)), ("deepseek_v2", ("moe.expert_training=lora",)),
         ("mixtral", ("moe.expert_training=lora", "model.experts_implementation=batched_mm"))]


@pytest.mark.skipif(not HAS_BITSANDBYTES, reason="bitsandbytes (the moetune[quant] extra) is not installed")
@pytest.mark.parametrize("autocast", [True, False], ids=["bf16-autocast", "no-autocast"])
@pytest.mark.parametrize(("model_type", "overrides"), FUSED, ids=[f"{t}-{'-'.join(o) or 'default'}" for t, o in FUSED])
def test_4bit_keeps_fused_experts_in_their_dtype_and_trains(checkpoint, tokens, model_type, overrides, autocast):
    # bitsandbytes leaves the fused 3-D experts unquantised; PEFT's preparation casts them to float32 with the
    # norms, which doubled the model's largest weights. They go back to bf16, frozen; the norms keep float32.
    config = load_config(None, [f"model.name={checkpoint(model_type)}", "model.torch_dtype=bfloat16",
                                "model.load_in_4bit=true", "model.max_seq_length=64", "lora.r=4",
                                "lora.lora_dropout=0.0", *overrides])
    model = build_model(config, seed=0)
    params = dict(model.named_parameters())
    experts = {n: p for n, p in params.items() if p.ndim >= 3 and ".experts." in n}
    assert experts and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in experts.values())
    assert all(p.dtype == torch.float32 for n, p in params.items() if "norm" in n)
    # training.bf16 runs the step under accelerate's autocast; without it (training.bf16 false, evaluation) the
    # float32 hidden states meet the bf16 experts, which then compute in bf16 as Linear4bit does.
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    assert torch.isfinite(loss) and trainable
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable.values())
    if "moe.expert_training=lora" in overrides:
        assert any(".experts." in n and p.grad.abs().sum() > 0 for n, p in trainable.items())
