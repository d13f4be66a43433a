"""``build_model``: the model, lora and moe sections (plus the run's seed) in, a model ready to train out.

Steps, in order: pick the family (``model.architecture`` or the model's config.json, see
:mod:`moetune.models.families`), load the weights or build from config (``model.random_init``),
quantise (QLoRA), let the family finish the model (MPT upcycles), enable non-reentrant gradient
checkpointing, decide what trains (:mod:`moetune.models.training_plan`), then swap in DeepSpeed MoE blocks
(``moe.backend: deepspeed``).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from moetune.errors import ConfigError, UserError, first_line
from moetune.models.dtypes import resolve_dtype
from moetune.models.families import FAMILY_NAMES, family_for_model_type, get_family, known_model_types
from moetune.models.families._spec import FamilySpec, Traits
from moetune.models.hf_config import apply_overrides, build_random_init_config
from moetune.models.kernels import fastest_experts_implementation, log_kernels, resolve_attn_implementation
from moetune.models.mpt_moe import check_loading_info
from moetune.models.quant import prepare_quantized_for_training, quantization_config, wants_quantization
from moetune.models.training_plan import apply_training_plan

logger = logging.getLogger(__name__)


def build_model(config, tokenizer=None, *, seed: int, gradient_checkpointing: bool = False) -> nn.Module:
    """Build the model ``config`` describes (a PeftModel when ``lora.enabled``).

    ``tokenizer`` (optional): with ``model.random_init`` its size and pad/bos/eos ids go into the
    model config; a loaded model whose embedding is smaller than it is resized. ``seed`` draws the
    weights moetune creates (random init, upcycled routers and expert noise); rebuilding the base
    with :func:`build_base_model` and the same seed gives the same weights. ``gradient_checkpointing``:
    recompute activations in backward (non-reentrant; it saves memory and changes no number).
    Raises UserError for anything the user can fix (unknown architecture, bad override key,
    missing package, path).
    """
    if wants_quantization(config.model) and not config.lora.enabled:
        raise UserError("model.load_in_4bit/load_in_8bit freeze the base weights in a quantised format, so only an "
                        "adapter can train: set lora.enabled: true.")
    family = resolve_family(config.model)
    model, traits = _build_family(family, config, tokenizer, seed=seed, gradient_checkpointing=gradient_checkpointing)
    if gradient_checkpointing and not wants_quantization(config.model):
        enable_gradient_checkpointing(model)
    model = apply_training_plan(model, config, traits, family)
    if config.moe.backend == "deepspeed":
        from moetune.models.deepspeed_moe import convert_to_deepspeed_moe

        # After the plan: LoRA and modules_to_save then name the native modules, so the adapter
        # config and every saved file use the mpt_moe names (see native_moe_layout).
        model = convert_to_deepspeed_moe(model, config.moe)
    return model


def build_base_model(config, tokenizer=None, *, seed: int) -> nn.Module:
    """The model ``build_model`` wraps, before any freezing or LoRA: loaded, quantised, upcycled
    exactly as for training (with training's ``seed`` the weights are identical), for evaluation:
    without gradient checkpointing. Load a saved adapter onto it with
    ``peft.PeftModel.from_pretrained(build_base_model(config, seed=...), adapter_dir)``. It always
    has native MoE blocks: ``moe.backend: deepspeed`` runs also save in that layout."""
    model, _ = _build_family(resolve_family(config.model), config, tokenizer, seed=seed, gradient_checkpointing=False)
    return model


def _build_family(family: FamilySpec, config, tokenizer, *, seed: int,
                  gradient_checkpointing: bool) -> tuple[nn.Module, Traits]:
    check_router_bias_update(family, config)
    build = family.build or build_pretrained
    model, traits = build(family, config, tokenizer, seed=seed, gradient_checkpointing=gradient_checkpointing)
    check_context_length(model, config.model.max_seq_length, family.context_key)
    return model, traits


def check_router_bias_update(family: FamilySpec, config) -> None:
    """``moe.router_bias_update_rate`` needs a router with a correction bias (DeepSeek-V3, GLM-4.5)."""
    if config.moe.router_bias_update_rate <= 0:
        return
    model_type = (family.random_init_model_type if config.model.random_init
                  else read_model_type(config.model.name, config.model.trust_remote_code))
    if not family.has_correction_bias(model_type):
        raise ConfigError("moe.router_bias_update_rate", f"moe.router_bias_update_rate moves a router's correction "
                          f"bias, which {model_type!r} models do not have (sigmoid routers such as DeepSeek-V3's and "
                          "GLM-4.5's do); set it to 0.")


def check_context_length(model: nn.Module, max_seq_length: int, key: str = "max_position_embeddings") -> None:
    """Training rows of ``model.max_seq_length`` must fit the model's positions: MPT's ALiBi bias,
    for one, is built for ``max_seq_len`` positions and fails on longer rows mid-run."""
    value = getattr(model.config, key, None)
    if isinstance(value, int) and value > 0 and value < max_seq_length:
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
    """``model.architecture``, or the family whose model types include the one in the model's config.json."""
    return resolve_family(model_config).name


def resolve_family(model_config) -> FamilySpec:
    """The family of ``model.architecture``, or of the ``model_type`` in the model's config.json."""
    if model_config.architecture is not None:
        return get_family(model_config.architecture)
    model_type = read_model_type(model_config.name, model_config.trust_remote_code)
    family = family_for_model_type(model_type)
    if family is None:
        raise ConfigError("model.architecture", f"model.name {model_config.name!r} is a {model_type!r} model, which "
                          f"moetune does not know (it loads {', '.join(known_model_types())}); set model.architecture "
                          f"to one of {list(FAMILY_NAMES)} if it has that shape.")
    return family


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
                        f"({first_line(err)}). Set model.architecture, or fix the path.") from None


