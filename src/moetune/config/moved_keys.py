"""Config keys that moved: a config written with the old name loads as the new one, with one line on stderr.

The sparse-upcycling settings were once flat keys of ``moe`` (``moe.num_experts``, ``moe.top_k``),
which read as if they described any MoE model; they now live in ``moe.upcycling``. The other flat keys
of ``moe`` are grouped by concern the same way (``moe.esft_experts`` is ``moe.esft.experts``,
``moe.monitor_expert_usage`` is ``moe.monitor.expert_usage``, ...). Old configs,
overrides and scripts keep working: the loader moves each old key to its new place in the raw
YAML before building the Config, so validation, print-config and a run's saved config.yaml all
speak the new names. A config that sets both names to different values is an error naming both.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from moetune.errors import ConfigError

# Old dotted key -> new dotted key.
MOVED_KEYS = {
    "moe.upcycle": "moe.upcycling.enabled",
    "moe.num_experts": "moe.upcycling.num_experts",
    "moe.top_k": "moe.upcycling.top_k",
    "moe.upcycle_every": "moe.upcycling.every_n_blocks",
    "moe.expert_noise_std": "moe.upcycling.expert_noise_std",
    "moe.router_init_std": "moe.upcycling.router_init_std",
    "moe.capacity_factor": "moe.upcycling.capacity_factor",
    "moe.router_jitter": "moe.upcycling.router_jitter",
    # The moe section grouped by concern.
    "moe.expert_lora_r": "moe.expert_lora.r",
    "moe.expert_lora_alpha": "moe.expert_lora.alpha",
    "moe.esft_experts": "moe.esft.experts",
    "moe.train_shared_experts": "moe.shared_experts.train",
    "moe.shared_expert_training": "moe.shared_experts.method",
    "moe.monitor_expert_usage": "moe.monitor.expert_usage",
    "moe.log_expert_metrics": "moe.monitor.log_metrics",
    "moe.starving_expert_share": "moe.monitor.starving_expert_share",
    "moe.dominant_expert_share": "moe.monitor.dominant_expert_share",
    "moe.router_supervision_weight": "moe.router_supervision.weight",
    "moe.label_to_expert": "moe.router_supervision.label_to_expert",
    "moe.backend": "moe.expert_parallel.backend",
    "moe.expert_parallel_size": "moe.expert_parallel.size",
}

_ABSENT = object()


def new_key(key: str, location: str) -> str:
    """``key`` under its current name (an override's key); an old name is announced on stderr."""
    moved = MOVED_KEYS.get(key)
    if moved is None:
        return key
    announce(key, moved, location)
    return moved


def move_old_keys(raw: dict[str, Any], where: dict[str, str], locate: Callable[[str], str]) -> None:
    """Move every old key of ``raw`` (nested dicts of a YAML file) to its new place, in place.

    ``where`` (dotted key -> "file:line") follows the value; ``locate(key)`` names where a key was
    set. An old and a new key both given with different values is a ConfigError naming both.
    """
    for old, new in MOVED_KEYS.items():
        value = lookup(raw, old)
        if value is _ABSENT:
            continue
        current = lookup(raw, new)
        if current is not _ABSENT and not same_value(current, value):
            raise ConfigError(new, f"{locate(new)}: {new} is {current!r}, but {old} (its old name, at {locate(old)}) "
                              f"is {value!r}; set it once, as {new}.")
        announce(old, new, locate(old))
        if current is _ABSENT:
            place(raw, new, value)
            where[new] = locate(old)
        remove(raw, old)


def announce(old: str, new: str, location: str) -> None:
    print(f"moetune: {old} is now {new} ({location}); read as {new}.", file=sys.stderr)


def same_value(a: Any, b: Any) -> bool:
    """Equal as config values: 4 and 4.0 are the same number (YAML and JSON spell numbers differently)."""
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def lookup(raw: Any, key: str) -> Any:
    """The value at dotted ``key`` inside nested dicts, or _ABSENT."""
    node = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def place(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` inside nested dicts, creating the sections it needs."""
    *sections, last = key.split(".")
    node = raw
    for depth, part in enumerate(sections):
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            section = ".".join(sections[:depth + 1])
            raise ConfigError(section, f"{section} must be a mapping of keys, got {node[part]!r}.")
        node = node[part]
    node[last] = value


def remove(raw: dict[str, Any], key: str) -> None:
    *sections, last = key.split(".")
    node = raw
    for part in sections:
        node = node[part]
    del node[last]


def is_absent(value: Any) -> bool:
    """Whether a :func:`lookup` found nothing."""
    return value is _ABSENT
