"""Settings an older setup keeps outside config.yaml, taken over when a run starts."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from moetune.config import Config
from moetune.errors import UserError


def apply_legacy_deepspeed_moe(config: Config) -> Config:
    """Read the ``"moe"`` block of an older DeepSpeed JSON (given to ``accelerate launch``) into ``moe.*``.

    Older setups kept num_experts / top_k / ... in deepspeed_moe_config.json, where DeepSpeed itself
    ignores them. They are taken over unless config.yaml sets the same key to another value, which is
    an error naming both; anything without a moe.* equivalent is rejected by the reader.
    """
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path or not Path(path).is_file():
        return config
    from moetune.config import MoeConfig
    from moetune.models.deepspeed_moe import read_legacy_deepspeed_moe

    legacy = read_legacy_deepspeed_moe(path)
    if not legacy:
        return config
    defaults = MoeConfig()
    for key, value in legacy.items():
        mine = getattr(config.moe, key)
        if mine != getattr(defaults, key) and mine != value:
            raise UserError(f"moe.{key} is {mine!r} in the config but {value!r} in the \"moe\" block of {path}; "
                            f"keep it in one place: the moe section of the config (and drop the block from {path}).")
    print(f"moetune: read {', '.join(f'moe.{k}={v}' for k, v in legacy.items())} from the \"moe\" block of {path}; "
          "move them to the moe section of the config.", file=sys.stderr)
    return dataclasses.replace(config, moe=dataclasses.replace(config.moe, **legacy))
