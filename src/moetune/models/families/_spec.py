"""What a model family is: :class:`FamilySpec`, the one description each family module exports, and
:class:`Router`, how one of its model types routes tokens to experts.

A family module (``mixtral.py``, ``deepseek.py``, ...) builds one ``FamilySpec`` named ``SPEC``;
everything moetune knows about that family lives there, and every other module asks the spec
(:func:`moetune.models.families.family_of` gives a built model's). Most Hugging Face MoE models
share one shape (a block with a ``gate`` router and fused ``experts.gate_up_proj`` /
``down_proj``), so most specs are plain data; a family passes its own functions where it differs
(MPT's upcycling, gpt-oss's MXFP4 weights, Llama-4's router output).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from moetune.models.routing.balance import sequence_balance_loss, switch_balance_loss
from moetune.models.routing.capture import read_logits_weights_experts

logger = logging.getLogger("moetune.models.families")


@dataclass(frozen=True)
class Traits:
    """What the training plan must know about one built model, beyond its family's fixed facts.

    ``router_is_new``: the router was just created (upcycling) and must train whatever
    ``moe.freeze_router`` says. ``experts_train_by_default``: the experts are copies of one FFN (an
    upcycled model), so ``moe.expert_training`` defaults to full rather than frozen.
    """

    router_is_new: bool = False
    experts_train_by_default: bool = False


@dataclass(frozen=True)
class Router:
    """How one model type's router chooses experts: what moetune needs to read its choice, keep the
    experts evenly loaded and move its correction bias. Build one with :func:`softmax_router` or
    :func:`sigmoid_router`, which pick the balance loss that fits the scores."""

    scores: Literal["softmax", "sigmoid"]
    """What turns a token's router logits into expert affinities (the balance losses use them)."""
    balance_loss: Callable[..., Any]
    """``balance_loss(routing, scores, batch, token_mask) -> loss``: the loss ``moe.use_auxiliary_loss``
    adds (:mod:`moetune.models.routing.balance`)."""
    transformers_aux_loss: bool = False
    """transformers computes an aux loss for this model type (``out.aux_loss``); ``balance_loss`` then
    is that same Switch loss, so a plain forward's ``out.loss`` agrees with moetune's."""
    top_k_of_logits: bool = False
    """The top-k is taken on the raw logits and the weights are a softmax (or sigmoid) over the k
    chosen (gpt-oss, Granite, Llama-4), rather than the top-k of the affinities over all experts."""
    correction_bias: str | None = None
    """Path, under the MoE block, of the bias added to the affinities to choose experts but not to
    weight them (aux-loss-free balancing), e.g. ``gate.e_score_correction_bias``; None: none."""
    group_limited: bool = False
    """Experts are chosen only within the best ``topk_group`` of ``n_group`` groups."""
    read: Callable[..., tuple[Any, Any, Any]] = read_logits_weights_experts
    """``read(router_module, output) -> (logits, weights, experts)``: the routing in the router's forward output."""

    def describe(self) -> str:
        """The routing rule in words (README)."""
        words = [f"{self.scores} top-k of the logits" if self.top_k_of_logits else f"{self.scores}, top-k"]
        if self.correction_bias:
            words.append(f"correction bias `{self.correction_bias}`")
        if self.group_limited:
            words.append("group-limited")
        return ", ".join(words)


def softmax_router(**facts) -> Router:
    """A softmax router; its balance loss is the Switch loss transformers computes for Mixtral."""
    return Router(scores="softmax", balance_loss=facts.pop("balance_loss", switch_balance_loss), **facts)


def sigmoid_router(**facts) -> Router:
    """A sigmoid router; its balance loss is DeepSeek-V3's sequence-wise one on the normalised sigmoids,
    unless transformers computes its own (``transformers_aux_loss``), which is then kept."""
    default = switch_balance_loss if facts.get("transformers_aux_loss") else sequence_balance_loss
    return Router(scores="sigmoid", balance_loss=facts.pop("balance_loss", default), **facts)


