"""Tiny random checkpoints of every model type the families load (2 layers, hidden 64, 4 experts), shared by
the family matrix, the family specifics and the plan's estimate tests: each written once per session with
save_pretrained, the files a hub repository holds."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

import moetune.models.families.mpt.modeling  # noqa: F401  (registers mpt_moe with the Auto classes)
from moetune.models.families import family_for_model_type
from moetune.models.layout import find_moe_blocks
from moetune.models.load.pretrained import model_from_config


def free_port() -> int:
    """A TCP port no process listens on now, for a launched process group: tests run side by side (pytest -n)
    and a fixed port would be taken by whichever launch came first."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# A router correction bias that changes the choice, so counting experts from the logits alone would be wrong.
CORRECTION_BIAS = (0.3, -0.3, 0.2, -0.2)


def make_tiny_model(model_type: str, seed: int = 0):
    """The family's tiny random model of ``model_type`` (its ``tiny_configs``), drawn with ``seed``, through
    the class moetune loads it with (mistral4 has no AutoModelForCausalLM entry), in eval mode."""
    spec = family_for_model_type(model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_from_config(AutoConfig.for_model(model_type, **spec.tiny_configs[model_type]))
    bias = spec.router_of(model.config).correction_bias
    if bias is not None:
        with torch.no_grad():
            for block in find_moe_blocks(model, spec.router_name):
                tensor = block.module.get_parameter(bias) if bias in dict(block.module.named_parameters()) \
                    else block.module.get_buffer(bias)
                tensor.copy_(torch.tensor(CORRECTION_BIAS).reshape(tensor.shape))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model():
    """``tiny_model(model_type, seed=0)`` -> a fresh tiny random model (:func:`make_tiny_model`)."""
    return make_tiny_model


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """``checkpoint(model_type)`` -> folder of the tiny random checkpoint of ``model_type``, saved with
    save_pretrained once per session."""
    root = tmp_path_factory.mktemp("tiny-checkpoints")
    made: dict[str, Path] = {}

    def make(model_type: str) -> Path:
        if model_type not in made:
            make_tiny_model(model_type).save_pretrained(root / model_type)
            made[model_type] = root / model_type
        return made[model_type]

    return make
