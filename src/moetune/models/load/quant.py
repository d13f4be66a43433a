"""QLoRA loading: 4-bit NF4 (or 8-bit) base weights through bitsandbytes, an optional extra."""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch import nn

from moetune.errors import UserError
from moetune.models.layout import is_expert_parameter

logger = logging.getLogger(__name__)


def wants_quantization(model_config) -> bool:
    """True when the model section asks for 4-bit or 8-bit weights."""
    return model_config.load_in_4bit or model_config.load_in_8bit


def require_bitsandbytes(model_config) -> None:
    """Raise a UserError saying how to install bitsandbytes when it is missing."""
    if importlib.util.find_spec("bitsandbytes") is None:
        flag = "model.load_in_4bit" if model_config.load_in_4bit else "model.load_in_8bit"
        raise UserError(f"{flag} needs the bitsandbytes package, which is not installed. Install it with "
                        "`pip install moetune[quant]`, or set it to false.")


def quantization_config(model_config, compute_dtype: torch.dtype | None):
    """The BitsAndBytesConfig for ``model_config`` (NF4, double quantisation), or None when not quantising.

    ``compute_dtype`` is what the 4-bit matmuls run in; None (``torch_dtype: auto``) means bfloat16.
    """
    if not wants_quantization(model_config):
        return None
    require_bitsandbytes(model_config)
    from transformers import BitsAndBytesConfig

    if model_config.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,  # quantises the quantisation constants too: ~0.4 bit/param saved
        bnb_4bit_compute_dtype=compute_dtype or torch.bfloat16,
    )


def prepare_quantized_for_training(model: nn.Module, gradient_checkpointing: bool) -> nn.Module:
    """PEFT's prepare_model_for_kbit_training: norms in fp32, inputs requiring grad, and
    non-reentrant checkpointing (reentrant checkpointing drops the router aux-loss gradient); then the
    fused expert stacks go back to the dtype they loaded in (:func:`restore_fused_experts`)."""
    from peft import prepare_model_for_kbit_training

    loaded = {name: param.dtype for name, param in model.named_parameters() if is_fused_expert_stack(name, param)}
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    restore_fused_experts(model, loaded)
    return model


def is_fused_expert_stack(name: str, param: torch.Tensor) -> bool:
    """A routed experts' fused (E, ...) weight: ``experts.gate_up_proj`` / ``experts.down_proj``, 3-D. bitsandbytes
    converts nn.Linear only, so these stay unquantised, in the dtype they loaded in. (A Params4bit is 2-D and
    packed; a conv1d weight is 3-D but no expert's.)"""
    return param.ndim >= 3 and is_expert_parameter(name) and type(param).__name__ != "Params4bit"


def restore_fused_experts(model: nn.Module, loaded: dict[str, torch.dtype]) -> int:
    """Undo PEFT's float32 cast of the fused expert stacks named in ``loaded`` (name -> the dtype they loaded in);
    returns how many went back. They stay frozen.

    prepare_model_for_kbit_training casts every 16-bit parameter that is not a Params4bit to float32, for the
    stability of the small ones (norms, biases, embeddings, lm_head), which keep it. It was written for models
    whose every large weight is a quantised Linear; MoE families in transformers 5 keep their routed experts as
    fused 3-D Parameters, which bitsandbytes leaves alone, so the cast doubled the largest weights of the model
    (gpt-oss-20b: 76 GiB of weights in 4-bit against 39 GiB in plain bf16). Frozen, they gain nothing from
    float32. Each experts module then computes in its weights' dtype (:func:`_compute_in`), as bitsandbytes'
    Linear4bit computes in its compute dtype.
    """
    owners: dict[str, torch.dtype] = {}
    restored = 0
    for name, param in model.named_parameters():
        dtype = loaded.get(name)
        if dtype is None or param.dtype == dtype:
            continue
        param.data = param.data.to(dtype)
        param.requires_grad_(False)
        restored += 1
        owners[name.rpartition(".")[0]] = dtype
    for path, dtype in owners.items():
        module = model.get_submodule(path)
        pre_hook, hook = _compute_in(dtype)
        module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        module.register_forward_hook(hook)
    if owners:
        logger.info("4/8-bit loading: %d fused expert stacks kept in %s (unquantised, frozen)", restored,
                    ", ".join(sorted({str(d).removeprefix("torch.") for d in owners.values()})))
    return restored


def _compute_in(dtype: torch.dtype):
    """Forward hooks for an experts module whose weights are in ``dtype``: without autocast, the hidden states
    (float32 after PEFT's preparation: the embedding and norms are) are cast to ``dtype`` going in and the
    output back to their dtype coming out, as Linear4bit does with its compute dtype; the eager and batched
    experts kernels would otherwise fail on a dtype mismatch. Under autocast (training.bf16 / fp16) they do
    nothing: autocast casts the experts' matmuls itself, and grouped_mm casts its input to the weights' dtype."""
    cast_back: list[torch.dtype | None] = []

    def pre_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor) or hidden.dtype == dtype or _autocast_on(hidden):
            cast_back.append(None)
            return None
        cast_back.append(hidden.dtype)
        if args:
            return (hidden.to(dtype), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden.to(dtype)}

    def hook(module, args, output):
        back = cast_back.pop() if cast_back else None
        if back is None or not isinstance(output, torch.Tensor):
            return None
        return output.to(back)

    return pre_hook, hook


def _autocast_on(tensor: torch.Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(tensor.device.type)
    except RuntimeError:  # a device type torch has no autocast for (meta)
        return False
