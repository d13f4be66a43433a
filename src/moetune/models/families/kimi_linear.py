"""Kimi Linear (Moonshot AI, ``kimi_linear``, 48B-A3B): Kimi Delta Attention (KDA) linear-attention
layers and MLA full-attention layers, with DeepSeek-V3's MoE (sigmoid routing, correction bias
``mlp.gate.e_score_correction_bias``, shared experts, dense FFNs where ``mlp_layer_types`` says).

KDA layers reuse the names ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj``, so the default targets
take them with the MLA layers' ``kv_a_proj_with_mqa`` / ``kv_b_proj``; KDA's small gate projections
(``b_proj``, ``f_a_proj`` / ``f_b_proj``, ``g_a_proj`` / ``g_b_proj``) are left out unless named in
``lora.target_modules``. transformers returns no aux loss, so the balance loss is DeepSeek's
sequence-wise one. KDA carries a recurrent state from one packed sample into the next, so rows are
padded, never packed.
"""

from moetune.models.families._spec import one_type_family, sigmoid_router
from moetune.models.families._tiny import tiny_config

SPEC = one_type_family(
    "kimi_linear",
    "kimi_linear",
    tiny_config=tiny_config(moe_intermediate_size=32, num_key_value_heads=4, n_shared_experts=1,
                            layer_types=["linear_attention", "full_attention"],
                            mlp_layer_types=["dense", "sparse"], linear_head_dim=16, linear_num_heads=4,
                            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                            pad_token_id=0),
    router=sigmoid_router(correction_bias="gate.e_score_correction_bias", group_limited=True),
    attention={
        "k_proj": ("k_proj", "kv_a_proj_with_mqa", "kv_b_proj"),
        "v_proj": ("v_proj", "kv_a_proj_with_mqa", "kv_b_proj"),
    },
    shared_experts=("shared_experts",),
    dense_layers_keys=("mlp_layer_types",),
    packs_by_position_ids=False,
)
