"""The model a config describes, built on the meta device: every module and parameter shape, no weight read.

``moetune validate`` checks names (LoRA targets, shared experts) against it before a run loads any
weight, and ``moetune plan`` counts parameters and sizes memory from it. Building on the meta device
allocates nothing, so it takes seconds even for 100B+ parameter models; nothing here uses the network.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedConfig

from moetune.errors import UserError, first_line
from moetune.models.families._spec import FamilySpec
from moetune.models.load.hf_config import apply_overrides, build_random_init_config
from moetune.models.load.pretrained import model_from_config


def local_model_config(model_section, family: FamilySpec) -> PreTrainedConfig | None:
    """The Hugging Face config of ``model.name`` with ``model.config_overrides`` applied: read from a local
    folder's config.json, or built from the overrides with ``model.random_init``. None when the model is
    only on a hub, which is not read here."""
    if model_section.random_init:
        return build_random_init_config(family.random_init_model_type, model_section.config_overrides)
    folder = Path(model_section.name)
    if not (folder / "config.json").is_file():
        return None
    try:
        hf_config = AutoConfig.from_pretrained(folder, trust_remote_code=model_section.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"{folder / 'config.json'} could not be read as a model config ({first_line(err)}).") from None
    return apply_overrides(hf_config, model_section.config_overrides)


def build_on_meta(hf_config: PreTrainedConfig) -> nn.Module:
    """The model of ``hf_config`` with every parameter on the meta device (shapes and names, no storage)."""
    with torch.device("meta"):
        return model_from_config(hf_config)
