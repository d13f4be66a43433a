"""The command line of the Accelerate MPT-7B-MoE trainer (``train_mpt7b_moe_accelerate.py``) on moetune.

Each of that trainer's flags is a config override on ``configs/mpt7b_moe.yaml``, with the trainer's
defaults, and the run is trained the way it trained: the dense MPT in full, or with
``--convert_to_moe`` upcycled (experts and top-k from the ``"moe"`` block of the DeepSpeed JSON,
else 4 experts, top-1) with every weight training; checkpoints ``checkpoint-step-<N>`` every
``--save_steps`` and ``checkpoint-epoch-<N>`` after each epoch, each a model folder of its own.

With ``--config FILE`` that file takes the place of configs/mpt7b_moe.yaml *and* of the trainer's
defaults: only the flags typed override it. Trailing ``section.key=value`` arguments override
anything, as with ``moetune train``. Parsing only; the work is :func:`moetune.train.loop.train`.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

from moetune.errors import ConfigError, UserError

DEFAULT_CONFIG = "configs/mpt7b_moe.yaml"
DEEPSPEED_CONFIG = "deepspeed_moe_config.json"  # where the trainer's users kept their "moe" block
# The trainer's experts when no "moe" block names them.
DEFAULT_MOE = {"moe.upcycling.num_experts": 4, "moe.upcycling.top_k": 1}

# flag -> (config key, type, the trainer's default, help). --convert_to_moe and --data_file are handled apart.
FLAGS: dict[str, tuple[str, type, object, str]] = {
    "model_id": ("model.name", str, "mosaicml/mpt-7b", "Hub id or local directory of the dense MPT model"),
    "max_samples": ("data.max_samples", int, None, "Use only the first N samples, for a quick test"),
    "max_seq_length": ("model.max_seq_length", int, 512, "Longest training sequence in tokens"),
    "max_target_length": ("data.max_target_length", int, 128, "Longest answer in tokens"),
    "epochs": ("training.num_train_epochs", float, 1, "Passes over the training data"),
    "learning_rate": ("training.learning_rate", float, 2e-5, "Peak learning rate"),
    "per_device_batch_size": ("training.per_device_train_batch_size", int, 1, "Sequences per device per micro-batch"),
    "gradient_accumulation_steps": ("training.gradient_accumulation_steps", int, 8, "Micro-batches per optimizer step"),
    "warmup_steps": ("training.warmup_steps", int, 100, "Warmup steps of the learning rate"),
    "max_grad_norm": ("training.max_grad_norm", float, 1.0, "Gradient clipping norm (0: off)"),
    "output_dir": ("training.output_dir", str, "./mpt7b_moe_finetune", "Run folder: checkpoints, logs, final model"),
    "logging_steps": ("training.logging_steps", int, 10, "Log every N optimizer steps"),
    "save_steps": ("training.save_steps", int, 500, "Save checkpoint-step-N every N optimizer steps"),
    "seed": ("training.seed", int, 42, "Seed for data order and initialisation"),
}
DATA_FILE_DEFAULT = "nq_annotated_moe.jsonl"

# How the trainer trained, unless --config says otherwise: every weight trains, checkpoints by kind, all kept.
TRAINER_WAY = ["lora.enabled=false", "training.save_strategy=both",
               "training.checkpoint_naming=kind", "training.save_total_limit=null"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_mpt7b_moe_accelerate.py",
        description="Fine-tune MPT-7B (dense, or upcycled to an MoE with --convert_to_moe) on question/answer "
        "JSONL with moetune. Every flag is a config override on configs/mpt7b_moe.yaml.",
        epilog="Launch on several GPUs with: accelerate launch --config_file accelerate_config.yaml "
        "train_mpt7b_moe_accelerate.py [flags]. Extra section.key=value arguments override any config key.",
    )
    parser.add_argument("--config", metavar="FILE", help=f"Config to start from instead of {DEFAULT_CONFIG}; "
                        "then only the flags given override it (default: the trainer's defaults below).")
    parser.add_argument("--convert_to_moe", action="store_true", default=None,
                        help="Upcycle the dense model into an MoE before training (experts and top-k from the "
                        f"\"moe\" block of {DEEPSPEED_CONFIG}, else {DEFAULT_MOE['moe.upcycling.num_experts']} "
                        f"experts, top-{DEFAULT_MOE['moe.upcycling.top_k']}); without it the dense model trains in "
                        "full.")
    parser.add_argument("--data_file", metavar="FILE", help="Question/answer JSONL ({\"question\", \"answer\", "
                        f"\"expert_label\"}}); built into the dataset when no current build exists (default: "
                        f"{DATA_FILE_DEFAULT}).")
    for flag, (key, kind, default, text) in FLAGS.items():
        shown = "all" if default is None else default
        parser.add_argument(f"--{flag}", type=kind, metavar=kind.__name__.upper(),
                            help=f"{text} ({key}; default {shown}).")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="Config overrides; values are YAML and are validated like the file.")
    return parser


def flag_overrides(args: argparse.Namespace, deepspeed_json: str | Path | None) -> tuple[list[str], dict[str, str]]:
    """(overrides for load_config, {config key: the flag and value it came from}) for parsed ``args``.

    Without --config, flags left out take the trainer's defaults; with it, they leave the file's values.
    """
    trainer_defaults = args.config is None
    overrides: list[str] = list(TRAINER_WAY) if trainer_defaults else []
    flags_of: dict[str, str] = {}

    def put(key: str, value, source: str) -> None:
        overrides.append(f"{key}={json.dumps(value)}")  # JSON is YAML: paths and numbers arrive as typed
        flags_of[key] = source

    convert = bool(args.convert_to_moe)
    if trainer_defaults or convert:
        put("moe.upcycling.enabled", convert, "--convert_to_moe")
    if trainer_defaults:  # upcycled experts train in full, as in that trainer; a dense model has none to train
        put("moe.expert_training", "full" if convert else "frozen", "--convert_to_moe")
    if convert:
        block = {setting.key: setting for setting in _moe_block(deepspeed_json)}
        for key, value in (DEFAULT_MOE if trainer_defaults else {}).items():
            if key not in block:
                put(key, value, "--convert_to_moe")
        for key, setting in block.items():
            put(key, setting.value, f'--convert_to_moe: the "moe" block of {setting.location}')
    data_file = args.data_file or (DATA_FILE_DEFAULT if trainer_defaults else None)
    if data_file is not None:
        put("data.sources", [{"type": "qa_jsonl", "path": data_file}], f"--data_file {data_file}")
    for flag, (key, _, default, _) in FLAGS.items():
        value = getattr(args, flag)
        if value is None and trainer_defaults:
            value = default
        if value is None:
            continue
        put(key, value, f"--{flag} {value}")
        if flag == "warmup_steps":  # the flag sets the warmup; a ratio from the config would conflict with it
            put("training.warmup_ratio", 0.0, f"--{flag} {value}")
    return overrides, flags_of


def deepspeed_json_path() -> Path | None:
    """The DeepSpeed JSON given to ``accelerate launch``, else ./deepspeed_moe_config.json when it exists."""
    given = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if given:
        return Path(given)
    return Path(DEEPSPEED_CONFIG) if Path(DEEPSPEED_CONFIG).is_file() else None


def _moe_block(path: str | Path | None) -> list:
    """The "moe" block's settings, read as ``load_config`` reads them."""
    if path is None or not Path(path).is_file():
        return []
    from moetune.config.legacy_deepspeed import read_legacy_moe_block

    return read_legacy_moe_block(path)


