"""YAML (plus ``section.key=value`` overrides) -> a validated, frozen :class:`Config`.

Strict by design: an unknown key at any level is an error naming its dotted path, the closest
valid key and the section's keys; a wrong type names the key, the value and what is accepted.
Errors carry file:line (or the override that caused them) and never a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from moetune.config.key_lines import record_key_lines
from moetune.config.legacy_deepspeed import deepspeed_config_path, merge_legacy_moe_block, read_legacy_moe_block
from moetune.config.moved_keys import move_old_keys, new_key, same_value
from moetune.config.schema import Config
from moetune.config.sources import SOURCE_TYPES, SourceConfig
from moetune.errors import ConfigError, UserError, yaml_problem
from moetune.run_dir import CONFIG_FILE, TMP_SUFFIX

_NONE = type(None)
_SCALARS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
# Values a config may hold once YAML aliases are expanded. The largest shipped config has a few
# hundred; a 550-byte file of nested anchors ("billion laughs") expands to 9**9.
MAX_EXPANDED_NODES = 100_000


def load_config(path: str | Path | None, overrides: Sequence[str] = (),
                deepspeed_config: str | Path | None = None) -> Config:
    """Read ``path`` (None = defaults only), apply ``overrides``, validate, return the Config.

    ``deepspeed_config``: a DeepSpeed JSON whose older ``"moe"`` block is taken into the moe section
    (:mod:`moetune.config.legacy_deepspeed`); None reads the one ``accelerate launch`` passes to its
    processes in ``$ACCELERATE_DEEPSPEED_CONFIG_FILE``, if any. Keys under an old name
    (:mod:`moetune.config.moved_keys`) load as their new one, with a line on stderr.
    """
    raw: dict[str, Any] = {}
    where: dict[str, str] = {}
    if path is not None:
        raw, where = _read_yaml(Path(path))

    def locate(key: str) -> str:
        return _locate(key, where, path)

    move_old_keys(raw, where, locate)
    _apply_overrides(raw, where, overrides)
    move_old_keys(raw, where, locate)  # old keys inside a whole section given by an override
    deepspeed_json = deepspeed_config_path(deepspeed_config)
    if deepspeed_json is not None:
        merge_legacy_moe_block(raw, where, read_legacy_moe_block(deepspeed_json), _default_of, locate, deepspeed_json)
    try:
        return _build(Config, raw, "")
    except ConfigError as err:
        raise ConfigError(err.key, f"{locate(err.key)}: {err.message}") from None


def _apply_overrides(raw: dict[str, Any], where: dict[str, str], overrides: Sequence[str]) -> None:
    """Set each ``key=value`` over the file's values; an old key name sets its new key."""
    by_override: dict[str, tuple[str, str, Any]] = {}  # new key -> (the override, the name it used, its value)
    for text in overrides:
        given, value = parse_override(text)
        key = new_key(given, f"override {text!r}")
        earlier = by_override.get(key)
        if earlier is not None and earlier[1] != given and not same_value(earlier[2], value):
            raise ConfigError(key, f"override {text!r} sets {key} to {value!r}, but override {earlier[0]!r} set it "
                              f"to {earlier[2]!r} under the name {earlier[1]}; set it once, as {key}.")
        by_override[key] = (text, given, value)
        _set_dotted(raw, key, value, text)
        where[key] = f"override {text!r}"


def parse_override(text: str) -> tuple[str, Any]:
    """``"training.learning_rate=1e-4"`` -> ``("training.learning_rate", 1e-4)``; the value is YAML."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or key.startswith(".") or key.endswith(".") or ".." in key:
        raise UserError(f"Override {text!r} must look like section.key=value (e.g. training.learning_rate=1e-4).")
    if not value.strip():
        return key, None
    try:
        _check_expansion(yaml.compose(value, Loader=yaml.SafeLoader), f"Override {text!r}", with_lines=False)
        return key, yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise UserError(f"Override {text!r}: the value is not valid YAML ({yaml_problem(err)}).") from None
    except RecursionError:
        raise UserError(f"Override {text!r}: the value is nested too deeply.") from None


def config_to_dict(config: Any) -> Any:
    """Plain dicts and lists (tuples become lists), in field order; sources list their `type` first."""
    if dataclasses.is_dataclass(config):
        out = {f.name: config_to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
        if "type" in out:
            out = {"type": out.pop("type"), **out}
        return out
    if isinstance(config, (list, tuple)):
        return [config_to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: config_to_dict(v) for k, v in config.items()}
    return config


def dump_config(config: Config) -> str:
    """The fully resolved config as YAML; ``load_config`` of it gives back an equal Config."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False, allow_unicode=True, width=100)


