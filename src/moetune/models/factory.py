"""``build_model``: the model, lora and moe sections in, a model ready to train out.

Steps, in order: pick the architecture (``model.architecture`` or the model's config.json),
load the weights or build from config (``model.random_init``), quantise (QLoRA), upcycle (MPT),
enable non-reentrant gradient checkpointing, decide what trains (:mod:`moetune.models.lora`), then
swap in DeepSpeed MoE blocks (``moe.backend: deepspeed``).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from moetune.errors import ConfigError, UserError
from moetune.models.hf_config import apply_overrides, build_random_init_config, context_length
from moetune.models.kernels import fastest_experts_implementation, log_kernels, resolve_attn_implementation
from moetune.models.lora import apply_training_plan
from moetune.models.mpt_moe import MptMoeForCausalLM, check_loading_info
from moetune.models.quant import prepare_quantized_for_training, quantization_config, wants_quantization
from moetune.models.upcycle import upcycle_mpt

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Architecture:
    """How one model family is built. ``model_types``: the config.json ``model_type`` values it takes."""

    name: str
    model_types: tuple[str, ...]
    random_init_model_type: str
    supports_attn_choice: bool
    has_fused_experts: bool
    build: Callable[[Any, Any], tuple[nn.Module, bool]]  # (config, tokenizer) -> (model, upcycled_now)


def build_model(config, tokenizer=None) -> nn.Module:
    """Build the model ``config`` describes (a PeftModel when ``lora.enabled``).

    ``tokenizer`` (optional): with ``model.random_init`` its size and pad/bos/eos ids go into the
    model config; a loaded model whose embedding is smaller than it is resized. Raises UserError
    for anything the user can fix (unknown architecture, bad override key, missing package, path).
    """
    if wants_quantization(config.model) and not config.lora.enabled:
        raise UserError("model.load_in_4bit/load_in_8bit freeze the base weights in a quantised format, so only an "
                        "adapter can train: set lora.enabled: true.")
    model, upcycled_now = _build_architecture(config, tokenizer)
    if config.training.gradient_checkpointing and not wants_quantization(config.model):
        enable_gradient_checkpointing(model)
    model = apply_training_plan(model, config, upcycled_now=upcycled_now)
    if config.moe.backend == "deepspeed":
        from moetune.models.deepspeed_moe import convert_to_deepspeed_moe

        # After the plan: LoRA and modules_to_save then name the native modules, so the adapter
        # config and every saved file use the mpt_moe names (see native_moe_layout).
        model = convert_to_deepspeed_moe(model, config.moe)
    return model


def build_base_model(config, tokenizer=None) -> nn.Module:
    """The model ``build_model`` wraps, before any freezing or LoRA: loaded, quantised, upcycled
    (with the same seed, so identical) exactly as for training. Load a saved adapter onto it with
    ``peft.PeftModel.from_pretrained(build_base_model(config), adapter_dir)``. It always has native
    MoE blocks: ``moe.backend: deepspeed`` runs also save in that layout."""
    model, _ = _build_architecture(config, tokenizer)
    return model


def _build_architecture(config, tokenizer) -> tuple[nn.Module, bool]:
    architecture = ARCHITECTURES[resolve_architecture(config.model)]
    model, upcycled_now = architecture.build(config, tokenizer)
    check_context_length(model, config.model.max_seq_length)
    return model, upcycled_now


def check_context_length(model: nn.Module, max_seq_length: int) -> None:
    """Training rows of ``model.max_seq_length`` must fit the model's positions: MPT's ALiBi bias,
    for one, is built for ``max_seq_len`` positions and fails on longer rows mid-run."""
    key, value = context_length(model.config) or (None, None)
    if value is not None and value < max_seq_length:
        raise ConfigError("model.max_seq_length", f"model.max_seq_length ({max_seq_length}) is longer than the model's "
                          f"context ({key}: {value} in its config). Lower model.max_seq_length to at most {value}, "
                          f"or raise the model's {key} with model.config_overrides if it can attend that far.")


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant checkpointing: the reentrant variant silently drops the router aux-loss gradient."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with recomputation


def resolve_architecture(model_config) -> str:
    """``model.architecture``, or the registry key of the ``model_type`` in the model's config.json."""
    if model_config.architecture is not None:
        return model_config.architecture
    model_type = read_model_type(model_config.name, model_config.trust_remote_code)
    for name, architecture in ARCHITECTURES.items():
        if model_type in architecture.model_types:
            return name
    raise ConfigError("model.architecture", f"model.name {model_config.name!r} is a {model_type!r} model, which moetune "
                      f"does not know; set model.architecture to one of {sorted(ARCHITECTURES)} if it has that shape.")


def read_model_type(name: str, trust_remote_code: bool = False) -> str:
    """The ``model_type`` in a local folder's config.json, or in a hub model's config."""
    local = Path(name) / "config.json"
    if local.is_file():
        try:
            return json.loads(local.read_text())["model_type"]
        except (json.JSONDecodeError, KeyError) as err:
            raise UserError(f"{local} has no readable model_type ({err}).") from None
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code).model_type
    except (OSError, ValueError) as err:
        raise UserError(f"model.name {name!r} is neither a folder with a config.json nor a reachable hub model "
                        f"({_first_line(err)}). Set model.architecture, or fix the path.") from None


