"""Qwen-MoE (Alibaba): Qwen2-MoE (``qwen2_moe``) and Qwen3-MoE (``qwen3_moe``, e.g. Qwen3-30B-A3B, 235B-A22B).

Both route with a softmax over all experts and top-k. Qwen2-MoE adds one shared expert beside the
routed ones, scaled per token by a sigmoid gate (``mlp.shared_expert`` and ``mlp.shared_expert_gate``);
both are frozen with the routed experts unless ``moe.shared_experts.train``. Qwen3-MoE has none.
"""

from moetune.models.families._spec import FamilySpec, softmax_router
from moetune.models.families._tiny import tiny_config

SPEC = FamilySpec(
    name="qwen_moe",
    model_types=("qwen2_moe", "qwen3_moe"),
    tiny_configs={
        "qwen3_moe": tiny_config(moe_intermediate_size=32, head_dim=16),
        "qwen2_moe": tiny_config(moe_intermediate_size=32, shared_expert_intermediate_size=64),
    },
    random_init_model_type="qwen3_moe",
    router=softmax_router(transformers_aux_loss=True),
    shared_experts=("shared_expert", "shared_expert_gate"),
    example_config="configs/qwen3-30b-a3b.yaml",
)