def load_trainer_config(args: argparse.Namespace, deepspeed_json: str | Path | None = None,
                        default_config: str | Path = DEFAULT_CONFIG):
    """The Config these flags describe; a bad flag value is a UserError naming the flag."""
    from moetune.config import load_config

    overrides, flags_of = flag_overrides(args, deepspeed_json)
    try:
        return load_config(args.config or default_config, [*overrides, *args.overrides])
    except ConfigError as err:
        source = flags_of.get(err.key)
        if source is None or any(o.split("=", 1)[0] == err.key for o in args.overrides):
            raise
        raise UserError(f"{source}: {_without_location(err.message)}") from None


def main(argv: Sequence[str] | None = None, checkout: str | Path | None = None) -> int:
    """Entry point of train_mpt7b_moe_accelerate.py: 0, 1 (a failure), 2 (bad flags, config or data).

    ``checkout`` is the folder holding configs/ (the script's own), for runs started elsewhere.
    """
    from moetune.cli import report_errors

    args = build_parser().parse_intermixed_args(argv)  # overrides may come between the flags
    default_config = Path(DEFAULT_CONFIG)
    if not default_config.is_file() and checkout is not None:
        default_config = Path(checkout) / DEFAULT_CONFIG
    return report_errors(lambda: _run(args, default_config))


def _run(args: argparse.Namespace, default_config: Path) -> int | None:
    from moetune.train.signals import StopSignals

    config = load_trainer_config(args, deepspeed_json_path(), default_config)
    if args.data_file is not None or args.config is None:
        from moetune.data.build import build_dataset_unless_current

        build_dataset_unless_current(config)
    with StopSignals():  # importing the training stack takes seconds
        from moetune.train.loop import train
    return train(config)


def _without_location(message: str) -> str:
    # The loader says where a value came from ("override 'training.seed=...': ..."); the flag says it better.
    head, sep, rest = message.partition(": ")
    return rest if sep and head.startswith("override ") else message
