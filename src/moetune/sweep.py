"""`moetune sweep`: train every combination of config values, each in its own folder, and rank them.

A sweep file names config keys (dotted, as in overrides) and their values::

    grid:                      # every combination
      training.learning_rate: [1.0e-4, 3.0e-4]
      lora.r: [8, 16]
    paired:                    # lists of one length, taken position by position
      training.max_steps: [30, 60]
      training.warmup_steps: [3, 6]

With both, every grid combination runs with every paired position. Each run's config is the base
config plus the command line's overrides plus the run's values, validated exactly like overrides,
for every run before the first one starts. A run's output_dir is ``<training.output_dir>/<name>``,
the name made of its values. A run whose final adapter exists is skipped; one with checkpoints
resumes from the latest. The results table (CSV and Markdown) ranks the runs by best eval loss from
their metrics.jsonl, and one PNG overlays their eval-loss curves.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import itertools
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from moetune.config import Config, load_config
from moetune.errors import UserError, yaml_problem
from moetune.run_dir import METRICS_FILE, has_final_weights, list_checkpoints
from moetune.train.accelerator import is_main_process

SWEEP_KEYS = ("grid", "paired")
# Keys a sweep may not set: the sweep owns each run's folder and its resume decision.
RESERVED_KEYS = ("training.output_dir", "training.resume_from_checkpoint", "training.overwrite_output_dir")


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its values, the overrides that produce its config, and that config."""

    name: str
    values: dict[str, Any]
    overrides: tuple[str, ...]
    config: Config

    @property
    def output_dir(self) -> Path:
        return Path(self.config.training.output_dir)


def load_sweep(path: str | Path) -> list[dict[str, Any]]:
    """The runs a sweep file describes, as ``{dotted key: value}`` dicts, in a stable order.

    Raises UserError for anything malformed: unknown top-level keys, a key that is not dotted, a
    value that is not a non-empty list, paired lists of different lengths, a reserved key.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Sweep file {path} does not exist.")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML ({yaml_problem(err)}).") from None
    if not isinstance(spec, dict) or not spec:
        raise UserError(f"{path} must be a mapping with `grid` and/or `paired`, each {{section.key: [values]}}.")
    for key in spec:
        if key not in SWEEP_KEYS:
            close = difflib.get_close_matches(str(key), SWEEP_KEYS, n=1)
            raise UserError(f"{path}: unknown key {key!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                            f"a sweep file has {' and/or '.join(SWEEP_KEYS)}.")
    axes = {name: _read_axis(path, name, spec.get(name)) for name in SWEEP_KEYS}
    if not axes["grid"] and not axes["paired"]:
        raise UserError(f"{path}: `grid` and `paired` are both empty; name at least one config key and its values.")
    shared = set(axes["grid"]) & set(axes["paired"])
    if shared:
        raise UserError(f"{path}: {sorted(shared)[0]} is in both `grid` and `paired`; put it in one.")
    lengths = {key: len(values) for key, values in axes["paired"].items()}
    if len(set(lengths.values())) > 1:
        raise UserError(f"{path}: the `paired` lists must have one length, got "
                        + ", ".join(f"{k}: {n}" for k, n in lengths.items()) + ".")
    grid_keys = list(axes["grid"])
    grid = [dict(zip(grid_keys, combo, strict=True)) for combo in itertools.product(*axes["grid"].values())]
    paired_count = next(iter(lengths.values()), 1)
    paired = [{key: values[i] for key, values in axes["paired"].items()} for i in range(paired_count)]
    return [{**g, **p} for g in grid for p in paired]


def _read_axis(path: Path, name: str, axis: Any) -> dict[str, list]:
    if axis is None:
        return {}
    if not isinstance(axis, dict):
        raise UserError(f"{path}: `{name}` must map config keys to lists of values, e.g. {{lora.r: [8, 16]}}.")
    for key, values in axis.items():
        if not isinstance(key, str) or "." not in key or key.startswith(".") or key.endswith("."):
            raise UserError(f"{path}: {name}.{key} is not a dotted config key like training.learning_rate.")
        if key in RESERVED_KEYS:
            raise UserError(f"{path}: {key} cannot be swept: the sweep gives every run its own folder and resumes it.")
        if not isinstance(values, list) or not values:
            raise UserError(f"{path}: {name}.{key} must be a non-empty list of values, got {values!r}.")
    return axis


def run_name(values: dict[str, Any]) -> str:
    """A folder name made of a run's values, e.g. ``learning_rate=0.0003,r=16``.

    Each key is shortened to its last part unless two keys share it; characters a file system or
    shell dislikes become ``_``.
    """
    last_parts = [key.rsplit(".", 1)[-1] for key in values]
    parts = []
    for key, short in zip(values, last_parts, strict=True):
        label = short if last_parts.count(short) == 1 else key
        parts.append(f"{label}={_format_value(values[key])}")
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts)) or "run"


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(_format_value(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def plan_runs(config_path: str | Path, sweep_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> list[SweepRun]:
    """Every run of the sweep with its validated config (a UserError names the run and key that fail)."""
    base = load_config(config_path, overrides)
    root = Path(base.training.output_dir)
    runs = []
    for values in load_sweep(sweep_path):
        name = run_name(values)
        # JSON is YAML, so every value round-trips through the override parser unchanged.
        run_overrides = tuple(f"{key}={json.dumps(value)}" for key, value in values.items())
        try:
            config = load_config(config_path, [*overrides, *run_overrides, f"training.output_dir={json.dumps(str(root / name))}"])
        except UserError as err:
            raise UserError(f"Sweep run {name}: {err}") from None
        runs.append(SweepRun(name, values, run_overrides, config))
    names = [run.name for run in runs]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise UserError(f"{sweep_path}: two runs would share the folder {duplicate}; remove the repeated values.")
    return runs


def run_status(output_dir: str | Path) -> str:
    """``done`` (final adapter or model saved), ``resume`` (checkpoints only) or ``new``."""
    if has_final_weights(output_dir):
        return "done"
    return "resume" if list_checkpoints(output_dir) else "new"


def run_sweep(config_path: str | Path, sweep_path: str | Path, overrides: list[str] | tuple[str, ...] = (),
              dry_run: bool = False) -> int:
    """Run (or with ``dry_run`` list) the sweep, then write the ranked results; returns the exit code.

    Finished runs are skipped and half-finished ones resume. A run that fails does not stop the
    others; the exit code is then 1.
    """
    runs = plan_runs(config_path, sweep_path, overrides)
    statuses = {run.name: run_status(run.output_dir) for run in runs}
    _say(f"sweep: {len(runs)} run(s) under {runs[0].output_dir.parent}")
    for i, run in enumerate(runs, 1):
        action = {"done": "skip (finished)", "resume": "resume from latest checkpoint", "new": "train"}[statuses[run.name]]
        _say(f"  [{i}/{len(runs)}] {run.name}: {action}  ({' '.join(run.overrides)})")
    if dry_run:
        return 0

    from moetune.train.loop import train

    failed = []
    for i, run in enumerate(runs, 1):
        status = statuses[run.name]
        if status == "done":
            continue
        config = run.config
        if status == "resume":
            config = dataclasses.replace(config, training=dataclasses.replace(config.training,
                                                                              resume_from_checkpoint="latest"))
        else:
            # A run that died before its first checkpoint starts over; its old log lines would mix in.
            (run.output_dir / METRICS_FILE).unlink(missing_ok=True)
        _say(f"sweep: [{i}/{len(runs)}] {run.name}")
        try:
            code = train(config)
        except UserError as err:
            _say(f"sweep: {run.name} failed: {err}")
            code = 2
        if code != 0:
            failed.append(run.name)
    if is_main_process():
        rows = [read_run_results(run) for run in runs]
        stem = Path(sweep_path).stem
        paths = write_results(rank_results(rows), list(runs[0].values), runs[0].output_dir.parent, stem)
        plot_eval_curves(runs, runs[0].output_dir.parent / f"{stem}_eval_loss.png")
        print(Path(paths[1]).read_text())
        _say(f"sweep: wrote {paths[0]}, {paths[1]} and {stem}_eval_loss.png")
    if failed:
        _say(f"sweep: {len(failed)} run(s) did not finish: {', '.join(failed)}")
        return 1
    return 0


def read_eval_losses(output_dir: str | Path) -> list[tuple[int, float]]:
    """(step, eval_loss) pairs from a run's metrics.jsonl, in step order (empty when none)."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    points = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off by a crash
        if isinstance(record, dict) and isinstance(record.get("eval_loss"), (int, float)):
            points[int(record["step"])] = float(record["eval_loss"])
    return sorted(points.items())


