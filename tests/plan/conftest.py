"""Tiny checkpoints of every model type the families load (2 layers, hidden 64, 4 experts), written with
save_pretrained as a download leaves them, and configs that train them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moetune.models.families.mpt.modeling  # noqa: F401  (registers mpt_moe with the Auto classes)
from moetune.config import load_config
from moetune.models.families import all_families, family_for_model_type

# The model types plan's estimates were checked on. Of the others (tests/models/test_families.py), the
# activations / FLOPs / model-state checks hold for most, not yet for afmoe, granitemoehybrid, kimi_linear,
# llama4_text, mistral4, phimoe, qwen3_next, qwen3_5_moe_text and solar_open.
MODEL_TYPES = ["deepseek_v2", "deepseek_v3", "glm4_moe", "gpt_oss", "mixtral", "mpt", "mpt_moe", "olmoe", "qwen2_moe",
               "qwen3_moe"]
assert set(MODEL_TYPES) <= {model_type for spec in all_families() for model_type in spec.model_types}
MOE_TYPES = [model_type for model_type in MODEL_TYPES if model_type != "mpt"]
VOCAB = 128


def tiny_model(model_type: str, seed: int = 0):
    spec = family_for_model_type(model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **spec.tiny_configs[model_type]))


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """``checkpoint(model_type)`` -> folder of a tiny random checkpoint saved with save_pretrained."""
    root = tmp_path_factory.mktemp("plan-checkpoints")
    made: dict[str, Path] = {}

    def make(model_type: str) -> Path:
        if model_type not in made:
            made[model_type] = root / model_type
            tiny_model(model_type).save_pretrained(made[model_type])
        return made[model_type]

    return make


def run_config(folder: Path, *overrides: str):
    """A config that trains the checkpoint in ``folder``: attention LoRA r 4, float32, rows of 64 tokens."""
    return load_config(None, [f"model.name={folder}", "model.torch_dtype=float32", "model.max_seq_length=64",
                              "lora.r=4", "lora.lora_dropout=0.0", "training.optim=adamw_torch", *overrides])


@pytest.fixture
def config_for(checkpoint):
    """``config_for(model_type, "lora.r=8", ...)`` -> a Config training that tiny checkpoint."""
    return lambda model_type, *overrides: run_config(checkpoint(model_type), *overrides)
