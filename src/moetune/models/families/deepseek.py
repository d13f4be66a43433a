"""DeepSeek MoE: DeepSeek-V2 / V2-Lite (``deepseek_v2``), DeepSeek-V3 / Kimi-K2 (``deepseek_v3``) and
GLM-4.5 / 4.5-Air (``glm4_moe``), which shares V3's MoE.

All three have shared experts (``mlp.shared_experts``) and dense FFNs in the first
``first_k_dense_replace`` layers. V3 and GLM route with sigmoid scores plus a correction bias
(``mlp.gate.e_score_correction_bias``) that only affects which experts are chosen, limited to the
best ``topk_group`` groups of experts; V2 routes with a softmax (greedy or group-limited).
transformers computes no aux loss for any of them, so the balance loss is DeepSeek's own
sequence-wise one (:func:`moetune.models.routing.balance.sequence_balance_loss`), and V3/GLM can balance
without a loss by moving the correction bias (``moe.router_bias_update_rate``).

Attention: V2/V3 use MLA (``q_a_proj``, ``q_b_proj`` or V2-Lite's ``q_proj``, ``kv_a_proj_with_mqa``,
``kv_b_proj``, ``o_proj``); GLM uses plain q/k/v/o_proj. The default targets q/k/v/o_proj mean all of
them.
"""

from moetune.models.families._spec import FamilySpec

_MLA = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
            n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=16, vocab_size=128, max_position_embeddings=128)

SPEC = FamilySpec(
    name="deepseek",
    model_types=("deepseek_v2", "deepseek_v3", "glm4_moe"),
    summary="DeepSeek-V2/V2-Lite, DeepSeek-V3/Kimi-K2, GLM-4.5: LoRA on all attention projections (MLA or q/k/v/o), "
            "routed and shared experts frozen, DeepSeek's sequence-wise balance loss; optional aux-loss-free bias "
            "update (V3, GLM).",
    tiny_configs={
        "deepseek_v2": dict(_MLA, q_lora_rank=None, topk_method="greedy"),
        "deepseek_v3": dict(_MLA, q_lora_rank=16, n_group=2, topk_group=1),
        "glm4_moe": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_routed_experts=4,
                         num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
                         topk_group=1, vocab_size=128, max_position_embeddings=128),
    },
    random_init_model_type="deepseek_v3",
    attention={
        "q_proj": ("q_a_proj", "q_b_proj"),
        "k_proj": ("kv_a_proj_with_mqa", "kv_b_proj"),
        "v_proj": ("kv_a_proj_with_mqa", "kv_b_proj"),
    },
    routing="V3/GLM: sigmoid scores + correction bias, best topk_group groups, top-k, renormalised, scaled; "
            "V2: softmax, greedy or group-limited top-k, scaled",
    shared_experts=("shared_experts",),
    balance_loss="sequence",
    sigmoid_model_types=("deepseek_v3", "glm4_moe"),
    correction_bias="e_score_correction_bias",
    notes=("the dense FFNs of the first first_k_dense_replace layers are not experts: frozen under LoRA unless "
           "targeted, trained when lora.enabled is false",),
)
