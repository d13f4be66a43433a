"""Where a run's numbers go: metrics.jsonl, TensorBoard / W&B through Accelerate's trackers, the console.

Only the main process writes; every record is one JSON line, so scripts and sweeps read a run
without TensorBoard.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from moetune.config import Config, config_to_dict
from moetune.run_dir import METRICS_FILE, TENSORBOARD_DIR, TMP_SUFFIX


def tracker_names(config: Config) -> list[str]:
    """Accelerate tracker names the config asks for."""
    return [name for name, on in (("tensorboard", config.logging.tensorboard), ("wandb", config.logging.wandb)) if on]


def logging_dir(config: Config) -> Path:
    return Path(config.logging.logging_dir or Path(config.training.output_dir) / TENSORBOARD_DIR)


class RunLog:
    """Append-only metrics of one run, mirrored to the trackers and the console."""

    def __init__(self, accelerator, config: Config, resumed_at_step: int | None = None):
        self.accelerator = accelerator
        self.path = Path(config.training.output_dir) / METRICS_FILE
        self.main = accelerator.is_main_process
        if self.main and resumed_at_step is not None:
            self._truncate_after(resumed_at_step)
        run_name = config.logging.run_name or Path(config.training.output_dir).name
        if tracker_names(config):
            init_kwargs = {"wandb": {"name": run_name}} if config.logging.wandb else {}
            project = (config.logging.wandb_project or "moetune") if config.logging.wandb else run_name
            accelerator.init_trackers(project, config=_hyperparameters(config), init_kwargs=init_kwargs)

    def write(self, record: dict[str, Any], console: str | None = None) -> None:
        """One JSON line in metrics.jsonl, its numbers to the trackers, and an optional console line."""
        if not self.main:
            return
        line = {k: v for k, v in record.items() if k != "expert_scalars"}  # trackers only; the shares stay
        with self.path.open("a") as f:
            f.write(json.dumps(line, separators=(",", ":")) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step" and math.isfinite(v)}
        scalars.update(record.get("expert_scalars", {}))
        self.accelerator.log(scalars, step=record["step"])
        if console:
            tqdm.write(console)

    def image(self, tag: str, rgb, step: int) -> None:
        """An (H, W, 3) uint8 image to the trackers that take images."""
        if not self.main:
            return
        for tracker in self.accelerator.trackers:
            if hasattr(tracker, "log_images"):
                tracker.log_images({tag: rgb}, step=step, **({"dataformats": "HWC"} if tracker.name == "tensorboard" else {}))

    def warn(self, message: str) -> None:
        if self.main:
            tqdm.write(f"warning: {message}", file=sys.stderr)

    def close(self) -> None:
        # Only the trackers: accelerator.end_training() would also tear down the process group,
        # which the final (collective) save still needs.
        if self.main:
            for tracker in self.accelerator.trackers:
                tracker.finish()

    def _truncate_after(self, step: int) -> None:
        """Drop records a killed run wrote after the checkpoint it resumes from: they are about to be redone."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines(keepends=True):
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut short by the kill
        tmp = self.path.with_name(self.path.name + TMP_SUFFIX)
        tmp.write_text("".join(kept))
        tmp.replace(self.path)


def _hyperparameters(config: Config) -> dict[str, Any]:
    """The config flattened to scalar values (what TensorBoard's hparams accept)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, (int, float, str, bool)):
            flat[prefix] = value
        else:
            flat[prefix] = json.dumps(value)

    walk("", config_to_dict(config))
    return flat
