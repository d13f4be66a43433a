"""The config checked against the model it names, before a weight is read: one pass that ``moetune validate``
and ``moetune train`` both run (:func:`check_config_against_model`), so a config validate passes is not
refused minutes later, once the weights are loaded, for a reason its model's config.json already gave.

The model is built on the meta device (:mod:`moetune.models.load.meta`): every module and parameter
shape, no storage, seconds even at 100B+ parameters. The family's ``shape`` turns it into the model the
build makes (an upcycled MPT when ``moe.upcycling.enabled``), and the training plan itself then runs on
it, so LoRA targets, expert LoRA, shared experts and the ESFT selection are decided by the code that
decides them in the run, with the same errors. The checks the run makes later against the built model
follow: the context length, the router correction bias, DeepSpeed's MoE blocks, the experts
``moe.router_supervision.label_to_expert`` names, and the packages the config needs.

The model's config comes from ``model.random_init`` (built from model.config_overrides) or a local folder
holding a config.json. A hub id's config is read only with ``read_hub`` (train, which downloads it
anyway); validate stays offline and says it checked the config only.

Not checked here, because they need the weights, the launch or the state of the disk: weights that do
not match their config, the accelerate / DeepSpeed launch (process count, ZeRO stage, CPU offload),
resuming from a checkpoint, the built data file. Nothing heavy is imported until a model is checked,
so validating a config that names a hub model stays quick.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelCheck:
    """What :func:`check_config_against_model` checked the config against, or why it checked no model."""

    family: str | None = None
    model_type: str | None = None
    source: str = ""
    """Where the model's config came from: model.random_init, a local folder, or a hub id."""
    moe_layers: int = 0
    experts: int = 0
    context: int | None = None
    trainable: int = 0
    total: int = 0
    random_init: bool = False
    skipped: str | None = None
    """Why no model was checked (its config.json is not local); None when one was."""
    weight_bytes: int = 0
    """The weights' bytes as the run loads them (model.torch_dtype; "auto": the config's dtype)."""
    adapter: bool = False
    """Whether a PEFT adapter trains (whose switching off gives preference training its reference)."""

    def summary(self) -> str:
        """One line: what was checked against what, or why the model was not."""
        if self.skipped is not None:
            return self.skipped
        moe = f"{self.moe_layers} MoE layers of {self.experts} experts" if self.moe_layers else "no MoE layer"
        context = f", context {self.context:,} positions" if self.context else ""
        # A random model's embeddings take the size of the tokenizer the run trains or loads.
        vocabulary = " at the config's vocab_size" if self.random_init else ""
        return (f"checked against the model: {self.family} family, {self.model_type!r} from {self.source}: {moe}"
                f"{context}; {self.trainable:,} of {self.total:,} parameters train{vocabulary} "
                f"({100 * self.trainable / max(self.total, 1):.2f}%)")


def model_config_is_local(model_section) -> bool:
    """Whether the model's config can be had without the network: built from model.config_overrides
    (``model.random_init``) or read from a folder's config.json."""
    return model_section.random_init or (Path(model_section.name) / "config.json").is_file()


def check_config_against_model(config, *, read_hub: bool = False) -> ModelCheck:
    """Every check of ``config`` against its model that needs no weight; raises the ConfigError / UserError
    the run would raise. ``read_hub``: read a hub model's config too (else that model is not checked)."""
    check_packages(config)
    spec = config.model
    if not read_hub and not model_config_is_local(spec):
        return ModelCheck(skipped=f"config only: model.name {spec.name!r} is not a local folder with a config.json, "
                                  "so train checks the config against the model (LoRA targets, experts, context "
                                  "length) once it has read the model's config.")
    from moetune.models.layout import EXPERTS_NAME, count_experts, find_moe_blocks
    from moetune.models.load.factory import check_context_length, check_router_bias_update, resolve_family
    from moetune.models.load.meta import build_on_meta, local_model_config
    from moetune.models.load.pretrained import (
        check_not_quantised_twice,
        pretrained_shape,
        read_model_config,
    )
    from moetune.models.loss.reference import has_adapter
    from moetune.models.routing.supervision import check_label_experts
    from moetune.models.trainable.counts import count_parameters
    from moetune.models.trainable.plan import apply_training_plan

    # In the order the run checks: family, router bias, the model's config, the family's build, the
    # context, the training plan, DeepSpeed's blocks, then what the first step checks.
    family = resolve_family(spec)
    check_router_bias_update(family, config)
    # A folder's or a hub model's config is read as the build reads it; random_init's is built as the build builds it.
    hf_config = local_model_config(spec, family) if spec.random_init else read_model_config(spec, family)
    check_not_quantised_twice(spec, family, hf_config)
    hf_config, traits = (family.shape or pretrained_shape)(family, config, hf_config)
    model = build_on_meta(hf_config, trust_remote_code=spec.trust_remote_code)
    check_context_length(model, spec.max_seq_length, family.context_key)
    blocks = find_moe_blocks(model, family.router_name)  # before the plan, whose wrappers hold more than experts
    experts = count_experts(getattr(blocks[0].module, EXPERTS_NAME)) if blocks else 0
    with quiet_logs():
        model = apply_training_plan(model, config, traits, family)
    if config.moe.expert_parallel.backend == "deepspeed":
        from moetune.models.families.mpt.deepspeed_moe import check_deepspeed_conversion

        check_deepspeed_conversion(model)
    if config.moe.router_supervision.weight > 0 and blocks:
        check_label_experts(config.moe.router_supervision.label_to_expert, experts)
    trainable, total = count_parameters(model)
    source = "model.random_init" if spec.random_init else spec.name
    return ModelCheck(family=family.name, model_type=hf_config.model_type, source=source, moe_layers=len(blocks),
                      experts=experts, context=family.context_length(hf_config), trainable=trainable, total=total,
                      random_init=spec.random_init, weight_bytes=total * _loaded_element_size(spec, hf_config),
                      adapter=has_adapter(model))


def _loaded_element_size(model_section, hf_config) -> int:
    """Bytes per weight as the run loads them: model.torch_dtype, or with "auto" the config's dtype (float32 if none)."""
    import torch

    from moetune.models.load.dtypes import resolve_dtype

    dtype = resolve_dtype(model_section.torch_dtype)
    if dtype == "auto":
        dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return torch.empty((), dtype=dtype).element_size()


def check_packages(config) -> None:
    """The optional packages the config needs: bitsandbytes for 4/8-bit weights, deepspeed for its MoE backend."""
    if config.model.load_in_4bit or config.model.load_in_8bit:
        from moetune.models.load.quant import require_bitsandbytes

        require_bitsandbytes(config.model)
    if config.moe.expert_parallel.backend == "deepspeed":
        from moetune.models.families.mpt.deepspeed_moe import require_deepspeed

        require_deepspeed()


@contextlib.contextmanager
def quiet_logs(name: str = "moetune.models"):
    """Logger ``name`` says only warnings inside the ``with``: the training plan logs its trainable-parameter
    lines for a run, and the same lines from a model without weights would read as a run's."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
