"""Mixtral (Mistral AI): top-2 of 8 softmax-routed experts, no shared expert.

transformers 5.x: ``layers.N.mlp.gate`` (a router whose parameter is ``gate.weight``) and fused
``mlp.experts.gate_up_proj`` / ``down_proj``. Hub checkpoints in the older per-expert layout
(``block_sparse_moe.experts.N.w1/w2/w3``) are fused at load by transformers.
"""

from moetune.models.families._spec import FamilySpec

SPEC = FamilySpec(
    name="mixtral",
    model_types=("mixtral",),
    summary="Mixtral-8x7B / 8x22B: LoRA on q/k/v/o_proj, experts frozen, Switch load-balancing loss (as transformers).",
    tiny_configs={
        "mixtral": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=128,
                        max_position_embeddings=128),
    },
    random_init_model_type="mixtral",
    attention={},
)
