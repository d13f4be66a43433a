"""Attention-only LoRA on pretrained MoE models: experts frozen on both module layouts, router
frozen or trained-and-saved, exclude_modules honoured."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from moetune.errors import UserError
from moetune.models.families import get_family
from moetune.models.layout import find_moe_blocks, is_expert_parameter
from moetune.models.load.factory import build_model
from moetune.models.trainable.plan import apply_training_plan


def trainable(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


# ------------------------------------------------- the older layout: block_sparse_moe.experts.N.w1


class LegacyExpert(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, inner, bias=False)
        self.w2 = nn.Linear(inner, hidden, bias=False)
        self.w3 = nn.Linear(hidden, inner, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LegacySparseMoeBlock(nn.Module):
    def __init__(self, hidden: int, inner: int, experts: int):
        super().__init__()
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(LegacyExpert(hidden, inner) for _ in range(experts))

    def forward(self, x):
        weights, chosen = torch.topk(torch.softmax(self.gate(x), dim=-1), 2, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for index, expert in enumerate(self.experts):
            mask = (chosen == index).to(x.dtype) * weights
            out = out + expert(x) * mask.sum(-1, keepdim=True)
        return out


class LegacyAttention(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(hidden, hidden, bias=False) for _ in range(4))

    def forward(self, x):
        scores = self.q_proj(x) @ self.k_proj(x).transpose(-1, -2) / x.shape[-1] ** 0.5
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        return self.o_proj(torch.softmax(scores.masked_fill(~causal, -1e9), -1) @ self.v_proj(x))


class LegacyLayer(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.self_attn = LegacyAttention(hidden)
        self.block_sparse_moe = LegacySparseMoeBlock(hidden, 2 * hidden, 4)

    def forward(self, x):
        x = x + self.self_attn(x)
        return x + self.block_sparse_moe(x)


class LegacyMixtral(nn.Module):
    """model.layers.N.{self_attn.q_proj, block_sparse_moe.gate, block_sparse_moe.experts.N.w1}"""

    def __init__(self, vocab: int = 128, hidden: int = 64):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, hidden)
        self.model.layers = nn.ModuleList(LegacyLayer(hidden) for _ in range(2))
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids):
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(x)


# ------------------------------------------------------------------------------------ the tests


def test_fused_layout_trains_attention_lora_only(mixtral_config):
    model = build_model(mixtral_config(), seed=42)
    names = trainable(model)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    adapted = {n.split(".")[-4] for n in names}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj"}
    experts = [(n, p) for n, p in model.named_parameters() if is_expert_parameter(n)]
    assert {n.rsplit(".", 1)[-1] for n, _ in experts} == {"gate_up_proj", "down_proj"}
    assert not any(p.requires_grad for _, p in experts)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".mlp.gate." in n)


def test_legacy_layout_experts_frozen_and_router_saved(mixtral_config):
    config = mixtral_config("moe.freeze_router=false")
    model = apply_training_plan(LegacyMixtral(), config, family=get_family("mixtral"))
    assert [b.path for b in find_moe_blocks(model, "gate")] == [
        "base_model.model.model.layers.0.block_sparse_moe", "base_model.model.model.layers.1.block_sparse_moe"]
    expert_params = [(n, p) for n, p in model.named_parameters() if is_expert_parameter(n)]
    assert len(expert_params) == 2 * 4 * 3  # layers * experts * (w1, w2, w3)
    assert not any(p.requires_grad for _, p in expert_params)
    names = trainable(model)
    routers = [n for n in names if ".block_sparse_moe.gate." in n]
    assert routers == [f"base_model.model.model.layers.{i}.block_sparse_moe.gate.modules_to_save.default.weight"
                       for i in range(2)]
    assert {n.split(".")[-4] for n in names if "lora_" in n} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert model.peft_config["default"].modules_to_save == [f"model.layers.{i}.block_sparse_moe.gate" for i in range(2)]
    assert model(torch.randint(0, 128, (1, 5))).shape == (1, 5, 128)


def test_exclude_modules_are_left_without_lora(mixtral_config):
    model = build_model(mixtral_config("lora.exclude_modules=[o_proj, model.layers.0.self_attn.q_proj]"), seed=42)
    adapted = {n.rsplit(".lora_A", 1)[0].removeprefix("base_model.model.") for n in trainable(model) if ".lora_A." in n}
    assert adapted == {"model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
                       "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
                       "model.layers.1.self_attn.v_proj"}


def test_unknown_target_module_is_a_user_error(mixtral_config):
    with pytest.raises(UserError, match=r"lora.target_modules names 'query'.*'q_proj'"):
        build_model(mixtral_config("lora.target_modules=[query]"), seed=42)


def test_trainable_parameter_line_is_logged(mixtral_config, caplog):
    with caplog.at_level(logging.INFO, logger="moetune"):
        model = build_model(mixtral_config(), seed=42)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    # r=4 on q,o (64x64) and k,v (64x32): per layer 2*4*(64+64) + 2*4*(64+32) = 1792
    assert n_trainable == 2 * 1792
    assert f"trainable params: {n_trainable:,} || all params: {n_all:,} || trainable%: " in caplog.text


def test_trained_router_is_saved_in_the_adapter_and_reloads_to_identical_logits(mixtral_config, tokens, tmp_path):
    build_model(mixtral_config("lora.enabled=false"), seed=42).save_pretrained(tmp_path / "base")
    model = build_model(mixtral_config("model.random_init=false", f"model.name={tmp_path / 'base'}",
                                       "moe.freeze_router=false"), seed=42)
    with torch.no_grad():  # stands in for training: move every trainable tensor
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))
    model.eval()
    expected = model(tokens).logits
    model.save_pretrained(tmp_path / "adapter")

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    router_keys = sorted(k for k in saved if ".mlp.gate." in k)
    assert router_keys == [f"base_model.model.model.layers.{i}.mlp.gate.weight" for i in range(2)]
    trained_router = model.base_model.model.model.layers[0].mlp.gate.modules_to_save["default"].weight
    assert torch.equal(saved[router_keys[0]], trained_router)

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert torch.allclose(reloaded(tokens).logits, expected, atol=1e-6)
    untouched_router = AutoModelForCausalLM.from_pretrained(tmp_path / "base").model.layers[0].mlp.gate.weight
    assert not torch.allclose(untouched_router, trained_router)


def test_frozen_router_is_neither_trained_nor_saved(mixtral_config, tmp_path):
    model = build_model(mixtral_config("moe.freeze_router=true"), seed=42)
    assert model.peft_config["default"].modules_to_save is None
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".mlp.gate." in n)
