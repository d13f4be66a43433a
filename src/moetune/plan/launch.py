"""How a run is launched, as far as memory per GPU goes: how many processes, and what DeepSpeed ZeRO or
FSDP shards or offloads. Read from the files ``accelerate launch`` reads (accelerate_config.yaml and the
DeepSpeed JSON it names), or from the Accelerator a run has built (``moetune train``'s pre-check).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from moetune.errors import UserError, first_line


@dataclass(frozen=True)
class Launch:
    """``engine``: "single" (one process), "ddp", "deepspeed" or "fsdp". ``zero_stage``: DeepSpeed's
    stage; FSDP full sharding is planned as stage 3. ``offload_optimizer`` / ``offload_params``: kept
    in CPU memory. ``reduce_bucket`` / ``allgather_bucket``: DeepSpeed's gradient and parameter
    buckets in elements (None: its defaults / accelerate's "auto"). ``described``: where it was read."""

    processes: int = 1
    engine: str = "single"
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    reduce_bucket: int | None = None
    allgather_bucket: int | None = None
    described: str = "one process"

    @property
    def shards_parameters(self) -> bool:
        return self.zero_stage >= 3

    def summary(self) -> str:
        """``4 processes, DeepSpeed ZeRO-2 (accelerate_config.yaml)``."""
        what = {"single": "no sharding", "ddp": "DDP", "fsdp": "FSDP (full shard)"}.get(
            self.engine, f"DeepSpeed ZeRO-{self.zero_stage}")
        offloaded = [name for name, on in (("optimizer state", self.offload_optimizer),
                                           ("parameters", self.offload_params)) if on]
        offload = f", {' and '.join(offloaded)} offloaded to CPU" if offloaded else ""
        return f"{self.processes} process{'es' if self.processes > 1 else ''}, {what}{offload} ({self.described})"


def read_launch(accelerate_config: str | Path | None = None, deepspeed_config: str | Path | None = None,
                gpus: int | None = None, use_cpu_offload: bool = False) -> Launch:
    """The launch ``accelerate launch --config_file accelerate_config`` would make (with the DeepSpeed JSON
    it names, or ``deepspeed_config``), on ``gpus`` processes when given. ``use_cpu_offload``:
    ``advanced.use_cpu_offload``, which moetune writes into the engine's settings."""
    launch: dict[str, Any] = {}
    described = []
    processes = 1
    if accelerate_config is not None:
        accelerate = _read_yaml(Path(accelerate_config))
        described.append(str(accelerate_config))
        processes = int(accelerate.get("num_processes") or 1)
        kind = str(accelerate.get("distributed_type", "NO")).upper()
        if kind == "DEEPSPEED":
            inline = accelerate.get("deepspeed_config") or {}
            file = inline.get("deepspeed_config_file")
            if deepspeed_config is None and file:
                deepspeed_config = _beside(Path(file), Path(accelerate_config))
            elif deepspeed_config is None:  # accelerate's own keys, no JSON
                launch = {"engine": "deepspeed", "zero_stage": int(inline.get("zero_stage", 2)),
                          "offload_optimizer": inline.get("offload_optimizer_device", "none") not in ("none", None),
                          "offload_params": inline.get("offload_param_device", "none") not in ("none", None)}
        elif kind == "FSDP":
            fsdp = accelerate.get("fsdp_config") or {}
            launch = {"engine": "fsdp", "zero_stage": 3, "offload_params": bool(fsdp.get("fsdp_offload_params"))}
            launch["offload_optimizer"] = launch["offload_params"]  # FSDP's CPU offload moves both
        elif kind in ("MULTI_GPU", "MULTI_CPU") or processes > 1:
            launch = {"engine": "ddp"}
    if deepspeed_config is not None:
        launch = _deepspeed(_read_json(Path(deepspeed_config)))
        described.append(str(deepspeed_config))
    if gpus is not None:
        processes = gpus
        described.append(f"--gpus {gpus}")
    launch.setdefault("engine", "ddp" if processes > 1 else "single")
    if launch["engine"] == "single" and processes > 1:
        launch["engine"] = "ddp"
    if use_cpu_offload and launch["engine"] in ("deepspeed", "fsdp"):
        launch["offload_optimizer"] = True
        launch["offload_params"] = launch["offload_params"] or launch.get("zero_stage", 0) >= 3
    return Launch(processes=processes, described=", ".join(described) or "one process, no launch file", **launch)


def launch_of(accelerator, use_cpu_offload: bool = False) -> Launch:
    """The launch a built Accelerator runs (its DeepSpeed or FSDP plugin, its process count)."""
    state = accelerator.state
    processes = accelerator.num_processes
    plugin = state.deepspeed_plugin
    fsdp = getattr(state, "fsdp_plugin", None)
    if plugin is not None:
        launch = _deepspeed(plugin.deepspeed_config)
    elif fsdp is not None:
        offload = bool(getattr(fsdp, "cpu_offload", None)) and bool(getattr(fsdp.cpu_offload, "offload_params", False))
        launch = {"engine": "fsdp", "zero_stage": 3, "offload_params": offload, "offload_optimizer": offload}
    else:
        launch = {"engine": "ddp" if processes > 1 else "single"}
    if use_cpu_offload and launch["engine"] == "deepspeed":
        launch["offload_optimizer"] = True
        launch["offload_params"] = launch["offload_params"] or launch["zero_stage"] >= 3
    return Launch(processes=processes, described="this launch", **launch)


def _deepspeed(values: dict) -> dict[str, Any]:
    zero = values.get("zero_optimization") or {}

    def offloaded(key: str) -> bool:
        device = (zero.get(key) or {}).get("device", "none")
        return device not in ("none", None)

    def elements(key: str) -> int | None:
        value = zero.get(key)
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    return {"engine": "deepspeed", "zero_stage": int(zero.get("stage", 0)), "offload_optimizer": offloaded("offload_optimizer"),
            "offload_params": offloaded("offload_param"), "reduce_bucket": elements("reduce_bucket_size"),
            "allgather_bucket": elements("allgather_bucket_size")}


def _beside(path: Path, accelerate_config: Path) -> Path:
    # accelerate resolves the JSON from the launch's working directory; a config kept with its JSON
    # elsewhere is read from beside it.
    return path if path.is_file() or path.is_absolute() else accelerate_config.parent / path


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"--accelerate-config {path} could not be read ({first_line(err)}).") from None
    if not isinstance(data, dict):
        raise UserError(f"--accelerate-config {path} is not an accelerate config (a YAML mapping).")
    return data


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"the DeepSpeed config {path} could not be read ({first_line(err)}).") from None
    if not isinstance(data, dict):
        raise UserError(f"the DeepSpeed config {path} is not a JSON object.")
    return data
