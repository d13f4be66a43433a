"""QLoRA: 4-bit NF4 attention weights through bitsandbytes (an optional extra), LoRA on top."""

from __future__ import annotations

import importlib.util

import pytest
import torch

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
