"""DeepSeek MoE and the models built on its MoE: DeepSeek-V2 / V2-Lite (``deepseek_v2``), DeepSeek-V3 /
Kimi-K2 (``deepseek_v3``), DeepSeek-V3.2 (``deepseek_v32``), GLM-4.5 / 4.5-Air (``glm4_moe``),
GLM-4.7-Flash (``glm4_moe_lite``), dots.llm1 (``dots1``), EXAONE MoE (``exaone_moe``) and Solar Open
(``solar_open``).

All have shared experts (``mlp.shared_experts``), and all but Solar Open dense FFNs in their first
layers (``first_k_dense_replace``, or ``mlp_layer_types``). All but V2 route with sigmoid scores plus
a correction bias (``mlp.gate.e_score_correction_bias``) that only affects which experts are chosen,
limited to the best ``topk_group`` of ``n_group`` groups of experts; V2 routes with a softmax
(greedy or group-limited). transformers computes no aux loss for any of them, so the balance loss is
DeepSeek's own sequence-wise one (:func:`moetune.models.routing.balance.sequence_balance_loss`), and
the sigmoid routers can balance without a loss by moving the correction bias
(``moe.router_bias_update_rate``).

Attention: V2, V3, V3.2 and GLM-4.7-Flash use MLA (``q_a_proj``, ``q_b_proj`` or V2-Lite's ``q_proj``,
``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``); the others plain q/k/v/o_proj. The default
targets q/k/v/o_proj mean all of them. V3.2's indexer (``self_attn.indexer``, which picks the tokens
its sparse attention reads) is not a LoRA target.
"""

from moetune.models.families._spec import FamilySpec, sigmoid_router, softmax_router
from moetune.models.families._tiny import tiny_config
from moetune.models.routing.balance import sequence_balance_loss

# Multi-head latent attention (DeepSeek-V2/V3, GLM-4.7-Flash, DeepSeek-V3.2, Mistral 4): the generic
# targets stand for the low-rank projections that replace q/k/v.
MLA_ATTENTION = {
    "q_proj": ("q_proj", "q_a_proj", "q_b_proj"),
    "k_proj": ("k_proj", "kv_a_proj_with_mqa", "kv_b_proj"),
    "v_proj": ("v_proj", "kv_a_proj_with_mqa", "kv_b_proj"),
}
_MLA = tiny_config("n_routed_experts", moe_intermediate_size=32, num_key_value_heads=4, n_shared_experts=1,
                   first_k_dense_replace=1, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
# One group of experts, the V3 shape with the groups left out; deepseek_v3's tiny config keeps two.
_V3_SHAPE = tiny_config("n_routed_experts", moe_intermediate_size=32, head_dim=16, n_shared_experts=1,
                        first_k_dense_replace=1, n_group=1, topk_group=1)

SIGMOID_ROUTER = sigmoid_router(correction_bias="gate.e_score_correction_bias", group_limited=True)


def _router(hf_config):
    # DeepSeek-V2 routes with a softmax (and DeepSeek's own sequence-wise loss), the others with sigmoids.
    if hf_config.model_type == "deepseek_v2":
        return softmax_router(balance_loss=sequence_balance_loss)
    return SIGMOID_ROUTER


SPEC = FamilySpec(
    name="deepseek",
    model_types=("deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe", "glm4_moe_lite", "dots1", "exaone_moe",
                 "solar_open"),
    tiny_configs={
        "deepseek_v2": dict(_MLA, q_lora_rank=None, topk_method="greedy"),
        "deepseek_v3": dict(_MLA, q_lora_rank=16, n_group=2, topk_group=1),
        "deepseek_v32": dict(_MLA, q_lora_rank=16, n_group=1, topk_group=1, mlp_layer_types=["dense", "sparse"],
                             index_n_heads=2, index_head_dim=16, index_topk=4),
        "glm4_moe": _V3_SHAPE,
        "glm4_moe_lite": dict(_MLA, q_lora_rank=16, n_group=1, topk_group=1, mlp_layer_types=["dense", "sparse"]),
        "dots1": _V3_SHAPE,
        "exaone_moe": tiny_config(moe_intermediate_size=32, head_dim=16, num_shared_experts=1, first_k_dense_replace=1,
                                  mlp_layer_types=["dense", "sparse"], n_group=1, topk_group=1),
        "solar_open": tiny_config("n_routed_experts", moe_intermediate_size=32, head_dim=16, n_shared_experts=1,
                                  n_group=1, topk_group=1),
    },
    random_init_model_type="deepseek_v3",
    router=_router,
    attention=MLA_ATTENTION,
    shared_experts=("shared_experts",),
    dense_layers_keys=("mlp_layer_types", "first_k_dense_replace"),
    example_config="configs/deepseek-v2-lite.yaml",
)
