"""What a model family is: :class:`FamilySpec`, the one description each family module exports.

A family module (``mixtral.py``, ``deepseek.py``, ...) builds one ``FamilySpec`` named ``SPEC``;
everything moetune knows about that family lives there. The helpers below are the behaviour most
Hugging Face MoE families share (load as is, routers that return ``(logits, weights, experts)``);
a family passes its own functions where it differs (MPT's upcycling, gpt-oss's MXFP4 weights).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

logger = logging.getLogger("moetune.models.families")

BalanceLoss = Literal["switch", "sequence"]


@dataclass(frozen=True)
class Traits:
    """What the training plan must know about one built model, beyond its family's fixed facts.

    ``router_is_new``: the router was just created (upcycling) and must train whatever
    ``moe.freeze_router`` says. ``experts_must_train``: the experts are copies of one FFN (an
    upcycled model), so ``moe.expert_training`` defaults to full; otherwise it defaults to frozen.
    """

    router_is_new: bool = False
    experts_must_train: bool = False


@dataclass(frozen=True)
class FamilySpec:
    """Everything moetune knows about one model family. Field docs say what each fact is used for."""

    name: str
    """Registry key and the value of ``model.architecture``; equals the module's name."""
    model_types: tuple[str, ...]
    """config.json ``model_type`` values this family loads (auto-detection reads them)."""
    summary: str
    """One line for the README and for errors: what the family is and how it trains by default."""
    tiny_configs: Mapping[str, Mapping[str, Any]]
    """Per model_type, Hugging Face config values of a tiny random model (2 layers, hidden 64,
    4 experts) for tests: ``AutoConfig.for_model(model_type, **values)``."""
    random_init_model_type: str
    """The model_type ``model.random_init`` builds when ``model.architecture`` names this family."""
    attention: Mapping[str, tuple[str, ...]]
    """The generic LoRA targets (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, the default
    ``lora.target_modules``) mapped to this family's attention Linear names, so the default means
    "all attention projections" on every family. A generic name the model itself has is used as is."""
    router_name: str = "gate"
    """Child of each MoE block that holds the router (PEFT ``modules_to_save`` name)."""
    routing: str = "softmax over all experts, top-k, renormalised"
    """The routing rule, in words (README)."""
    expert_parameters: tuple[str, ...] = ("gate_up_proj", "down_proj")
    """Parameter (fused layout) or Linear (per-expert layout) names under ``<block>.experts``: what
    ``moe.expert_training`` trains (LoRA goes on the 3-D weights among them, full takes them all)."""
    expert_layout: str = "fused 3-D (E, 2I, H) / (E, H, I)"
    """How the experts are stored, in words (README)."""
    fused_experts: bool = True
    """Experts are fused 3-D parameters (transformers' ``experts_implementation`` applies)."""
    shared_experts: tuple[str, ...] = ()
    """Children of the MoE block that every token goes through (shared expert and its gate)."""
    balance_loss: BalanceLoss | None = "switch"
    """The family's load-balancing loss: ``switch`` (Switch/Mixtral, pooled over layers, what
    transformers computes), ``sequence`` (DeepSeek's per-sequence balance loss, summed over layers)."""
    sigmoid_model_types: tuple[str, ...] = ()
    """Model types whose router scores are sigmoids (DeepSeek-V3, GLM-4.5), not a softmax."""
    correction_bias: str | None = None
    """Buffer of the router that biases expert choice only (aux-loss-free balancing), if any."""
    context_key: str = "max_position_embeddings"
    """Config key of the model's context length."""
    accepts_position_ids: bool = True
    """The forward takes ``position_ids``, so samples can be packed into one row."""
    packing_kernels: tuple[str, ...] | None = None
    """The attention kernels with which rows packed by restarting ``position_ids`` keep their samples
    apart, where the family narrows transformers' own (``kernels.PACKING_KERNELS``); None: all of those."""
    attention_kernels: tuple[str, ...] | None = None
    """Attention implementations the family's attention supports; None: every one."""
    experts_may_get_no_tokens: bool = False
    """Some expert parameters can be left out of a step's graph (no token routed to them): DDP then
    needs ``find_unused_parameters``."""
    build: Callable[..., tuple[Any, Traits]] | None = None
    """``build(spec, config, tokenizer, *, seed, gradient_checkpointing) -> (model, Traits)``; None loads
    the checkpoint as is. ``seed`` draws any weights the build creates."""
    shape: Callable[..., tuple[Any, Traits]] | None = None
    """``shape(spec, config, hf_config) -> (hf_config, Traits)``: the Hugging Face config of the model ``build``
    makes from a checkpoint whose config is ``hf_config`` (MPT: upcycled), and its Traits, with the checks
    ``build`` makes before reading a weight; validation builds that model on the meta device. A family
    with a build of its own gives it; None: the checkpoint's model as is (``load.pretrained.pretrained_shape``)."""
    pretrained_kwargs: Callable[..., dict[str, Any]] | None = None
    """``pretrained_kwargs(hf_config) -> dict``: extra ``from_pretrained`` arguments (MXFP4)."""
    tap_routers: Callable[..., Callable[[], None]] | None = None
    """``tap_routers(spec, model, record) -> release``: make every router report its routing to
    ``record(layer, logits, weights, experts)``; None: forward hooks on the router modules."""
    notes: tuple[str, ...] = field(default_factory=tuple)
    """Further facts for the README (e.g. attention sinks stay frozen)."""

    def context_length(self, hf_config) -> int | None:
        """The most positions ``hf_config`` (a model of this family) allows, when it states them."""
        value = getattr(hf_config, self.context_key, None)
        return value if isinstance(value, int) and value > 0 else None

    def uses_sigmoid(self, model_type: str) -> bool:
        """Whether ``model_type``'s router scores are sigmoids."""
        return model_type in self.sigmoid_model_types

    def has_correction_bias(self, model_type: str) -> bool:
        """Whether ``model_type``'s router has a correction bias that aux-loss-free balancing can move."""
        return self.correction_bias is not None and self.uses_sigmoid(model_type)
