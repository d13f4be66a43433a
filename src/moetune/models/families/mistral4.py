"""Mistral 4 (Mistral AI, ``mistral4``): DeepSeek-V3's shape with a softmax router, multi-head latent
attention, shared experts and dense FFNs in the first ``first_k_dense_replace`` layers.

The router (``mlp.gate``) takes a softmax over every expert and the top-k within the best
``topk_group`` of ``n_group`` groups, with no correction bias. transformers returns no aux loss, so
the balance loss is the Switch loss moetune computes for softmax routers. AutoModelForCausalLM maps no
class to ``mistral4`` in transformers 5.25: moetune loads it with the class config.json names,
``Mistral4ForCausalLM`` (:func:`moetune.models.load.pretrained.causal_lm_class`).
"""

from moetune.models.families._spec import one_type_family, softmax_router
from moetune.models.families._tiny import tiny_config
from moetune.models.families.deepseek import MLA_ATTENTION

SPEC = one_type_family(
    "mistral4",
    "mistral4",
    tiny_config=tiny_config("n_routed_experts", moe_intermediate_size=32, num_key_value_heads=4,
                            n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16,
                            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, pad_token_id=0),
    router=softmax_router(group_limited=True),
    attention=MLA_ATTENTION,
    shared_experts=("shared_experts",),
    dense_layers_keys=("first_k_dense_replace",),
)