def save_config(config: Config, directory: str | Path) -> Path:
    """Write the resolved config to ``directory/config.yaml`` (a run's record of what it ran; written whole, then renamed)."""
    target = Path(directory) / CONFIG_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(CONFIG_FILE + TMP_SUFFIX)
    tmp.write_text(dump_config(config))
    tmp.replace(target)
    return target


# ------------------------------------------------------------------------------ reading YAML


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    if not path.is_file():
        hint = " (it is a directory)" if path.is_dir() else ""
        raise UserError(f"Config file {str(path)!r} not found{hint}. Pass --config PATH, or run where config.yaml is.")
    try:
        text = path.read_text(encoding="utf-8-sig")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        _check_expansion(node, str(path))  # before anything walks the values
        raw = yaml.safe_load(text)
    except UnicodeDecodeError:
        raise UserError(f"Config file {str(path)!r} is not UTF-8 text.") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {yaml_problem(err)}") from None
    except RecursionError:
        raise UserError(f"{path}: the YAML is nested too deeply to be a config.") from None
    if raw is None:
        return {}, {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections (model:, training:, ...), "
                        f"got a {type(raw).__name__}.")
    where: dict[str, str] = {}
    record_key_lines(node, str(path), where)
    return raw, where


def _check_expansion(root: yaml.Node | None, source: str, with_lines: bool = True) -> None:
    """Reject YAML whose aliases expand to more than MAX_EXPANDED_NODES values, or refer to themselves.

    Sizes are counted once per node (an alias is the same node object as its anchor), so this
    costs time linear in the text however large the expansion would be.
    """
    expanded: dict[int, int] = {}
    in_progress: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in expanded:
            return expanded[id(node)]
        if id(node) in in_progress:
            where = f"{source}:{node.start_mark.line + 1}" if with_lines else source
            raise UserError(f"{where}: a YAML alias refers to the value that contains it; "
                            "a config cannot be infinite.")
        in_progress.add(id(node))
        if isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(item) for item in node.value)
        else:
            total = 1
        in_progress.discard(id(node))
        expanded[id(node)] = total = min(total, MAX_EXPANDED_NODES + 1)
        return total

    if root is not None and size(root) > MAX_EXPANDED_NODES:
        raise UserError(f"{source}: its YAML aliases (*name) expand to more than {MAX_EXPANDED_NODES:,} values; "
                        "a config is far smaller. Write the values out, or reuse fewer levels of anchors.")


def _set_dotted(raw: dict[str, Any], key: str, value: Any, text: str) -> None:
    """Set ``a.b.c`` inside nested dicts; a numeric part indexes a list (``data.sources.0.path``)."""
    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(f"Override {text!r}: {'.'.join(parts[:depth])} has {len(node)} entries; "
                                f"{part!r} is not an index into it.")
            part = int(part)
        elif not isinstance(node, dict):
            raise UserError(f"Override {text!r}: {'.'.join(parts[:depth])} is a value, not a section.")
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            node = node[part]


# ------------------------------------------------------------------------ building dataclasses


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"{prefix} must be a mapping of keys, got {data!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in list(data):
        if key not in fields:
            path = f"{prefix}.{key}" if prefix else str(key)
            if path not in _NOT_NEEDED:
                raise _unknown_key(str(key), prefix, list(fields))
            print(f"moetune: {path} is not needed and is ignored: {_NOT_NEEDED[path]}", file=sys.stderr)
            data = {k: v for k, v in data.items() if k != key}
    kwargs = {}
    for name, f in fields.items():
        path = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(path, f"{path} is required: {f.metadata.get('help', '').rstrip('.')}.")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        # A list entry's checks say "sources[]"; name the entry.
        key = err.key.replace("[]", prefix[prefix.rfind("[") :] if prefix.endswith("]") else "[]")
        raise ConfigError(key, err.message.replace(err.key, key)) from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if tp is SourceConfig:
        return _build_source(value, key)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and _NONE in args:
            return None
        options = [a for a in args if a is not _NONE]
        for option in options[1:]:  # e.g. `auto` or a mapping: the first shape that fits
            with contextlib.suppress(ConfigError):
                return _coerce(option, value, key)
        try:
            return _coerce(options[0], value, key)
        except ConfigError as err:
            if _NONE in args and options[0] in _SCALARS:
                raise ConfigError(key, f"{key} must be {_SCALARS[options[0]]} or null, got {value!r}.") from None
            if _NONE in args:
                raise ConfigError(err.key, err.message.rstrip(".") + " (or null).") from None
            raise
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(key, f"{key} must be one of {', '.join(map(str, args))}; got {value!r}.{hint}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"{key} must be a list, got {value!r}.")
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"{key} must be a mapping, got {value!r}.")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    return _coerce_scalar(tp, value, key)


