"""QLoRA loading: 4-bit NF4 (or 8-bit) base weights through bitsandbytes, an optional extra."""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch import nn

from moetune.errors import UserError

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
    non-reentrant checkpointing (reentrant checkpointing drops the router aux-loss gradient)."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )

