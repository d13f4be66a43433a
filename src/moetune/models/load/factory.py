"""``build_model``: the model, lora and moe sections (plus the run's seed) in, a model ready to train out.

Steps, in order: pick the family (``model.architecture`` or the model's config.json, see
:mod:`moetune.models.families`), load the weights or build from config (``model.random_init``),
quantise (QLoRA), let the family finish the model (MPT upcycles), enable non-reentrant gradient
checkpointing, decide what trains (:mod:`moetune.models.trainable.plan`), then swap in DeepSpeed MoE blocks
(``moe.expert_parallel.backend: deepspeed``).

Every check on the way that needs no weight also runs, with the same functions, on the model built on
the meta device (:mod:`moetune.models.check`): ``moetune validate`` runs it, and train runs it before it
loads anything.
"""

from __future__ import annotations

import logging

from torch import nn

from moetune.errors import ConfigError
from moetune.models.families import attach_family, family_for_model_type, get_family, known_model_types
from moetune.models.families._spec import FamilySpec, Traits
from moetune.models.load.pretrained import build_pretrained, read_model_config, read_model_type
from moetune.models.load.quant import wants_quantization
from moetune.models.trainable.plan import apply_training_plan

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
    family = resolve_family(config.model)
    model, traits = _build_family(family, config, tokenizer, seed=seed, gradient_checkpointing=gradient_checkpointing)
    if gradient_checkpointing and not wants_quantization(config.model):
        enable_gradient_checkpointing(model)
    model = apply_training_plan(model, config, traits, family)
    if config.moe.expert_parallel.backend == "deepspeed":
        from moetune.models.families.mpt.deepspeed_moe import convert_to_deepspeed_moe

        # After the plan: LoRA and modules_to_save then name the native modules, so the adapter
        # config and every saved file use the mpt_moe names (see native_moe_layout).
        model = convert_to_deepspeed_moe(model, config.moe)
    return model


def build_base_model(config, tokenizer=None, *, seed: int) -> nn.Module:
    """The model ``build_model`` wraps, before any freezing or LoRA: loaded, quantised, upcycled
    exactly as for training (with training's ``seed`` the weights are identical), for evaluation:
    without gradient checkpointing. Load a saved adapter onto it with
    ``peft.PeftModel.from_pretrained(build_base_model(config, seed=...), adapter_dir)``. It always
    has native MoE blocks: ``moe.expert_parallel.backend: deepspeed`` runs also save in that layout."""
    model, _ = _build_family(resolve_family(config.model), config, tokenizer, seed=seed, gradient_checkpointing=False)
    return model


def _build_family(family: FamilySpec, config, tokenizer, *, seed: int,
                  gradient_checkpointing: bool) -> tuple[nn.Module, Traits]:
    check_router_bias_update(family, config)
    build = family.build or build_pretrained
    model, traits = build(family, config, tokenizer, seed=seed, gradient_checkpointing=gradient_checkpointing)
    attach_family(model, family)
    check_context_length(model, config.model.max_seq_length, family.context_key)
    return model, traits


def check_router_bias_update(family: FamilySpec, config, hf_config=None) -> None:
    """``moe.router_bias_update_rate`` needs a correction bias inside the router, which the adapter saves
    with it (DeepSeek-V3, GLM-4.5 and the other routers of that shape). ``hf_config``: the model's, when
    known (else built from model.random_init or read from the model's config; no weight is read)."""
    if config.moe.router_bias_update_rate <= 0:
        return
    if hf_config is None:
        from moetune.models.load.hf_config import build_random_init_config

        hf_config = (build_random_init_config(family.random_init_model_type, config.model.config_overrides)
                     if config.model.random_init else read_model_config(config.model, family))
    if family.movable_bias(hf_config) is not None:
        return
    bias = family.router_of(hf_config).correction_bias
    where = (f"its correction bias ({bias}) sits outside the router ({family.router_name}), so no adapter could save "
             "it" if bias else "they have none")
    raise ConfigError("moe.router_bias_update_rate", f"moe.router_bias_update_rate moves a router's correction bias, "
                      f"which {hf_config.model_type!r} models cannot do: {where} (sigmoid routers such as DeepSeek-V3's "
                      "and GLM-4.5's can); set it to 0.")


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


def resolve_family(model_config) -> FamilySpec:
    """The family of ``model.architecture``, or of the ``model_type`` in the model's config.json."""
    if model_config.architecture is not None:
        return get_family(model_config.architecture)
    model_type = read_model_type(model_config.name, model_config.trust_remote_code)
    family = family_for_model_type(model_type)
    if family is None:
        raise ConfigError("model.architecture", f"model.name {model_config.name!r} is a {model_type!r} model, which "
                          f"moetune does not support; it supports {', '.join(known_model_types())} (README, Supported "
                          "model families, lists the MoE types transformers has that moetune leaves out, and why).")
    return family


