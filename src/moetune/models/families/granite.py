"""IBM Granite MoE: Granite 3.0 MoE (``granitemoe``) and the variant with a shared MLP
(``granitemoeshared``).

The MoE block is ``block_sparse_moe`` with a ``router`` that takes the top-k of the raw logits, then a
softmax over the k chosen; ``granitemoeshared`` adds ``shared_mlp`` (run by every token) beside it.
transformers computes the Switch loss for both.
"""

from moetune.models.families._spec import FamilySpec, softmax_router
from moetune.models.families._tiny import tiny_config

SPEC = FamilySpec(
    name="granite",
    model_types=("granitemoe", "granitemoeshared"),
    tiny_configs={
        "granitemoe": tiny_config("num_local_experts"),
        "granitemoeshared": tiny_config("num_local_experts", shared_intermediate_size=64),
    },
    random_init_model_type="granitemoe",
    router=softmax_router(transformers_aux_loss=True, top_k_of_logits=True),
    router_name="router",
    shared_experts=("shared_mlp",),
)
