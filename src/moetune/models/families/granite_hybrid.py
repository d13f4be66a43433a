"""Granite 4.0 hybrid MoE (IBM, ``granitemoehybrid``): Mamba-2 and attention layers, each followed by
Granite's MoE (``block_sparse_moe``, top-k of the logits then a softmax over the k) and a shared MLP
beside it (``shared_mlp``).

The default attention targets take the Mamba layers' ``in_proj`` as well as the attention's
q/k/v/o_proj; not their ``out_proj``, whose weight the fused Mamba-2 kernel reads directly, past any
adapter (PEFT refuses it for Mamba models). transformers computes the Switch loss. The Mamba scan carries its state
from one packed sample into the next, so rows are padded, never packed.
"""

from moetune.models.families._spec import one_type_family, softmax_router
from moetune.models.families._tiny import tiny_config

SPEC = one_type_family(
    "granite_hybrid",
    "granitemoehybrid",
    tiny_config=tiny_config("num_local_experts", layer_types=["mamba", "attention"],
                            shared_intermediate_size=64, mamba_n_heads=4, mamba_d_state=16,
                            mamba_d_head=32, mamba_chunk_size=16),
    router=softmax_router(transformers_aux_loss=True, top_k_of_logits=True),
    attention={
        "q_proj": ("q_proj", "in_proj"),
        "k_proj": ("k_proj", "in_proj"),
        "v_proj": ("v_proj", "in_proj"),
    },
    token_mixers=("self_attn", "mamba"),
    router_name="router",
    shared_experts=("shared_mlp",),
    packs_by_position_ids=False,
)
