"""The files of what a model trains: a PEFT adapter, the selected experts (ESFT), or the whole model.

A checkpoint and a run's final save hold these files; training resumes from them and evaluation
loads them onto the base model. They are always in the native MoE layout, so a model with
DeepSpeed MoE blocks (``moe.expert_parallel.backend: deepspeed``) reads them through
:func:`~moetune.models.families.mpt.deepspeed_moe.native_moe_layout`.
"""

from __future__ import annotations

from pathlib import Path

from moetune.errors import UserError, first_line
from moetune.run_dir import ADAPTER_WEIGHTS, FULL_MODEL_WEIGHTS


def save_trainable_weights(model, directory, state_dict=None) -> None:
    """What a checkpoint holds of the model: the adapter, the selected experts (ESFT) or the whole model.

    ``state_dict`` is the whole model's, gathered beforehand when the weights are sharded (ZeRO-3, FSDP).
    """
    from moetune.models.trainable.esft import save_esft, selection_of

    if selection_of(model) is not None:
        save_esft(model, directory)
    else:
        model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)


def load_trainable_weights(model, directory: Path) -> None:
    """Load what :func:`save_trainable_weights` wrote: the adapter of a PeftModel, the ESFT experts, else
    the full model's weights. A UserError names the file that is missing, corrupt or does not fit.

    The files are in the native MoE layout, so a model with DeepSpeed MoE blocks takes them through
    :func:`~moetune.models.families.mpt.deepspeed_moe.native_moe_layout` (collective under expert parallelism).
    """
    from moetune.models.families.mpt.deepspeed_moe import native_moe_layout

    with native_moe_layout(model):
        _load_trainable_weights(model, Path(directory))


def _load_trainable_weights(model, directory: Path) -> None:
    from peft import PeftModel, set_peft_model_state_dict
    from peft.utils import load_peft_weights
    from safetensors import SafetensorError

    from moetune.models.trainable.esft import load_esft, selection_of

    if selection_of(model) is not None:
        load_esft(model, directory)
        return
    if isinstance(model, PeftModel):
        try:
            weights = load_peft_weights(str(directory))
        except SafetensorError as err:
            adapter = directory / ADAPTER_WEIGHTS[0]  # the one load_peft_weights reads as safetensors
            raise UserError(f"{adapter} is truncated or corrupt ({first_line(err)}).") from None
        except (FileNotFoundError, ValueError, OSError) as err:
            raise UserError(f"{directory} has no readable adapter ({err}).") from None
        result = set_peft_model_state_dict(model, weights)
        if result.unexpected_keys:
            raise UserError(f"The adapter in {directory} does not fit this model: unexpected weights "
                            f"{result.unexpected_keys[:3]}... (trained with another lora/moe config?).")
        return
    from safetensors.torch import load_file

    files = sorted(directory.glob(FULL_MODEL_WEIGHTS))
    if not files:
        raise UserError(f"{directory} has no {FULL_MODEL_WEIGHTS} to resume the model weights from.")
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
