"""Loading a family's model: from its weights (``model.name``) or from config (``model.random_init``),
with the attention and experts kernels picked, quantised for QLoRA when asked, and every weight checked
to have loaded. The default build of a pretrained MoE family (:func:`build_pretrained`) is here too:
family modules with a build of their own (MPT) call :func:`load_base_model` from theirs.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from moetune.config.schema import deepspeed_backend_message
from moetune.errors import ConfigError, UserError, first_line
from moetune.models.families._spec import FamilySpec, Traits
from moetune.models.load.dtypes import resolve_dtype
from moetune.models.load.hf_config import apply_overrides, build_random_init_config, config_values, read_hf_config
from moetune.models.load.kernels import fastest_experts_implementation, log_kernels, resolve_attn_implementation
from moetune.models.load.loading_info import check_loading_info
from moetune.models.load.quant import prepare_quantized_for_training, quantization_config, wants_quantization

logger = logging.getLogger(__name__)


def read_model_type(name: str, trust_remote_code: bool = False) -> str:
    """The ``model_type`` in a local folder's config.json, or in a hub model's config."""
    local = Path(name) / "config.json"
    if local.is_file():
        try:
            return json.loads(local.read_text())["model_type"]
        except (json.JSONDecodeError, KeyError) as err:
            raise UserError(f"{local} has no readable model_type ({err}).") from None
    try:
        return config_values(name)["model_type"]
    except (OSError, ValueError) as err:
        raise UserError(f"model.name {name!r} is neither a folder with a config.json nor a reachable hub model "
                        f"({first_line(err)}). Set model.architecture, or fix the path.") from None


def causal_lm_class(hf_config):
    """The class that builds and loads ``hf_config``'s model: AutoModelForCausalLM, or where it maps no
    class to the config's type (Mistral 4 in transformers 5.25) the causal LM class of the config's own
    modeling module, the one config.json's ``architectures`` names."""
    if type(hf_config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return AutoModelForCausalLM
    modeling = importlib.import_module(type(hf_config).__module__.replace(".configuration_", ".modeling_"))
    names = [*(hf_config.architectures or ()), *(name for name in dir(modeling) if name.endswith("ForCausalLM"))]
    found = next((getattr(modeling, name) for name in names if getattr(getattr(modeling, name, None), "config_class",
                                                                        None) is type(hf_config)), None)
    return found or AutoModelForCausalLM


def model_from_config(hf_config, **kwargs) -> nn.Module:
    """A randomly initialised model of ``hf_config`` (``from_config``), through :func:`causal_lm_class`."""
    cls = causal_lm_class(hf_config)
    if cls is AutoModelForCausalLM:
        return cls.from_config(hf_config, **kwargs)
    kwargs.pop("trust_remote_code", None)  # a class of transformers' own runs no remote code
    return cls._from_config(hf_config, **kwargs)


def load_base_model(config, family: FamilySpec, tokenizer=None, *, seed: int,
                    gradient_checkpointing: bool) -> nn.Module:
    """The family's model from weights (model.name) or from config (model.random_init, drawn with
    ``seed``); a quantised one prepared for training, with ``gradient_checkpointing`` when asked."""
    spec = config.model
    dtype = resolve_dtype(spec.torch_dtype)
    attn = resolve_attn_implementation(spec.attn_implementation, family.attention_kernels)
    kwargs: dict[str, Any] = {"attn_implementation": attn}
    experts = spec.experts_implementation or fastest_experts_implementation()
    if family.fused_experts and not family.experts_take_every_token and experts:
        kwargs["experts_implementation"] = experts
    elif spec.experts_implementation:
        logger.info("model.experts_implementation=%s does not apply: %s experts take no kernel choice",
                    spec.experts_implementation, family.name)
    if spec.random_init:
        hf_config = build_random_init_config(family.random_init_model_type, spec.config_overrides,
                                             vocab_size=len(tokenizer) if tokenizer is not None else None,
                                             special_tokens=_special_token_ids(tokenizer))
        # Seeded and isolated from the global RNG: evaluation must rebuild the same random base the
        # adapter was trained on, whatever ran before.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_from_config(hf_config, dtype=torch.float32 if dtype == "auto" else dtype,
                                                     **kwargs)
    else:
        model = _from_pretrained(spec, family, dtype, kwargs, tokenizer)
        if wants_quantization(spec):
            model = prepare_quantized_for_training(model, gradient_checkpointing)
    log_kernels(model, attn, spec.experts_implementation)
    return model