def read_run_results(run: SweepRun) -> dict[str, Any]:
    """One results row: the run's values, best and last eval loss, its step, and its status."""
    losses = [(s, v) for s, v in read_eval_losses(run.output_dir) if math.isfinite(v)]
    best = min(losses, key=lambda p: p[1]) if losses else None
    return {"run": run.name, **run.values,
            "best_eval_loss": best[1] if best else None, "best_step": best[0] if best else None,
            "final_eval_loss": losses[-1][1] if losses else None,
            "status": {"done": "finished", "resume": "unfinished", "new": "not started"}[run_status(run.output_dir)],
            "output_dir": str(run.output_dir)}


def rank_results(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows sorted by best eval loss (lowest first; runs without one last) with a ``rank`` column."""
    ordered = sorted(rows, key=lambda r: (r["best_eval_loss"] is None, r["best_eval_loss"] or 0.0))
    return [{"rank": i if row["best_eval_loss"] is not None else None, **row} for i, row in enumerate(ordered, 1)]


def write_results(ranked: list[dict[str, Any]], keys: list[str], directory: str | Path, stem: str) -> tuple[Path, Path]:
    """``<stem>_results.csv`` and ``<stem>_results.md`` in ``directory``; returns both paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    columns = ["rank", "run", *keys, "best_eval_loss", "best_step", "final_eval_loss", "status", "output_dir"]
    csv_path, md_path = directory / f"{stem}_results.csv", directory / f"{stem}_results.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({c: "" if row.get(c) is None else row.get(c) for c in columns} for row in ranked)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in ranked:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.5g}"
    return str(value).replace("|", "\\|")


def plot_eval_curves(runs: list[SweepRun], path: str | Path) -> Path:
    """One PNG with every run's eval loss against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100, layout="constrained")
    for run in runs:
        points = read_eval_losses(run.output_dir)
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], marker="o", markersize=3, label=run.name)
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss")
    ax.set_title("eval loss per sweep run")
    if ax.has_data():
        ax.legend(fontsize=7)
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _say(text: str) -> None:
    if is_main_process():
        print(text, file=sys.stderr)