def _coerce_scalar(tp: type, value: Any, key: str) -> Any:
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "2e-4" (no dot) as a string; it is plainly meant as a number.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, str):
        return value
    raise ConfigError(key, f"{key} must be {_SCALARS[tp]}, got {value!r}.")


def _build_source(value: Any, key: str) -> Any:
    """One ``data.sources`` entry, built with the config class of the kind its ``type`` names: SOURCE_TYPES
    imports the module that the registry, moetune.plugins.SOURCE_MODULES, names for it."""
    if not isinstance(value, dict) or "type" not in value:
        raise ConfigError(key, f"{key} must be a mapping with a `type` ({' or '.join(SOURCE_TYPES)}), got {value!r}.")
    kind = value["type"]
    if not isinstance(kind, str) or kind not in SOURCE_TYPES:
        close = difflib.get_close_matches(str(kind), list(SOURCE_TYPES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key}.type", f"{key}.type must be one of {', '.join(SOURCE_TYPES)}; got {kind!r}.{hint}")
    return _build(SOURCE_TYPES[kind], value, key)


# ---------------------------------------------------------------------------------- messages


# Names users bring from other tools' configs, mapped to ours.
_ALIASES = {
    "lr": "learning_rate", "epochs": "num_train_epochs", "num_epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size", "micro_batch_size": "per_device_train_batch_size",
    "grad_accum": "gradient_accumulation_steps", "gradient_accumulation": "gradient_accumulation_steps",
    "scheduler": "lr_scheduler_type", "optimizer": "optim", "clip_grad_norm": "max_grad_norm",
    "model_name_or_path": "name", "base_model": "name", "max_length": "max_seq_length", "seq_len": "max_seq_length",
    "rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules_list": "target_modules",
    "router_aux_loss_coef": "auxiliary_loss_weight", "num_local_experts": "num_experts",
    "num_experts_per_tok": "top_k", "dtype": "torch_dtype",
}


# Keys that guides for moetune's predecessors recommend, which moetune makes unnecessary: accepted
# with the reason, so a copied config does not fail, and never mistaken for a setting that took effect.
_NOT_NEEDED = {
    "training.gradient_accumulation_steps_auto": (
        "every optimizer step's loss is already the per-token mean over all of its micro-batches and processes, so "
        "micro-batches of unequal length weigh by their tokens, and with data.packing: true (the default) each "
        "micro-batch is filled to model.max_seq_length tokens. To set the tokens per step, set "
        "training.gradient_accumulation_steps: a step holds about per_device_train_batch_size x "
        "gradient_accumulation_steps x processes x max_seq_length tokens."),
}


def _unknown_key(key: str, prefix: str, valid: list[str]) -> ConfigError:
    path = f"{prefix}.{key}" if prefix else key
    section = prefix or "the top level"
    alias = _ALIASES.get(key)
    # Another tool's name for a key of another section (num_local_experts: moe.upcycling.num_experts)
    # says more than a look-alike key of this one.
    alias_elsewhere = [p for p in _all_paths(Config) if p.rsplit(".", 1)[-1] == alias] if alias not in valid else []
    close = [] if alias_elsewhere else difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if not close and alias in valid:
        close = [alias]
    if close:
        hint = f" Did you mean {prefix + '.' if prefix else ''}{close[0]}?"
    else:
        elsewhere = alias_elsewhere or [p for p in _all_paths(Config) if p.rsplit(".", 1)[-1] == key]
        hint = f" Did you mean {elsewhere[0]}? (it belongs in another section)" if elsewhere else ""
    return ConfigError(path, f"unknown key {path!r}.{hint} Valid keys in {section}: {', '.join(valid)}.")


def _all_paths(cls: type, prefix: str = "") -> list[str]:
    paths = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        paths.append(path)
        if dataclasses.is_dataclass(hints[f.name]):
            paths.extend(_all_paths(hints[f.name], path))
    return paths


def _default_of(key: str) -> Any:
    """The default value of dotted ``key`` (e.g. ``moe.upcycling.top_k`` -> 2)."""
    value: Any = Config()
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _locate(key: str, where: dict[str, str], path: str | Path | None) -> str:
    """The most specific known location of ``key`` (or an enclosing key), else the file name."""
    probe = key
    while probe:
        if probe in where:
            return where[probe]
        cut = max(probe.rfind("."), probe.rfind("["))
        probe = probe[:cut] if cut > 0 else ""
    # An unknown section set only by an override is recorded under its full dotted key.
    inside = [loc for k, loc in where.items() if k.startswith((key + ".", key + "["))]
    if inside:
        return inside[0]
    return str(path) if path is not None else "config"