def read_model_config(spec, family: FamilySpec) -> PreTrainedConfig:
    """The Hugging Face config of ``model.name`` (a folder or a hub id), checked to be of ``family``, with
    ``model.config_overrides`` applied."""
    try:
        hf_config = read_hf_config(spec.name, spec.trust_remote_code, family.config_fixes)
    except (OSError, ValueError) as err:
        raise UserError(f"model.name {spec.name!r} could not be loaded ({first_line(err)}).") from None
    check_model_type(spec, family, hf_config.model_type)
    return apply_overrides(hf_config, spec.config_overrides)


def check_model_type(spec, family: FamilySpec, model_type: str) -> None:
    """``model.architecture`` must name the family of the model ``model.name`` is."""
    if model_type not in family.model_types and model_type not in family.multimodal_types:
        raise ConfigError("model.architecture", f"model.architecture is {family.name!r} but model.name "
                          f"{spec.name!r} is a {model_type!r} model.")


def check_not_quantised_twice(spec, family: FamilySpec, hf_config: PreTrainedConfig) -> None:
    """A checkpoint the family loads in its own quantisation (gpt-oss's MXFP4) takes no 4/8-bit on top."""
    if not wants_quantization(spec) or family.pretrained_kwargs is None:
        return
    if "quantization_config" in family.pretrained_kwargs(hf_config):
        raise UserError(f"model.name {spec.name!r} is already quantised ({family.name}); model.load_in_4bit/"
                        "load_in_8bit cannot quantise it again. Set both to false.")


def _from_pretrained(spec, family: FamilySpec, dtype, kwargs: dict[str, Any], tokenizer) -> nn.Module:
    hf_config = read_model_config(spec, family)
    check_not_quantised_twice(spec, family, hf_config)
    quant = quantization_config(spec, None if dtype == "auto" else dtype)
    family_kwargs = family.pretrained_kwargs(hf_config) if family.pretrained_kwargs else {}
    quant = family_kwargs.pop("quantization_config", quant)
    kwargs = {**kwargs, **family_kwargs}
    try:
        model, info = causal_lm_class(hf_config).from_pretrained(
            spec.name, config=hf_config, dtype=dtype, quantization_config=quant,
            trust_remote_code=spec.trust_remote_code, output_loading_info=True, **kwargs)
    except OSError as err:
        raise UserError(f"model.name {spec.name!r}: the weights could not be read ({first_line(err)}).") from None
    check_loading_info(info, spec.name, text_of_multimodal=hf_config.model_type in family.multimodal_types)
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        logger.info("resizing the embedding from %d to the tokenizer's %d tokens",
                    model.get_input_embeddings().num_embeddings, len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
    return model


def _special_token_ids(tokenizer) -> dict[str, int | None]:
    if tokenizer is None:
        return {}
    return {name: getattr(tokenizer, name, None) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}


def check_pretrained_settings(family: FamilySpec, config) -> None:
    """What a family loaded as is cannot take: the settings that apply to upcycled MPT only."""
    if config.moe.expert_parallel.backend != "native":
        raise ConfigError("moe.expert_parallel.backend", deepspeed_backend_message(family.name))
    if config.moe.upcycling.enabled:
        raise ConfigError("moe.upcycling.enabled", "moe.upcycling.enabled turns a dense MPT model into an MoE; "
                          f"model.name is a {family.name} model, which is already an MoE.")


def pretrained_shape(family: FamilySpec, config, hf_config: PreTrainedConfig) -> tuple[PreTrainedConfig, Traits]:
    """What :func:`build_pretrained` makes of a checkpoint whose config is ``hf_config``: that model as is
    (the ``shape`` of every family without a build of its own)."""
    check_pretrained_settings(family, config)
    return hf_config, Traits()


def build_pretrained(family: FamilySpec, config, tokenizer=None, *, seed: int,
                     gradient_checkpointing: bool) -> tuple[nn.Module, Traits]:
    """The build of a pretrained MoE family: load as is; the training plan freezes the experts."""
    check_pretrained_settings(family, config)
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
