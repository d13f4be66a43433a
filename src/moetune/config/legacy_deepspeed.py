"""The ``"moe"`` block of an older DeepSpeed JSON (deepspeed_moe_config.json), read into the moe section.

Older setups kept num_experts / top_k / ... in the DeepSpeed file given to ``accelerate launch``,
where DeepSpeed itself ignores them. :func:`moetune.config.load_config` takes them over, so
``moetune validate`` and ``print-config`` show the config a launch trains: a value is taken
unless the YAML sets the same key to another non-default value, which is an error naming both
places. A setting with no moetune equivalent is rejected, never silently dropped.

accelerate passes the file to every process of a launch as ``ACCELERATE_DEEPSPEED_CONFIG_FILE``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from moetune.config.key_lines import record_key_lines
from moetune.config.moved_keys import is_absent, lookup, place, same_value
from moetune.errors import ConfigError, UserError

ENV_VAR = "ACCELERATE_DEEPSPEED_CONFIG_FILE"

# Old "moe" block key -> config key. Keys in LEGACY_REJECTED have no moetune equivalent.
LEGACY_KEYS = {
    "num_experts": "moe.upcycling.num_experts",
    "top_k": "moe.upcycling.top_k",
    "k": "moe.upcycling.top_k",
    "ep_size": "moe.expert_parallel.size",
    "expert_parallel_size": "moe.expert_parallel.size",
    "capacity_factor": "moe.upcycling.capacity_factor",
    "aux_loss_coef": "moe.auxiliary_loss_weight",
    "moe_loss_coeff": "moe.auxiliary_loss_weight",
    "router_aux_loss_coef": "moe.auxiliary_loss_weight",
    "z_loss_coef": "moe.router_z_loss_weight",
    "router_z_loss_coef": "moe.router_z_loss_weight",
    "router_jitter": "moe.upcycling.router_jitter",
    "router_jitter_noise": "moe.upcycling.router_jitter",
    "upcycle_every": "moe.upcycling.every_n_blocks",
}
LEGACY_REJECTED = {
    "eval_capacity_factor": "moetune applies moe.upcycling.capacity_factor in training only; evaluation never drops tokens",
    "min_capacity": "moetune's capacity is ceil(capacity_factor * tokens * top_k / num_experts), at least 1",
    "noisy_gate_policy": "use moe.upcycling.router_jitter (a number) for Switch-style jitter",
    "use_residual": "Residual MoE is not supported",
    "drop_tokens": "tokens are dropped exactly when moe.upcycling.capacity_factor is set",
    "use_rts": "random token selection is not supported",
}
# Keys of the block that only said the block applies.
_IGNORED = ("enabled", "type", "moe")


@dataclass(frozen=True)
class LegacySetting:
    """One setting of the ``"moe"`` block: the config key it sets, its value, and where the block says it."""

    key: str
    value: Any
    json_key: str
    location: str


def deepspeed_config_path(given: str | Path | None) -> Path | None:
    """The DeepSpeed JSON to read: ``given`` (which must exist), else ``$ACCELERATE_DEEPSPEED_CONFIG_FILE``
    when it names a file, else None."""
    if given is not None:
        path = Path(given)
        if not path.is_file():
            raise UserError(f"{path}: no such DeepSpeed config file.")
        return path
    from_env = os.environ.get(ENV_VAR)
    if from_env and Path(from_env).is_file():
        return Path(from_env)
    return None


def read_legacy_moe_block(path: str | Path) -> list[LegacySetting]:
    """The ``"moe"`` block of the DeepSpeed JSON at ``path`` as config settings ([] when it has none).

    A key with no moetune equivalent, or two keys setting one config key to different values, is a
    UserError naming the file and line.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{file}: no such DeepSpeed config file.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{file}: the DeepSpeed config file cannot be read ({err}).") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{file} is not valid JSON (line {err.lineno}: {err.msg}).") from None
    block = data.get("moe") if isinstance(data, dict) else None
    if block is None:
        return []
    where = _key_locator(file, text)
    if not isinstance(block, dict):
        raise UserError(f"{where('moe')}: \"moe\" must be an object of MoE settings, got {type(block).__name__}.")
    settings: dict[str, LegacySetting] = {}
    for json_key, value in block.items():
        if json_key in _IGNORED:
            continue
        location = where(f"moe.{json_key}")
        if json_key in LEGACY_REJECTED:
            raise UserError(f"{location}: \"moe\".\"{json_key}\" is not supported ({LEGACY_REJECTED[json_key]}). MoE "
                            "settings now live in the moe section of config.yaml; remove the \"moe\" block from the "
                            "DeepSpeed file.")
        if json_key not in LEGACY_KEYS:
            raise UserError(f"{location}: \"moe\".\"{json_key}\" is not a known MoE setting. MoE settings now live in "
                            "the moe section of config.yaml (moe.upcycling.num_experts, moe.upcycling.top_k, "
                            "moe.expert_parallel.size, ...); move it there and remove the \"moe\" block from the "
                            "DeepSpeed file.")
        key = LEGACY_KEYS[json_key]
        earlier = settings.get(key)
        if earlier is not None and not same_value(earlier.value, value):
            raise UserError(f"{location}: the \"moe\" block sets {key} twice with different values "
                            f"({earlier.value!r} from \"{earlier.json_key}\" at {earlier.location}, "
                            f"{value!r} from \"{json_key}\").")
        settings[key] = LegacySetting(key, value, json_key, location)
    return list(settings.values())


def merge_legacy_moe_block(raw: dict[str, Any], where: dict[str, str], settings: list[LegacySetting],
                           default_of: Callable[[str], Any], locate: Callable[[str], str], path: Path) -> None:
    """Take ``settings`` into ``raw`` (the YAML with its overrides, new key names) in place.

    A setting is taken unless the YAML sets its key to a value that is neither the key's default
    (``default_of(key)``) nor the setting's: that is a ConfigError naming the YAML key and the JSON
    key, each with its file:line. The settings taken are announced in one line on stderr.
    """
    if not settings:
        return
    for setting in settings:
        mine = lookup(raw, setting.key)
        if not is_absent(mine) and not same_value(mine, setting.value) and not same_value(mine, default_of(setting.key)):
            raise ConfigError(setting.key, f"{locate(setting.key)}: {setting.key} is {mine!r} in the config but "
                              f"{setting.value!r} in the \"moe\" block of {path} (\"{setting.json_key}\" at "
                              f"{setting.location}); keep it in one place: the moe section of the config (and drop "
                              f"the block from {path}).")
    for setting in settings:
        mine = lookup(raw, setting.key)
        place(raw, setting.key, setting.value)
        if is_absent(mine) or not same_value(mine, setting.value):
            where[setting.key] = setting.location
    taken = ", ".join(f"{s.key}={s.value}" for s in settings)
    print(f"moetune: read {taken} from the \"moe\" block of {path}; move them to the moe section of the config.",
          file=sys.stderr)


def _key_locator(file: Path, text: str) -> Callable[[str], str]:
    """``where(dotted key)`` -> "file:line" of that key in the JSON ``text`` (read as YAML: JSON is YAML).

    Tabs are whitespace to JSON but not to PyYAML; outside strings (where JSON forbids them) they
    can be spaces. A file PyYAML cannot compose still loads: its errors then name the file only.
    """
    lines: dict[str, str] = {}
    try:
        record_key_lines(yaml.compose(text.replace("\t", " "), Loader=yaml.SafeLoader), str(file), lines,
                         repeated_key_is_error=False)  # json.loads keeps a repeated key's last value
    except yaml.YAMLError:
        pass
    return lambda key: lines.get(key, str(file))
