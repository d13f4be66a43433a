"""Tiny models built from config (2 layers, hidden 64, 4 experts, vocab 128): no network, seconds each.

Tests get the config builders and a token batch as fixtures (pytest imports test modules in
importlib mode, so a shared helper module could not be imported by name).
"""

from __future__ import annotations

import pytest
import torch

from moetune.config import Config, load_config

VOCAB = 128

MIXTRAL_OVERRIDES = (
    "{num_hidden_layers: 2, hidden_size: 64, intermediate_size: 128, num_attention_heads: 4, "
    f"num_key_value_heads: 2, num_local_experts: 4, num_experts_per_tok: 2, vocab_size: {VOCAB}, "
    "max_position_embeddings: 128}"
)
MPT_OVERRIDES = f"{{n_layers: 2, d_model: 64, n_heads: 4, vocab_size: {VOCAB}, max_seq_len: 128}}"


def make_mixtral_config(*overrides: str) -> Config:
    """A random-init tiny Mixtral with attention LoRA (r=4), float32."""
    return load_config(None, ["model.architecture=mixtral", "model.random_init=true", "model.torch_dtype=float32", "model.max_seq_length=128",
                              f"model.config_overrides={MIXTRAL_OVERRIDES}", "lora.r=4", "lora.lora_dropout=0.0",
                              *overrides])


def make_mpt_config(*overrides: str) -> Config:
    """A random-init tiny dense MPT, float32; add moe.upcycling.enabled=true to upcycle it to 4 experts."""
    return load_config(None, ["model.architecture=mpt", "model.random_init=true", "model.torch_dtype=float32", "model.max_seq_length=128",
                              f"model.config_overrides={MPT_OVERRIDES}", "moe.upcycling.num_experts=4", "lora.r=4",
                              "lora.lora_dropout=0.0", *overrides])


def make_token_batch(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    """A (batch, length) tensor of token ids below VOCAB."""
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run faster on one thread than on several, which only wait for each other: on a
    shared 2-core machine the family matrix took 4.7x as long with torch's default threads. Module-scoped,
    so the setting ends with tests/models' modules: a session-wide one leaked into later directories,
    whose exact comparisons with a fresh interpreter (default threads) then differed in the last bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def mixtral_config():
    """``mixtral_config("lora.r=8", ...)`` -> Config of a tiny random Mixtral."""
    return make_mixtral_config


@pytest.fixture
def mpt_config():
    """``mpt_config("moe.upcycling.enabled=true", ...)`` -> Config of a tiny random MPT."""
    return make_mpt_config


@pytest.fixture
def tokens() -> torch.Tensor:
    """A (2, 12) batch of token ids below VOCAB (128)."""
    return make_token_batch()
