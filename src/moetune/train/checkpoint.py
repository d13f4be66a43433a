"""Checkpoints: atomic save, rotation that spares the best, exact resume, output_dir safety.

A checkpoint folder holds the adapter in PEFT format (what `PeftModel.from_pretrained` reads), or
the whole model (config.json + model.safetensors) when no adapter trains, the tokenizer files,
Accelerate's state (optimizer, scheduler, RNG states of every process, DeepSpeed shards), plus
``trainer_state.json`` (step, epoch, data position, best metric). So a checkpoint loads on its own:
with ``AutoModelForCausalLM`` / ``AutoTokenizer`` (a full model), ``moetune eval --adapter-path``. It is written under a temporary
name and renamed when complete, so a crash mid-save never leaves a broken checkpoint as the latest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

from moetune.errors import UserError, first_line
from moetune.models.trainable.weights import load_trainable_weights, save_trainable_weights
from moetune.run_dir import (
    CHECKPOINT_DIR,
    METRICS_FILE,
    PARTIAL_PREFIX,
    STATE_FILE,
    checkpoint_dir_name,
    checkpoint_order,
    latest_checkpoint,
    list_checkpoints,
)
from moetune.train.output_dir import check_output_dir, folder_bytes, is_disk_full, no_space_failure


@dataclass
class TrainerState:
    """Where a run stands; saved with every checkpoint and enough to continue exactly."""

    global_step: int = 0
    epoch: int = 0  # the epoch in progress (0-based)
    batches_done_in_epoch: int = 0  # micro-batches of that epoch already consumed
    tokens_seen: int = 0
    best_metric: float | None = None
    best_checkpoint: str | None = None
    evals_without_improvement: int = 0
    lr_schedule: dict | None = None  # what moetune.train.optim.schedule_summary said when the schedule was built

    def save(self, directory: Path) -> None:
        (directory / STATE_FILE).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> TrainerState:
        path = directory / STATE_FILE
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except FileNotFoundError:
            raise UserError(f"{directory} is not a moetune checkpoint: it has no {STATE_FILE}.") from None
        except (json.JSONDecodeError, TypeError) as err:
            raise UserError(f"{path} is corrupt ({err}).{earlier_checkpoint_hint(directory)}") from None


def earlier_checkpoint_hint(checkpoint: Path) -> str:
    """A sentence offering the newest complete checkpoint before ``checkpoint`` in its run ("" if it is no checkpoint folder)."""
    if not CHECKPOINT_DIR.match(checkpoint.name):
        return ""
    order = checkpoint_order(checkpoint)
    earlier = [p for p in list_checkpoints(checkpoint.parent) if checkpoint_order(p)[:2] < order[:2]]
    if not earlier:
        return " No earlier checkpoint of this run is left: start the run again."
    return f" Resume from {earlier[-1].name} instead, with training.resume_from_checkpoint={earlier[-1]}."


def resolve_resume(spec: str | None, output_dir: str | Path) -> Path | None:
    """``training.resume_from_checkpoint`` -> a checkpoint folder (``latest`` = newest in output_dir)."""
    if spec is None:
        return None
    if spec == "latest":
        latest = latest_checkpoint(output_dir)
        if latest is None:
            raise UserError(f"training.resume_from_checkpoint is 'latest' but {output_dir} holds no checkpoint-<step> "
                            "folder; start without resume_from_checkpoint.")
        return latest
    path = Path(spec)
    if not path.is_dir():
        raise UserError(f"training.resume_from_checkpoint: {spec} is not a directory.")
    TrainerState.load(path)  # fails clearly on a folder that is not a checkpoint
    return path


def prepare_output_dir(output_dir: str | Path, resuming: bool, overwrite: bool) -> None:
    """Refuse to mix a new run into another run's folder unless resuming or overwrite is set.

    A folder holding anything moetune did not write is refused whatever the flags say
    (:func:`~moetune.train.output_dir.check_output_dir`). With ``overwrite_output_dir`` the earlier
    run's checkpoints and metrics are removed, so the folder describes one run. Partial saves of a
    run that died are removed: they can be as large as a checkpoint. Call it holding the run's lock.
    """
    root = Path(output_dir)
    check_output_dir(root)
    root.mkdir(parents=True, exist_ok=True)
    for partial in root.glob(f"{PARTIAL_PREFIX}checkpoint-*"):
        shutil.rmtree(partial, ignore_errors=True)
    checkpoints = list_checkpoints(root)
    if not checkpoints or resuming:
        return
    if not overwrite:
        raise UserError(f"{root} already holds another run's checkpoints ({checkpoints[-1].name}, ...). Pick a new "
                        "training.output_dir, resume it with training.resume_from_checkpoint=latest, or replace it "
                        "with training.overwrite_output_dir=true.")
    for path in checkpoints:
        shutil.rmtree(path)
    (root / METRICS_FILE).unlink(missing_ok=True)


def save_checkpoint(accelerator, output_dir: str | Path, state: TrainerState, name: str | None = None,
                    tokenizer=None) -> Path:
    """Save everything needed to resume, and ``tokenizer``, into ``output_dir/name`` atomically.

    ``name`` comes from :func:`~moetune.run_dir.checkpoint_dir_name` (default checkpoint-<step>).
    A full disk is a RunFailure saying how much room is needed; the partial save is removed and the
    earlier checkpoints are left as they were.
    """
    root = Path(output_dir)
    name = name or checkpoint_dir_name("step", state.global_step)
    final = root / name
    partial = root / f"{PARTIAL_PREFIX}{name}"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    kwargs = {"exclude_frozen_parameters": True} if _is_deepspeed(accelerator) else {}
    try:
        accelerator.save_state(str(partial), **kwargs)
        if accelerator.is_main_process:
            if tokenizer is not None:
                tokenizer.save_pretrained(str(partial))
            state.save(partial)
    except Exception as err:
        earlier = list_checkpoints(root)
        # Checkpoints of one run have one size; without an earlier one, what was written is a lower bound.
        needed = folder_bytes(earlier[-1]) if earlier else folder_bytes(partial)
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        if not is_disk_full(err, root, needed):
            raise
        if earlier:
            raise no_space_failure(root, needed, f"{final.name} ({earlier[-1].name} and the checkpoints before it are "
                                   "intact)", "resume with training.resume_from_checkpoint=latest") from None
        raise no_space_failure(root, needed, f"{final.name}, the run's first checkpoint", "start the run again",
                               at_least=True) from None
    # Every process writes into the partial folder (its RNG state, its shards): all must be done before it is renamed.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # a resumed run passing a step it saved before
            shutil.rmtree(final)
        partial.rename(final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, checkpoint: Path) -> TrainerState:
    """Restore model, optimizer, scheduler and RNG states; return where the run stood."""
    from safetensors import SafetensorError

    state = TrainerState.load(checkpoint)
    kwargs = {"load_module_strict": False} if _is_deepspeed(accelerator) else {}
    try:
        accelerator.load_state(str(checkpoint), **kwargs)
    except UserError as err:  # the adapter, from the load hook
        raise UserError(f"Cannot resume from {checkpoint}: {err}{earlier_checkpoint_hint(checkpoint)}") from None
    except (FileNotFoundError, KeyError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as err:
        raise UserError(f"Cannot resume from {checkpoint}: {first_line(err)} (was it written by another model or "
                        f"config, or cut short?).{earlier_checkpoint_hint(checkpoint)}") from None
    return state


def rotate_checkpoints(output_dir: str | Path, limit: int | None, keep: str | None) -> list[Path]:
    """Delete the oldest checkpoints beyond ``limit``, never the one named ``keep`` (the best)."""
    if limit is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    removable = [p for p in checkpoints if p.name != keep]
    excess = len(checkpoints) - limit
    doomed = removable[:max(excess, 0)]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def install_adapter_hooks(accelerator) -> None:
    """Make ``save_state`` write the adapter (PEFT format) instead of the full base model's weights.

    Accelerate would otherwise save the whole state dict, frozen Mixtral experts included (~90 GB per
    checkpoint). Under DeepSpeed the engine saves its own shards; the PEFT files are written as well so
    every checkpoint loads with ``PeftModel.from_pretrained``, in the native MoE layout also under
    ``moe.expert_parallel.backend: deepspeed`` (the engine's own files keep DeepSpeed's names, for resuming).
    """

    def save_hook(models, weights, output_dir):
        for model in models:
            save_trainable_files(accelerator, model, output_dir)
        weights.clear()

    def load_hook(models, input_dir):
        while models:
            load_trainable_weights(accelerator.unwrap_model(models.pop()), Path(input_dir))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_trainable_files(accelerator, model, directory, tokenizer=None, room=None, then=None) -> None:
    """Write what ``model`` trains (:func:`~moetune.models.trainable.weights.save_trainable_weights`) and
    ``tokenizer`` into ``directory``, in the native MoE layout, from the main process.

    Every rank calls it: gathering sharded weights (ZeRO-3, FSDP) or expert-parallel experts is
    collective. ``room(directory, bytes_needed)``, when given, is the context the files are written in
    (what a full disk becomes); ``then(unwrapped_model)`` runs on the main process afterwards, still
    in the native layout.
    """
    from moetune.models.families.mpt.deepspeed_moe import native_moe_layout

    unwrapped = accelerator.unwrap_model(model)
    with native_moe_layout(unwrapped):
        state_dict = accelerator.get_state_dict(model) if weights_are_sharded(accelerator) else None
        if not accelerator.is_main_process:
            return
        needed = sum(p.numel() * p.element_size() for p in unwrapped.parameters() if p.requires_grad) if room else 0
        with room(Path(directory), needed) if room else contextlib.nullcontext():
            save_trainable_weights(unwrapped, directory, state_dict)
            if tokenizer is not None:
                tokenizer.save_pretrained(directory)
        if then is not None:
            then(unwrapped)


def _is_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type.name == "DEEPSPEED"


def weights_are_sharded(accelerator) -> bool:
    """DeepSpeed and FSDP hold the weights in pieces: a whole state dict must be gathered to save."""
    return accelerator.distributed_type.name in ("DEEPSPEED", "FSDP")
