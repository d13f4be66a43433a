"""MiniMax-M2 (``minimax_m2``): sigmoid routing with a correction bias, full attention with q/k norms.

The correction bias sits on the MoE block (``mlp.e_score_correction_bias``) and is handed to the
router (``mlp.gate``) as an argument; the router reports the choice it made with it. Because the bias
lies outside the router, the adapter cannot save it, so ``moe.router_bias_update_rate`` is refused.
transformers computes the Switch loss on its logits, which moetune keeps.
"""

from moetune.models.families._spec import one_type_family, sigmoid_router
from moetune.models.families._tiny import tiny_config

SPEC = one_type_family(
    "minimax_m2",
    "minimax_m2",
    tiny_config=tiny_config("num_local_experts", head_dim=16),
    router=sigmoid_router(transformers_aux_loss=True, correction_bias="e_score_correction_bias"),
)
