"""How a config field is declared and checked: with its help text (the README's reference and
``print-config`` are generated from it) and a ConfigError that quotes its YAML path."""

from __future__ import annotations

from dataclasses import field
from typing import Any

from moetune.errors import ConfigError


def opt(default: Any, help: str, **kwargs: Any) -> Any:
    """A documented field with a default (a factory for mutable defaults)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


def required(help: str) -> Any:
    """A documented field the YAML must set."""
    return field(metadata={"help": help})


def check(ok: bool, key: str, value: Any, accepted: str) -> None:
    """Raise a ConfigError naming the key, the value and what is accepted."""
    if not ok:
        raise ConfigError(key, f"{key} must be {accepted}, got {value!r}.")
