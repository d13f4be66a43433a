"""What a run does when the device runs out of memory: the remedies it names, and with
``training.auto_find_batch_size`` the retry with a smaller batch.

A retry removes what the failed attempt wrote into output_dir and nothing else: the folder's
entries from before the run (an earlier run's checkpoints that a resume starts from, its tokenizer,
its metrics) stay byte for byte as they were, so the retry starts, or resumes, exactly as the
failed attempt did.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from moetune.config import Config
from moetune.run_dir import LOCK_FILE, METRICS_FILE, RUN_FILE
from moetune.train.output_dir import is_own_entry


def out_of_memory_message(config: Config) -> str:
    """The one-paragraph failure for an out-of-memory run: where it happened and what to change."""
    t = config.training
    return (f"Out of memory at per_device_train_batch_size={t.per_device_train_batch_size}, "
            f"model.max_seq_length={config.model.max_seq_length}. Remedies: lower training.per_device_train_batch_size "
            f"and raise training.gradient_accumulation_steps (same effective batch); "
            f"{'keep' if t.gradient_checkpointing else 'set'} training.gradient_checkpointing=true; shorten "
            "model.max_seq_length; use ZeRO-3 (configs/accelerate/zero3.yaml) and, under DeepSpeed or FSDP, set "
            "advanced.use_cpu_offload=true; "
            "or load the base model in 4-bit (model.load_in_4bit=true). Resume with training.resume_from_checkpoint=latest.")


def halved_batch(config: Config) -> Config | None:
    """The config to retry an out-of-memory attempt with: half the per-device batch and twice the
    accumulation, so the effective batch (and the tuned learning rate) stays the same. None when
    ``training.auto_find_batch_size`` is off or the batch is already 1."""
    t = config.training
    if not t.auto_find_batch_size or t.per_device_train_batch_size == 1:
        return None
    smaller = dataclasses.replace(t, per_device_train_batch_size=t.per_device_train_batch_size // 2,
                                  gradient_accumulation_steps=t.gradient_accumulation_steps * 2)
    return dataclasses.replace(config, training=smaller)


class AttemptFiles:
    """What output_dir held before a run's first attempt, so that what a failed attempt wrote can be removed.

    Only moetune's own entries are touched (:func:`~moetune.train.output_dir.is_own_entry`; the
    folder was checked to hold nothing else), never the lock and run record the run still holds.
    Files from before are left alone, except metrics.jsonl, which an attempt appends to and which
    gets its earlier content back.
    """

    def __init__(self, output_dir: str | Path):
        self.root = Path(output_dir)
        self.before: set[Path] | None = None
        self.metrics: bytes | None = None
        self.failed = False  # set when an attempt ran out of memory; the next one removes its files first

    def record(self) -> None:
        """Note what the folder holds now; only the first call counts (later attempts compare with it)."""
        if self.before is not None:
            return
        self.before = set(self._entries())
        metrics = self.root / METRICS_FILE
        self.metrics = metrics.read_bytes() if metrics.is_file() else None

    def remove_added(self) -> list[Path]:
        """Remove the files and folders written since :meth:`record`; return them (relative to output_dir)."""
        before = self.before or set()
        added = [rel for rel in self._entries() if rel not in before and self._removable(rel)]
        removed: list[Path] = []
        for rel in added:
            if any(parent in removed for parent in rel.parents):
                continue  # inside a folder already removed
            path = self.root / rel
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(rel)
        metrics = self.root / METRICS_FILE
        if self.metrics is not None and (not metrics.is_file() or metrics.read_bytes() != self.metrics):
            metrics.write_bytes(self.metrics)
        return removed

    def _entries(self) -> list[Path]:
        """Every file and folder under output_dir, relative to it, parents before their contents."""
        found = []
        for folder, dirs, files in os.walk(self.root):  # symbolic links are listed, not followed
            here = Path(folder).relative_to(self.root)
            dirs.sort()
            found += [here / name for name in sorted(dirs) + sorted(files)]
        return found

    @staticmethod
    def _removable(rel: Path) -> bool:
        top = rel.parts[0]
        return is_own_entry(top) and top not in (LOCK_FILE, RUN_FILE)
