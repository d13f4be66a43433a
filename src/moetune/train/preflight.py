"""What ``moetune train`` checks before it builds anything, which is exactly what ``moetune validate`` checks.

A config that loads (the schema's checks) is then checked against the run folder
(:func:`~moetune.train.output_dir.check_output_dir`), the packages it needs, and the model it names
(:func:`moetune.models.check.check_config_against_model`: the model built on the meta device, the
training plan run on it). Train runs this before its accelerator, its tokenizer or a weight; validate
runs the same function, without the network, so both raise the same error with the same message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moetune.models.check import ModelCheck, check_config_against_model
from moetune.train.output_dir import check_output_dir

if TYPE_CHECKING:
    from moetune.config import Config


def check_before_training(config: Config, *, read_hub: bool) -> ModelCheck:
    """Raise the ConfigError / UserError train would raise for ``config`` before its first step, except those
    that need the weights, the launch, the data file or a checkpoint. ``read_hub``: a hub model's config is
    read to check against (train); without it only local ones are (validate)."""
    check_output_dir(config.training.output_dir)
    if config.training.optim == "adamw_8bit":  # only then: the optimizer module imports torch
        from moetune.train.optim import require_optimizer_package

        require_optimizer_package(config.training)
    return check_config_against_model(config, read_hub=read_hub)


def validate(config: Config, config_name: str) -> str:
    """``moetune validate``: :func:`check_before_training` without the network, and what it checked (two lines)."""
    checked = check_before_training(config, read_hub=False)
    return (f"{config_name}: valid ({len(config.data.sources)} data source(s), output_dir {config.training.output_dir})\n"
            f"{checked.summary()}")
