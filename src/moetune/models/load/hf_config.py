"""Hugging Face model configs built from ``model.config_overrides``, with typo-checked keys.

A misspelt override (``num_hidden_layer: 2``) would otherwise become a stray attribute on the
config and be ignored, giving a full-size model; here it is an error naming the YAML path and the
closest real key.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from moetune.errors import ConfigError

logger = logging.getLogger(__name__)

# What a config class raises for a value it refuses: transformers' own checks (ValueError, TypeError, a
# KeyError for missing rope_parameters keys) and the strict dataclass validation of transformers 5.x.
INVALID_VALUE = (TypeError, ValueError, KeyError, StrictDataclassError)


def config_keys(config_class: type[PreTrainedConfig]) -> set[str]:
    """Every key the config class accepts: its dataclass fields and its aliases (``attribute_map``)."""
    keys = {f.name for f in dataclasses.fields(config_class)} if dataclasses.is_dataclass(config_class) else set()
    keys |= set(getattr(config_class, "attribute_map", {}) or {})
    if not keys:  # an older, non-dataclass config: fall back to the attributes of a default instance
        keys = set(vars(config_class()))
    return {k for k in keys if not k.startswith("_")}


def check_overrides(config_class: type[PreTrainedConfig], overrides: Mapping[str, Any]) -> None:
    """Raise a ConfigError for the first override key the config class does not have."""
    valid = config_keys(config_class)
    for key in overrides:
        if key in valid:
            continue
        close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"model.config_overrides.{key}",
            f"model.config_overrides.{key} is not a setting of {config_class.__name__}.{hint} "
            f"Valid keys include: {', '.join(sorted(valid))}.",
        )


def build_random_init_config(model_type: str, overrides: Mapping[str, Any], vocab_size: int | None = None,
                             special_tokens: Mapping[str, int | None] | None = None) -> PreTrainedConfig:
    """The default config of ``model_type`` with ``overrides`` applied (checked first).

    ``vocab_size`` (from the tokenizer) wins even over ``config_overrides.vocab_size``: an
    embedding smaller than the tokenizer fails at the first unseen id. ``special_tokens``
    (pad/bos/eos ids from the tokenizer) fill in what the overrides leave unset.
    """
    config_class = CONFIG_MAPPING[model_type]
    check_overrides(config_class, overrides)
    values: dict[str, Any] = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    values.update(overrides)
    if vocab_size is not None:
        if "vocab_size" in overrides and overrides["vocab_size"] != vocab_size:
            logger.warning("model.config_overrides.vocab_size=%s replaced by the tokenizer's size %d.",
                           overrides["vocab_size"], vocab_size)
        values["vocab_size"] = vocab_size
    try:
        return config_class(**values)
    except INVALID_VALUE as err:
        raise ConfigError("model.config_overrides", f"model.config_overrides is not a valid {config_class.__name__}: "
                          f"{_one_line(err)}") from None


def config_values(name: str | Path) -> dict[str, Any]:
    """The values of ``name``'s config.json (a folder, the file, a hub id in the cache), as written: no config
    class has checked them yet."""
    return PreTrainedConfig.get_config_dict(str(name))[0]


def read_hf_config(name: str | Path, trust_remote_code: bool = False,
                   fixes: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> PreTrainedConfig:
    """``AutoConfig.from_pretrained(name)`` (a folder, a config.json, a hub id); ``fixes``: its family's
    :attr:`~moetune.models.families._spec.FamilySpec.config_fixes`, applied to the config.json values first
    (Llama 4's published ``attn_temperature_tuning: 4``, which transformers 5.x's strict config refuses)."""
    if fixes is None:
        return AutoConfig.from_pretrained(str(name), trust_remote_code=trust_remote_code)
    values = config_values(name)
    return CONFIG_MAPPING[values["model_type"]].from_dict(fixes(values))


def apply_overrides(config: PreTrainedConfig, overrides: Mapping[str, Any]) -> PreTrainedConfig:
    """Set ``overrides`` on a loaded config (keys checked against its class first); returns it."""
    check_overrides(type(config), overrides)
    for key, value in overrides.items():
        try:
            setattr(config, key, value)
        except INVALID_VALUE as err:  # a strict config checks each value as it is set
            raise ConfigError(f"model.config_overrides.{key}", f"model.config_overrides.{key}: {value!r} is not valid "
                              f"for {type(config).__name__} ({_one_line(err)}).") from None
    return config


def _one_line(err: BaseException) -> str:
    # Hugging Face's validation errors spread one reason over several lines; a KeyError's str is quoted.
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())