def load_base_model(config, family: FamilySpec, tokenizer=None, *, seed: int,
                    gradient_checkpointing: bool) -> nn.Module:
    """The family's model from weights (model.name) or from config (model.random_init, drawn with
    ``seed``); a quantised one prepared for training, with ``gradient_checkpointing`` when asked."""
    spec = config.model
    dtype = resolve_dtype(spec.torch_dtype)
    attn = resolve_attn_implementation(spec.attn_implementation, family.attention_kernels)
    kwargs: dict[str, Any] = {"attn_implementation": attn}
    experts = spec.experts_implementation or fastest_experts_implementation()
    if family.fused_experts and experts:
        kwargs["experts_implementation"] = experts
    elif spec.experts_implementation:
        logger.info("model.experts_implementation=%s does not apply: %s experts are separate modules",
                    spec.experts_implementation, family.name)
    if spec.random_init:
        hf_config = build_random_init_config(family.random_init_model_type, spec.config_overrides,
                                             vocab_size=len(tokenizer) if tokenizer is not None else None,
                                             special_tokens=_special_token_ids(tokenizer))
        # Seeded and isolated from the global RNG: evaluation must rebuild the same random base the
        # adapter was trained on, whatever ran before.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32 if dtype == "auto" else dtype,
                                                     **kwargs)
    else:
        model = _from_pretrained(spec, family, dtype, kwargs, tokenizer)
        if wants_quantization(spec):
            model = prepare_quantized_for_training(model, gradient_checkpointing)
    log_kernels(model, attn, spec.experts_implementation)
    return model


def _from_pretrained(spec, family: FamilySpec, dtype, kwargs: dict[str, Any], tokenizer) -> nn.Module:
    try:
        hf_config = AutoConfig.from_pretrained(spec.name, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"model.name {spec.name!r} could not be loaded ({first_line(err)}).") from None
    if hf_config.model_type not in family.model_types:
        raise ConfigError("model.architecture", f"model.architecture is {family.name!r} but model.name "
                          f"{spec.name!r} is a {hf_config.model_type!r} model.")
    apply_overrides(hf_config, spec.config_overrides)
    quant = quantization_config(spec, None if dtype == "auto" else dtype)
    family_kwargs = family.pretrained_kwargs(hf_config) if family.pretrained_kwargs else {}
    if quant is not None and "quantization_config" in family_kwargs:
        raise UserError(f"model.name {spec.name!r} is already quantised ({family.name}); model.load_in_4bit/"
                        "load_in_8bit cannot quantise it again. Set both to false.")
    quant = family_kwargs.pop("quantization_config", quant)
    kwargs = {**kwargs, **family_kwargs}
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            spec.name, config=hf_config, dtype=dtype, quantization_config=quant,
            trust_remote_code=spec.trust_remote_code, output_loading_info=True, **kwargs)
    except OSError as err:
        raise UserError(f"model.name {spec.name!r}: the weights could not be read ({first_line(err)}).") from None
    check_loading_info(info, spec.name)
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        logger.info("resizing the embedding from %d to the tokenizer's %d tokens",
                    model.get_input_embeddings().num_embeddings, len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
    return model


def _special_token_ids(tokenizer) -> dict[str, int | None]:
    if tokenizer is None:
        return {}
    return {name: getattr(tokenizer, name, None) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}



# ------------------------------------------------------------------------------ building a family


def build_pretrained(family: FamilySpec, config, tokenizer=None, *, seed: int,
                     gradient_checkpointing: bool) -> tuple[nn.Module, Traits]:
    """The build of a pretrained MoE family: load as is; the training plan freezes the experts."""
    if config.moe.backend != "native":
        raise ConfigError("moe.backend", f"moe.backend: deepspeed swaps the MoE blocks of upcycled MPT models; "
                          f"{family.name} keeps its own blocks (use backend: native).")
    if config.moe.upcycling.enabled:
        raise ConfigError("moe.upcycling.enabled", "moe.upcycling.enabled turns a dense MPT model into an MoE; "
                          f"model.name is a {family.name} model, which is already an MoE.")
    model = load_base_model(config, family, tokenizer, seed=seed, gradient_checkpointing=gradient_checkpointing)
    # moetune's trainer weights the aux loss itself (compute_losses); keeping HF's coefficient equal
    # makes `out.loss` of a plain forward with labels agree with it.
    if hasattr(model.config, "router_aux_loss_coef"):
        model.config.router_aux_loss_coef = config.moe.auxiliary_loss_weight
    if hasattr(model, "router_aux_loss_coef"):
        model.router_aux_loss_coef = config.moe.auxiliary_loss_weight
    return model, Traits()


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
