"""Mixtral (Mistral AI): top-2 of 8 softmax-routed experts, no shared expert.

transformers 5.x: ``layers.N.mlp.gate`` (a router whose parameter is ``gate.weight``) and fused
``mlp.experts.gate_up_proj`` / ``down_proj``. Hub checkpoints in the older per-expert layout
(``block_sparse_moe.experts.N.w1/w2/w3``) are fused at load by transformers.
"""

from moetune.models.families._spec import one_type_family, softmax_router
from moetune.models.families._tiny import tiny_config

SPEC = one_type_family(
    "mixtral",
    "mixtral",
    tiny_config=tiny_config("num_local_experts"),
    router=softmax_router(transformers_aux_loss=True),
    example_config="config.yaml",
)
