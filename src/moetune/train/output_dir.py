"""Which folders a run may write into, and what it says when the disk under one fills up.

A run folder holds only what moetune writes there. moetune refuses ``/``, the home folder, and any
folder holding a file it did not write (a project folder, a home folder's dotfiles, a user's own
config.yaml or README.md), even with ``training.overwrite_output_dir``: nothing a user wrote is ever
overwritten. A folder moetune claimed carries ``RUN_FILE``; folders of earlier versions are
recognised by their metrics.jsonl or checkpoint folders (the names of a run folder's entries are
:mod:`moetune.run_dir`'s). Nothing here imports torch, so ``moetune validate`` runs the same checks at once.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from moetune import run_dir
from moetune.errors import RunFailure, UserError
from moetune.run_dir import CHECKPOINT_NAME, LOCK_FILE, PARTIAL_PREFIX, RUN_FILE

if TYPE_CHECKING:
    from moetune.config import Config

# Everything a run (and `moetune eval` with its default output folder) writes into output_dir: every
# name of moetune.run_dir, and the names its patterns match.
OWN_NAMES = frozenset((
    LOCK_FILE, RUN_FILE, run_dir.CONFIG_FILE, run_dir.METRICS_FILE,
    run_dir.CONFIG_FILE + run_dir.TMP_SUFFIX, run_dir.METRICS_FILE + run_dir.TMP_SUFFIX,
    run_dir.TENSORBOARD_DIR, run_dir.TOKENIZER_DIR, run_dir.REFERENCE_LOGPS_FILE, run_dir.MERGED_DIR, run_dir.EVAL_DIR,
    run_dir.ADAPTER_CONFIG, *run_dir.ADAPTER_WEIGHTS, run_dir.MODEL_CARD, *run_dir.ESFT_FILES, *run_dir.TOKENIZER_FILES,
    run_dir.MODEL_CONFIG, run_dir.GENERATION_CONFIG, run_dir.FULL_MODEL_INDEX,
))
OWN_PATTERNS = (CHECKPOINT_NAME, re.escape(PARTIAL_PREFIX) + CHECKPOINT_NAME, run_dir.FULL_MODEL_SHARD)
_OWN_PATTERN = re.compile("^(?:" + "|".join(OWN_PATTERNS) + ")$")
_RUN_EVIDENCE = re.compile(f"^(?:{re.escape(run_dir.METRICS_FILE)}|{CHECKPOINT_NAME}|{re.escape(PARTIAL_PREFIX)}{CHECKPOINT_NAME})$")


def check_output_dir(output_dir: str | Path) -> None:
    """Raise a UserError unless a run may write into ``output_dir``. Creates nothing.

    The folder (or, when it does not exist yet, the nearest existing folder above it) must be
    writable, and an existing folder must be empty or hold only a moetune run's files.
    """
    root = Path(output_dir)
    resolved = root.expanduser().resolve()
    refused = {Path(resolved.anchor): "the root folder", Path.home().resolve(): "your home folder"}
    if resolved in refused:
        raise UserError(f"training.output_dir {output_dir} is {refused[resolved]}; a run writes config.yaml, README.md "
                        "and checkpoints into its output_dir. Use a folder of its own, e.g. training.output_dir=outputs/run.")
    if root.exists() and not root.is_dir():
        raise UserError(f"training.output_dir {output_dir} is a file, not a folder. Pick another training.output_dir.")
    if not root.exists():
        ancestor = next(p for p in resolved.parents if p.exists())
        if not ancestor.is_dir():
            raise UserError(f"training.output_dir {output_dir} cannot be created: {ancestor} is a file. "
                            "Pick another training.output_dir.")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise UserError(f"training.output_dir {output_dir} cannot be created: {ancestor} is not writable "
                            "(read-only or no permission). Pick another training.output_dir.")
        return
    if not os.access(root, os.W_OK | os.X_OK):
        raise UserError(f"training.output_dir {output_dir} is not writable (read-only or no permission). "
                        "Pick another training.output_dir.")
    foreign = foreign_entries(root)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UserError(f"training.output_dir {output_dir} holds files moetune did not write ({shown}); a run would "
                        "overwrite files there, so moetune never writes into such a folder, not even with "
                        "training.overwrite_output_dir=true. Pick a new or empty folder for training.output_dir.")


def foreign_entries(root: Path) -> list[str]:
    """Names in ``root`` that are not a moetune run's, sorted."""
    names = sorted(p.name for p in root.iterdir())
    claimed = RUN_FILE in names or any(_RUN_EVIDENCE.match(n) for n in names)
    if not claimed:  # a moetune name in a folder no run claimed (config.yaml, README.md) is the user's
        return [n for n in names if n != LOCK_FILE]
    return [n for n in names if not is_own_entry(n)]


