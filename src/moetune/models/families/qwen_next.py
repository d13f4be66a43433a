"""Qwen3-Next (``qwen3_next``, 80B-A3B) and Qwen3.5-MoE (``qwen3_5_moe_text``, e.g. Qwen3.5-35B-A3B: the
hub checkpoints are the multimodal ``qwen3_5_moe``, whose language model AutoModelForCausalLM loads
exactly, leaving the vision tower out): hybrids of Gated DeltaNet linear attention
(``linear_attn``) and gated full attention (``self_attn``), with softmax-routed experts, a shared
expert and its sigmoid gate in every layer.

The default attention targets take the linear-attention projections too: ``in_proj_qkvz`` /
``in_proj_ba`` (Qwen3-Next) or ``in_proj_qkv`` / ``in_proj_z`` / ``in_proj_b`` / ``in_proj_a``
(Qwen3.5), and ``out_proj``. transformers computes the Switch loss. Gated DeltaNet keeps a recurrent
state (and a causal convolution) that would run from one packed sample into the next, so rows are
padded, never packed.
"""

from moetune.models.families._spec import FamilySpec, softmax_router
from moetune.models.families._tiny import tiny_config

_HYBRID = tiny_config(moe_intermediate_size=32, shared_expert_intermediate_size=64, head_dim=16,
                      linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                      layer_types=["linear_attention", "full_attention"])

SPEC = FamilySpec(
    name="qwen_next",
    model_types=("qwen3_next", "qwen3_5_moe_text"),
    multimodal_types={"qwen3_5_moe": "qwen3_5_moe_text"},
    tiny_configs={"qwen3_next": _HYBRID, "qwen3_5_moe_text": _HYBRID},
    random_init_model_type="qwen3_next",
    router=softmax_router(transformers_aux_loss=True),
    attention={
        "q_proj": ("q_proj", "in_proj_qkvz", "in_proj_qkv", "in_proj_ba", "in_proj_b", "in_proj_a"),
        "k_proj": ("k_proj", "in_proj_qkvz", "in_proj_qkv"),
        "v_proj": ("v_proj", "in_proj_qkvz", "in_proj_qkv", "in_proj_z"),
        "o_proj": ("o_proj", "out_proj"),
    },
    token_mixers=("self_attn", "linear_attn"),
    shared_experts=("shared_expert", "shared_expert_gate"),
    packs_by_position_ids=False,
)
