"""Configs that train the tiny checkpoints of every model type the families load (the ``checkpoint`` fixture
of tests/conftest.py writes them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moetune.config import load_config
from moetune.models.families import all_families

# Every model type the families load (the matrix of tests/models/test_families.py).
MODEL_TYPES = sorted(model_type for spec in all_families() for model_type in spec.model_types)
MOE_TYPES = [model_type for model_type in MODEL_TYPES if model_type != "mpt"]
VOCAB = 128


def run_config(folder: Path, *overrides: str):
    """A config that trains the checkpoint in ``folder``: attention LoRA r 4, float32, rows of 64 tokens."""
    return load_config(None, [f"model.name={folder}", "model.torch_dtype=float32", "model.max_seq_length=64",
                              "lora.r=4", "lora.lora_dropout=0.0", "training.optim=adamw_torch", *overrides])


@pytest.fixture
def config_for(checkpoint):
    """``config_for(model_type, "lora.r=8", ...)`` -> a Config training that tiny checkpoint."""
    return lambda model_type, *overrides: run_config(checkpoint(model_type), *overrides)
