"""The model a config describes, built on the meta device: every module and parameter shape, no weight read.

``moetune validate`` checks names (LoRA targets, shared experts) against it before a run loads any
weight, and ``moetune plan`` counts parameters and sizes memory from it. Building on the meta device
allocates nothing, so it takes seconds even for 100B+ parameter models; nothing here uses the network.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedConfig

from moetune.errors import UserError, first_line
from moetune.models.families import family_for_model_type
from moetune.models.families._spec import FamilySpec
from moetune.models.load.hf_config import apply_overrides, build_random_init_config, config_values, read_hf_config
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
        hf_config = read_hf_config(folder, model_section.trust_remote_code, family.config_fixes)
    except (OSError, ValueError) as err:
        raise UserError(f"{folder / 'config.json'} could not be read as a model config ({first_line(err)}).") from None
    return apply_overrides(hf_config, model_section.config_overrides)


def cached_config_file(name: str) -> Path | None:
    """The config.json of hub model ``name`` that a download left in the Hugging Face cache, or None.
    Reads the cache folder only (``HF_HOME`` / ``HF_HUB_CACHE`` say where it is), never the network."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        found = try_to_load_from_cache(name, "config.json")
    except HFValidationError:  # a path that is not there, which is no hub id either
        return None
    return Path(found) if isinstance(found, str) else None


def offline_model_config(model_section, family: FamilySpec | None,
                         model_config: str | Path | None = None) -> PreTrainedConfig:
    """The Hugging Face config a run of ``model_section`` builds, with ``model.config_overrides`` applied,
    from the first of: ``model_config`` (a config.json given by hand), ``model.random_init`` (built from
    the overrides; needs ``family``), a local folder's config.json, the Hugging Face cache. A UserError
    saying where it looked when none has it: nothing is downloaded."""
    if model_config is not None:
        path = Path(model_config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise UserError(f"--model-config {model_config}: no such file (give the model's config.json, or the folder "
                            "that holds it).")
        return _read_config(path, model_section, family)
    if model_section.random_init:
        return local_model_config(model_section, family)
    local = Path(model_section.name) / "config.json"
    found = local if local.is_file() else cached_config_file(model_section.name)
    if found is None:
        raise UserError(f"model.name {model_section.name!r} has no config.json on this machine: it is not a local folder "
                        "and not in the Hugging Face cache, and nothing is downloaded here. Download it "
                        f"(`hf download {model_section.name} config.json`), or pass --model-config with the model's "
                        "config.json from its hub page.")
    return _read_config(found, model_section, family)


def build_on_meta(hf_config: PreTrainedConfig, trust_remote_code: bool = False, dtype: torch.dtype | None = None,
                  **kwargs) -> nn.Module:
    """The model of ``hf_config`` with every parameter on the meta device (shapes and names, no storage),
    its floating-point parameters in ``dtype`` when given (else the config's default, float32).
    ``kwargs`` go to ``from_config`` (``attn_implementation``, ``experts_implementation``)."""
    if dtype is not None:
        kwargs["dtype"] = dtype
    with torch.device("meta"):
        return model_from_config(hf_config, trust_remote_code=trust_remote_code, **kwargs)


def _read_config(path: Path, model_section, family: FamilySpec | None) -> PreTrainedConfig:
    try:
        family = family or family_for_model_type(config_values(path).get("model_type", ""))
        hf_config = read_hf_config(path, model_section.trust_remote_code, family and family.config_fixes)
    except (OSError, ValueError) as err:
        raise UserError(f"{path} could not be read as a model config ({first_line(err)}).") from None
    return apply_overrides(hf_config, model_section.config_overrides)