def load_base_model(config, architecture: Architecture, tokenizer=None) -> nn.Module:
    """The architecture's model from weights (model.name) or from config (model.random_init)."""
    spec = config.model
    dtype = resolve_dtype(spec.torch_dtype)
    attn = resolve_attn_implementation(spec.attn_implementation, architecture.supports_attn_choice)
    kwargs: dict[str, Any] = {"attn_implementation": attn}
    experts = spec.experts_implementation or fastest_experts_implementation()
    if architecture.has_fused_experts and experts:
        kwargs["experts_implementation"] = experts
    elif spec.experts_implementation:
        logger.info("model.experts_implementation=%s does not apply: %s experts are separate modules",
                    spec.experts_implementation, architecture.name)
    if spec.random_init:
        hf_config = build_random_init_config(architecture.random_init_model_type, spec.config_overrides,
                                             vocab_size=len(tokenizer) if tokenizer is not None else None,
                                             special_tokens=_special_token_ids(tokenizer))
        # Seeded and isolated from the global RNG: evaluation must rebuild the same random base the
        # adapter was trained on, whatever ran before.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.training.seed)
            model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32 if dtype == "auto" else dtype,
                                                     **kwargs)
    else:
        model = _from_pretrained(spec, architecture, dtype, kwargs, tokenizer)
        if wants_quantization(spec):
            model = prepare_quantized_for_training(model, config.training.gradient_checkpointing)
    log_kernels(model, attn, spec.experts_implementation)
    return model


def _from_pretrained(spec, architecture: Architecture, dtype, kwargs: dict[str, Any], tokenizer) -> nn.Module:
    try:
        hf_config = AutoConfig.from_pretrained(spec.name, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"model.name {spec.name!r} could not be loaded ({_first_line(err)}).") from None
    if hf_config.model_type not in architecture.model_types:
        raise ConfigError("model.architecture", f"model.architecture is {architecture.name!r} but model.name "
                          f"{spec.name!r} is a {hf_config.model_type!r} model.")
    apply_overrides(hf_config, spec.config_overrides)
    quant = quantization_config(spec, None if dtype == "auto" else dtype)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            spec.name, config=hf_config, dtype=dtype, quantization_config=quant,
            trust_remote_code=spec.trust_remote_code, output_loading_info=True, **kwargs)
    except OSError as err:
        raise UserError(f"model.name {spec.name!r}: the weights could not be read ({_first_line(err)}).") from None
    check_loading_info(info, spec.name)
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        logger.info("resizing the embedding from %d to the tokenizer's %d tokens",
                    model.get_input_embeddings().num_embeddings, len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
    return model


def resolve_dtype(name: str) -> torch.dtype | str:
    """``model.torch_dtype`` as a torch dtype ("auto" stays "auto": the checkpoint's own dtype)."""
    return "auto" if name == "auto" else getattr(torch, name)


def _special_token_ids(tokenizer) -> dict[str, int | None]:
    if tokenizer is None:
        return {}
    return {name: getattr(tokenizer, name, None) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---------------------------------------------------------------------------- the architectures


def build_mixtral(config, tokenizer=None) -> tuple[nn.Module, bool]:
    """Mixtral (and MoE causal LMs of its shape): load as is; experts are frozen by the training plan."""
    if config.moe.backend != "native":
        raise ConfigError("moe.backend", "moe.backend: deepspeed swaps the MoE blocks of upcycled MPT models; "
                          "Mixtral keeps its own blocks (use backend: native).")
    model = load_base_model(config, ARCHITECTURES["mixtral"], tokenizer)
    # moetune's trainer weights the aux loss itself (compute_losses); keeping HF's coefficient equal
    # makes `out.loss` of a plain forward with labels agree with it.
    model.config.router_aux_loss_coef = config.moe.auxiliary_loss_weight
    if hasattr(model, "router_aux_loss_coef"):
        model.router_aux_loss_coef = config.moe.auxiliary_loss_weight
    return model, False


def build_mpt(config, tokenizer=None) -> tuple[nn.Module, bool]:
    """MPT: dense, already upcycled (model_type mpt_moe), or upcycled now when ``moe.upcycle``."""
    if config.moe.upcycle and wants_quantization(config.model):
        raise UserError("moe.upcycle copies dense FFN weights into experts, which cannot be done on 4/8-bit weights; "
                        "upcycle first (`moetune upcycle`), then train the saved model.")
    model = load_base_model(config, ARCHITECTURES["mpt"], tokenizer)
    upcycled_now = False
    if config.moe.upcycle and isinstance(model, MptMoeForCausalLM):
        logger.info("model.name is already upcycled (mpt_moe); moe.upcycle has nothing left to do")
    elif config.moe.upcycle:
        # Seeded, so evaluation rebuilds exactly the base the adapter was trained on.
        with whole_weights(model):
            model = upcycle_mpt(model, config.moe, generator=torch.Generator().manual_seed(config.training.seed))
        upcycled_now = True
    return model, upcycled_now


def whole_weights(model: nn.Module) -> contextlib.AbstractContextManager:
    """Gather ZeRO-3-partitioned weights for the duration of a ``with``.

    Under ZeRO-3 with zero3_init_flag each process loads only its shard of the dense model, and
    upcycling copies whole FFNs. The upcycled model is then built whole in every process and
    partitioned by the engine; ``moetune upcycle`` beforehand avoids that peak (the saved model
    loads partitioned).
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


ARCHITECTURES: dict[str, Architecture] = {
    "mixtral": Architecture(
        name="mixtral",
        model_types=("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe"),
        random_init_model_type="mixtral",
        supports_attn_choice=True,
        has_fused_experts=True,
        build=build_mixtral,
    ),
    "mpt": Architecture(
        name="mpt",
        model_types=("mpt", "mpt_moe"),
        random_init_model_type="mpt",
        supports_attn_choice=False,  # MPT's ALiBi attention has one (eager) kernel in transformers
        has_fused_experts=False,
        build=build_mpt,
    ),
}
