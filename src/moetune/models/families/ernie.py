"""ERNIE 4.5 MoE (Baidu, ``ernie4_5_moe``): softmax routing with a correction bias, shared experts,
and dense FFNs before ``moe_layer_start_index``.

The router (``mlp.gate``) adds ``gate.moe_statics.e_score_correction_bias`` to the softmax to choose
experts (and not to weight them). That bias is a Parameter, not a buffer: it stays frozen even when the
router trains, and aux-loss-free balancing (``moe.router_bias_update_rate``) moves it. transformers
computes the Switch loss for it.
"""

from moetune.models.families._spec import one_type_family, softmax_router
from moetune.models.families._tiny import tiny_config

SPEC = one_type_family(
    "ernie",
    "ernie4_5_moe",
    tiny_config=tiny_config("moe_num_experts", moe_k=2, moe_intermediate_size=32,
                            moe_num_shared_experts=1, moe_layer_start_index=1),
    router=softmax_router(transformers_aux_loss=True, correction_bias="gate.moe_statics.e_score_correction_bias"),
    shared_experts=("shared_experts",),
    dense_layers_keys=("moe_layer_start_index",),
)