@dataclass(frozen=True)
class FamilySpec:
    """Everything moetune knows about one model family. Field docs say what each fact decides."""

    name: str
    """Registry key and the value of ``model.architecture``; equals the module's name."""
    model_types: tuple[str, ...]
    """config.json ``model_type`` values this family loads (auto-detection reads them)."""
    tiny_configs: Mapping[str, Mapping[str, Any]]
    """Per model_type, Hugging Face config values of a tiny random model (2 layers, hidden 64,
    4 experts) for the tests: ``AutoConfig.for_model(model_type, **values)``."""
    random_init_model_type: str
    """The model_type ``model.random_init`` builds when ``model.architecture`` names this family."""
    router: Router | Callable[[Any], Router]
    """How the family routes: one :class:`Router`, or ``router(hf_config) -> Router`` where the
    model type or a config value decides (see :meth:`router_of`)."""
    multimodal_types: Mapping[str, str] = field(default_factory=dict)
    """config.json ``model_type`` of a multimodal checkpoint -> the text model type it loads as:
    AutoModelForCausalLM takes its language model and leaves the vision tower out (``qwen3_5_moe``)."""
    attention: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """The generic LoRA targets (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, the default
    ``lora.target_modules``) mapped to every Linear of this family that plays that part (MLA's
    ``q_a_proj``, a linear-attention or SSM layer's ``in_proj``), so the default means "all token
    mixing" on every family. A target the mapping lacks is matched by name as is."""
    token_mixers: tuple[str, ...] = ("self_attn",)
    """Children of a decoder layer that mix tokens (attention, linear attention, SSM, convolution): the
    trainable-parameters line counts what trains in them as attention, with the Linears of :attr:`attention`."""
    router_name: str = "gate"
    """Child of each MoE block that holds the router (saved with PEFT ``modules_to_save``)."""
    expert_parameters: tuple[str, ...] = ("gate_up_proj", "down_proj")
    """Parameter (fused layout) or Linear (per-expert layout) names under ``<block>.experts``: what
    ``moe.expert_training`` trains (LoRA goes on the 3-D weights among them, full takes them all)."""
    fused_experts: bool = True
    """Experts are fused 3-D parameters (transformers' ``experts_implementation`` applies, unless
    :attr:`experts_take_every_token`)."""
    experts_take_every_token: bool = False
    """Every token is multiplied by every routed expert, weighted by zero where the router did not choose
    it, in one computation that takes no ``experts_implementation`` (Llama 4's ``bmm``): a token's compute
    goes through all the experts (``moetune plan``), and transformers' experts kernels do not apply."""
    shared_experts: tuple[str, ...] = ()
    """Children of the MoE block, or of the layer that holds it, that every token goes through (shared
    expert and its gate): frozen with the routed experts unless ``moe.train_shared_experts``."""
    dense_layers_keys: tuple[str, ...] = ()
    """Config keys that say how many dense FFN layers come before the first MoE layer, if the family has
    them, the first one a config has counting: their number (``first_k_dense_replace``) or each
    layer's kind (``mlp_layer_types``)."""
    context_key: str = "max_position_embeddings"
    """Config key of the model's context length."""
    packs_by_position_ids: bool = True
    """Samples packed into one row with restarting ``position_ids`` stay apart in this family's forward:
    it takes ``position_ids`` and carries no state (SSM, linear attention, convolution) from one sample
    into the next. False: samples are padded, never packed."""
    packing_kernels: tuple[str, ...] | None = None
    """The attention kernels with which rows packed by restarting ``position_ids`` keep their samples
    apart, where the family narrows transformers' own (``kernels.PACKING_KERNELS``); None: all of those."""
    attention_kernels: tuple[str, ...] | None = None
    """Attention implementations the family's attention supports; None: every one."""
    experts_may_get_no_tokens: bool = False
    """Some expert parameters can be left out of a step's graph (no token routed to them): DDP then
    needs ``find_unused_parameters``."""
    example_config: str | None = None
    """The shipped config that trains a production model of this family (README)."""
    build: Callable[..., tuple[Any, Traits]] | None = None
    """``build(spec, config, tokenizer, *, seed, gradient_checkpointing) -> (model, Traits)``; None loads
    the checkpoint as is. ``seed`` draws any weights the build creates."""
    shape: Callable[..., tuple[Any, Traits]] | None = None
    """``shape(spec, config, hf_config) -> (hf_config, Traits)``: the Hugging Face config of the model ``build``
    makes from a checkpoint whose config is ``hf_config`` (MPT: upcycled), and its Traits, with the checks
    ``build`` makes before reading a weight; validation builds that model on the meta device. A family
    with a build of its own gives it; None: the checkpoint's model as is (``load.pretrained.pretrained_shape``)."""
    config_fixes: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    """``config_fixes(config_dict) -> config_dict``: the family's published config.json values that the
    installed transformers' strict config classes refuse, made valid (with the meaning the modeling code
    gives them) before the config is built; None: config.json is read as is."""
    pretrained_kwargs: Callable[..., dict[str, Any]] | None = None
    """``pretrained_kwargs(hf_config) -> dict``: extra ``from_pretrained`` arguments (MXFP4)."""
    tap_routers: Callable[..., Callable[[], None]] | None = None
    """``tap_routers(spec, model) -> release``: make every router report its routing to
    :func:`moetune.models.routing.capture.record`; None: forward hooks on the router modules, read by
    the router's :attr:`Router.read`."""

    def router_of(self, hf_config) -> Router:
        """The router of a model of this family with config ``hf_config``."""
        return self.router if isinstance(self.router, Router) else self.router(hf_config)

    def context_length(self, hf_config) -> int | None:
        """The most positions ``hf_config`` (a model of this family) allows, when it states them."""
        value = getattr(hf_config, self.context_key, None)
        return value if isinstance(value, int) and value > 0 else None

    def dense_layers(self, hf_config) -> int:
        """How many dense FFN layers come before the first MoE layer of ``hf_config``."""
        value = next((getattr(hf_config, key) for key in self.dense_layers_keys if getattr(hf_config, key, None)
                      is not None), None)
        if isinstance(value, (list, tuple)):
            return next((index for index, kind in enumerate(value) if kind != "dense"), len(value))
        return value if isinstance(value, int) else 0

    def attention_linears(self) -> frozenset[str]:
        """Every Linear name the default attention targets reach (the generic names and their mapping)."""
        return frozenset(("q_proj", "k_proj", "v_proj", "o_proj", *(n for names in self.attention.values() for n in names)))

    def movable_bias(self, hf_config) -> str | None:
        """Path, under the MoE block, of the correction bias ``moe.router_bias_update_rate`` moves: one
        inside the router, which the adapter saves with it; None when the router has none there."""
        bias = self.router_of(hf_config).correction_bias
        return bias if bias is not None and bias.startswith(f"{self.router_name}.") else None


def one_type_family(name: str, model_type: str, tiny_config: Mapping[str, Any], **facts) -> FamilySpec:
    """The spec of a family of one model type (most of them): ``model.random_init`` builds that type,
    and ``tiny_config`` is its tiny test model."""
    return FamilySpec(name=name, model_types=(model_type,), tiny_configs={model_type: tiny_config},
                      random_init_model_type=model_type, **facts)
