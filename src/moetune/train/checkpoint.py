"""Checkpoints: atomic save, rotation that spares the best, exact resume, output_dir safety.

A checkpoint folder holds the adapter in PEFT format (what `PeftModel.from_pretrained` reads), or
the whole model (config.json + model.safetensors) when no adapter trains, the tokenizer files,
Accelerate's state (optimizer, scheduler, RNG states of every process, DeepSpeed shards), plus
``trainer_state.json`` (step, epoch, data position, best metric). So a checkpoint loads on its own:
with ``AutoModelForCausalLM`` / ``AutoTokenizer`` (a full model), ``moetune eval --adapter-path``. It is written under a temporary
name and renamed when complete, so a crash mid-save never leaves a broken checkpoint as the latest.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

from moetune.errors import UserError, first_line
from moetune.train.output_dir import (
    CHECKPOINT_DIR,
    PARTIAL_PREFIX,
    check_output_dir,
    checkpoint_dir_name,
    folder_bytes,
    is_disk_full,
    no_space_failure,
    step_in_checkpoint_name,
)

STATE_FILE = "trainer_state.json"


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


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (by step; at one step an epoch's save last)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_DIR.match(p.name)]
    return sorted(found, key=_checkpoint_order)


def _checkpoint_order(path: Path) -> tuple[int, int, str]:
    step = step_in_checkpoint_name(path.name)
    if step is not None:
        return step, 0, path.name
    # checkpoint-epoch-<n> names its epoch; its step is in its state (-1 when unreadable: the oldest).
    try:
        step = int(json.loads((path / STATE_FILE).read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        step = -1
    return step, 1, path.name


def earlier_checkpoint_hint(checkpoint: Path) -> str:
    """A sentence offering the newest complete checkpoint before ``checkpoint`` in its run ("" if it is no checkpoint folder)."""
    if not CHECKPOINT_DIR.match(checkpoint.name):
        return ""
    order = _checkpoint_order(checkpoint)
    earlier = [p for p in list_checkpoints(checkpoint.parent) if _checkpoint_order(p)[:2] < order[:2]]
    if not earlier:
        return " No earlier checkpoint of this run is left: start the run again."
    return f" Resume from {earlier[-1].name} instead, with training.resume_from_checkpoint={earlier[-1]}."


def resolve_resume(spec: str | None, output_dir: str | Path) -> Path | None:
    """``training.resume_from_checkpoint`` -> a checkpoint folder (``latest`` = newest in output_dir)."""
    if spec is None:
        return None
    if spec == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise UserError(f"training.resume_from_checkpoint is 'latest' but {output_dir} holds no checkpoint-<step> "
                            "folder; start without resume_from_checkpoint.")
        return checkpoints[-1]
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
    (root / "metrics.jsonl").unlink(missing_ok=True)


def save_checkpoint(accelerator, output_dir: str | Path, state: TrainerState, name: str | None = None,
                    tokenizer=None) -> Path:
    """Save everything needed to resume, and ``tokenizer``, into ``output_dir/name`` atomically.

    ``name`` comes from :func:`~moetune.train.output_dir.checkpoint_dir_name` (default checkpoint-<step>).
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
    ``moe.backend: deepspeed`` (the engine's own files keep DeepSpeed's names, for resuming).
    """

    from moetune.models.deepspeed_moe import native_moe_layout

    def save_hook(models, weights, output_dir):
        for model in models:
            unwrapped = accelerator.unwrap_model(model)
            # Gathering sharded weights (ZeRO-3, FSDP) or expert-parallel experts is collective: every rank calls it.
            with native_moe_layout(unwrapped):
                state_dict = accelerator.get_state_dict(model) if weights_are_sharded(accelerator) else None
                if accelerator.is_main_process:
                    save_trainable_weights(unwrapped, output_dir, state_dict)
        weights.clear()

    def load_hook(models, input_dir):
        while models:
            load_trainable_weights(accelerator.unwrap_model(models.pop()), Path(input_dir))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_trainable_weights(model, directory, state_dict=None) -> None:
    """What a checkpoint holds of the model: the adapter, the selected experts (ESFT) or the whole model."""
    from moetune.models.esft import save_esft, selection_of

    if selection_of(model) is not None:
        save_esft(model, directory)
    else:
        model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)


def load_trainable_weights(model, directory: Path) -> None:
    """Load what ``save_pretrained`` wrote: the adapter of a PeftModel, else the full model's weights.

    The files are in the native MoE layout, so a model with DeepSpeed MoE blocks takes them through
    :func:`~moetune.models.deepspeed_moe.native_moe_layout` (collective under expert parallelism).
    """
    from moetune.models.deepspeed_moe import native_moe_layout

    with native_moe_layout(model):
        _load_trainable_weights(model, directory)


def _load_trainable_weights(model, directory: Path) -> None:
    from peft import PeftModel, set_peft_model_state_dict
    from peft.utils import load_peft_weights
    from safetensors import SafetensorError

    from moetune.models.esft import load_esft, selection_of

    if selection_of(model) is not None:
        load_esft(model, directory)
        return
    if isinstance(model, PeftModel):
        try:
            weights = load_peft_weights(str(directory))
        except SafetensorError as err:
            adapter = directory / "adapter_model.safetensors"
            raise UserError(f"{adapter} is truncated or corrupt ({first_line(err)}).") from None
        except (FileNotFoundError, ValueError, OSError) as err:
            raise UserError(f"{directory} has no readable adapter ({err}).") from None
        result = set_peft_model_state_dict(model, weights)
        if result.unexpected_keys:
            raise UserError(f"The adapter in {directory} does not fit this model: unexpected weights "
                            f"{result.unexpected_keys[:3]}... (trained with another lora/moe config?).")
        return
    from safetensors.torch import load_file

    files = sorted(directory.glob("model*.safetensors"))
    if not files:
        raise UserError(f"{directory} has no model*.safetensors to resume the model weights from.")
    state_dict = {}
    for file in files:
        try:
            state_dict.update(load_file(str(file)))
        except SafetensorError as err:
            raise UserError(f"{file} is truncated or corrupt ({first_line(err)}).") from None
    result = model.load_state_dict(state_dict, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise UserError(f"The weights in {directory} do not fit this model (missing {missing[:3]}, unexpected "
                        f"{result.unexpected_keys[:3]}).")



def _is_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type.name == "DEEPSPEED"


def weights_are_sharded(accelerator) -> bool:
    """DeepSpeed and FSDP hold the weights in pieces: a whole state dict must be gathered to save."""
    return accelerator.distributed_type.name in ("DEEPSPEED", "FSDP")