def is_own_entry(name: str) -> bool:
    """Whether an entry of that name in a run folder is one moetune writes (the lock and run record included)."""
    return name in OWN_NAMES or _OWN_PATTERN.match(name) is not None


def is_disk_full(err: BaseException, directory: Path, needed_bytes: int) -> bool:
    """Whether ``err`` (an OSError, or a torch / safetensors error carrying the OS's message) means the disk is full."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    if any(s in text for s in ("No space left on device", "StorageFull", "os error 28", "Disk quota exceeded")):
        return True
    # torch's zip writer only says "file write failed" / "unexpected pos": ask the filesystem.
    vague = any(s in text for s in ("file write failed", "unexpected pos"))
    return vague and free_bytes(directory) < needed_bytes


def free_bytes(directory: Path) -> int:
    folder = next((p for p in (directory, *directory.resolve().parents) if p.is_dir()), Path("/"))
    return shutil.disk_usage(folder).free


def folder_bytes(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def no_space_failure(directory: Path, needed_bytes: int, what: str, then: str, at_least: bool = False) -> RunFailure:
    """The one-paragraph failure for a full disk under ``directory``; ``then`` says what to do once there is room."""
    needed = f"{'at least ' if at_least else ''}{_mb(needed_bytes)} MB needed"
    return RunFailure(f"no space left on {directory}: {needed}, {_mb(free_bytes(directory))} MB free, while writing "
                      f"{what}. Free some space (or move training.output_dir to a larger disk), then {then}.")


@contextlib.contextmanager
def final_files_or_no_space(directory: Path, needed_bytes: int):
    """Write a run's final files inside the ``with``; a full disk becomes a RunFailure naming the space needed.

    The files this ``with`` began to write are removed again (a truncated adapter would only fail
    later, in eval); the checkpoints are not touched, so the run resumes to write them once there is room.
    """
    started = time.time()
    try:
        yield
    except Exception as err:
        if not is_disk_full(err, directory, needed_bytes):
            raise
        for path in (directory, directory / run_dir.MERGED_DIR):
            for entry in path.iterdir() if path.is_dir() else ():
                if entry.is_file() and entry.stat().st_mtime >= started - 1 and is_own_entry(entry.name):
                    entry.unlink()
        raise no_space_failure(directory, needed_bytes, "the final adapter / model (the checkpoints are intact)",
                               "resume with training.resume_from_checkpoint=latest to write them") from None


def _mb(n: int) -> str:
    return str(max(1, math.ceil(n / 1e6))) if n else "0"


def save_run_config(config: Config, output_dir: str | Path) -> Path:
    """:func:`moetune.config.save_config` into the run folder; on a full disk a RunFailure, and no ``.tmp`` left."""
    from moetune.config import dump_config, save_config

    root = Path(output_dir)
    try:
        return save_config(config, root)
    except OSError as err:
        (root / (run_dir.CONFIG_FILE + run_dir.TMP_SUFFIX)).unlink(missing_ok=True)
        needed = len(dump_config(config).encode())
        if is_disk_full(err, root, needed):
            raise no_space_failure(root, needed, run_dir.CONFIG_FILE, "run the same command again") from None
        raise
