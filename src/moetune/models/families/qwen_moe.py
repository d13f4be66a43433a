"""Qwen-MoE (Alibaba): Qwen2-MoE (``qwen2_moe``) and Qwen3-MoE (``qwen3_moe``, e.g. Qwen3-30B-A3B, 235B-A22B).

Both route with a softmax over all experts and top-k. Qwen2-MoE adds one shared expert beside the
routed ones, scaled per token by a sigmoid gate (``mlp.shared_expert`` and ``mlp.shared_expert_gate``);
both are frozen with the routed experts unless ``moe.shared_experts.train``. Qwen3-MoE has none.
"""

from moetune.models.families._spec import FamilySpec

SPEC = FamilySpec(
    name="qwen_moe",
    model_types=("qwen2_moe", "qwen3_moe"),
    summary="Qwen2-MoE and Qwen3-MoE (30B-A3B, 235B-A22B): LoRA on q/k/v/o_proj, routed and shared experts frozen, "
            "Switch load-balancing loss (as transformers).",
    tiny_configs={
        "qwen3_moe": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                          num_experts_per_tok=2, vocab_size=128, max_position_embeddings=128),
        "qwen2_moe": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                          shared_expert_intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                          num_experts=4, num_experts_per_tok=2, vocab_size=128, max_position_embeddings=128),
    },
    random_init_model_type="qwen3_moe",
    attention={},
    routing="softmax over all experts, top-k (renormalised when norm_topk_prob)",
    shared_experts=("shared_expert", "shared_expert_gate"),
)
