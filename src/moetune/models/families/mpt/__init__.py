"""MPT (MosaicML): dense ``mpt``, and ``mpt_moe``, the model sparse upcycling makes of it
(:mod:`moetune.models.families.mpt.modeling`, :mod:`moetune.models.families.mpt.upcycle`).

Attention is one fused ``attn.Wqkv`` and ``attn.out_proj`` (ALiBi, one eager kernel, no
position_ids, so rows are padded, not packed). An upcycled model's experts start as copies of one
FFN, so they must train (``moe.expert_training``); a router created by upcycling always trains.
Every expert runs on every step, on an empty batch when no token chose it, so DDP needs no
``find_unused_parameters``.
"""

from __future__ import annotations

import torch

from moetune.models.families._spec import FamilySpec, Traits, logger, softmax_router


def build_mpt(spec: FamilySpec, config, tokenizer=None, *, seed: int, gradient_checkpointing: bool):
    """Dense MPT, an already upcycled ``mpt_moe``, or one upcycled now when ``moe.upcycling.enabled``
    (the new routers and expert noise drawn with ``seed``)."""
    from moetune.models.families.mpt.upcycle import upcycle_mpt
    from moetune.models.load.pretrained import load_base_model, whole_weights

    model = load_base_model(config, spec, tokenizer, seed=seed, gradient_checkpointing=gradient_checkpointing)
    _, traits = shape_mpt(spec, config, model.config)
    if traits.router_is_new:
        # Seeded, so evaluation rebuilds exactly the base the adapter was trained on.
        with whole_weights(model):
            model = upcycle_mpt(model, config.moe, generator=torch.Generator().manual_seed(seed))
    elif config.moe.upcycling.enabled:
        logger.info("model.name is already upcycled (mpt_moe); moe.upcycling.enabled has nothing left to do")
    return model, traits


def shape_mpt(spec: FamilySpec, config, hf_config):
    """The config and Traits of the model :func:`build_mpt` makes from a checkpoint whose config is ``hf_config``:
    the upcycled one when ``moe.upcycling.enabled`` finds a dense MPT, else that model as is."""
    upcycled = hf_config.model_type == "mpt_moe"
    if config.moe.upcycling.enabled and not upcycled:
        from moetune.models.families.mpt.upcycle import upcycled_config

        return upcycled_config(hf_config, config.moe), Traits(router_is_new=True, experts_train_by_default=True)
    return hf_config, Traits(experts_train_by_default=upcycled)


def tap_moe_blocks(spec: FamilySpec, model):
    """MPT-MoE blocks (native and DeepSpeed) report their router logits into ``router_logits_sink``;
    the chosen experts follow the block's rule (softmax, top-k, renormalised)."""
    from moetune.models.routing.capture import record

    blocks = model.moe_blocks() if hasattr(model, "moe_blocks") else []
    top_k = getattr(model.config, "num_experts_per_tok", 0)
    for layer, block in enumerate(blocks):
        block.router_logits_sink = _Sink(layer, top_k, record)

    def release() -> None:
        for block in blocks:
            block.router_logits_sink = None

    return release


class _Sink(list):
    """A ``router_logits_sink`` that reports each logits tensor as the layer's routing."""

    def __init__(self, layer: int, top_k: int, record):
        super().__init__()
        self.layer, self.top_k, self.record = layer, top_k, record

    def append(self, logits: torch.Tensor) -> None:
        # Without autograd: gradient checkpointing re-runs the block with no sink, and must save
        # exactly the tensors the first pass saved. The losses differentiate through ``logits``.
        with torch.no_grad():
            weights, experts = torch.topk(torch.softmax(logits.float(), dim=-1), self.top_k, dim=-1)
        self.record(self.layer, logits, weights / weights.sum(dim=-1, keepdim=True), experts)


SPEC = FamilySpec(
    name="mpt",
    model_types=("mpt", "mpt_moe"),
    tiny_configs={
        "mpt": dict(n_layers=2, d_model=64, n_heads=4, vocab_size=128, max_seq_len=128),
        "mpt_moe": dict(n_layers=2, d_model=64, n_heads=4, vocab_size=128, max_seq_len=128, num_local_experts=4,
                        num_experts_per_tok=2),
    },
    random_init_model_type="mpt",
    router=softmax_router(transformers_aux_loss=True),
    attention={"q_proj": ("Wqkv",), "k_proj": ("Wqkv",), "v_proj": ("Wqkv",), "o_proj": ("out_proj",)},
    token_mixers=("attn",),
    router_name="router",
    expert_parameters=("up_proj", "down_proj"),
    fused_experts=False,
    context_key="max_seq_len",
    packs_by_position_ids=False,
    attention_kernels=("eager",),
    example_config="configs/mpt7b_moe.yaml",
    build=build_mpt,
    shape=shape_mpt,
    tap_routers=tap_moe_blocks,
)
