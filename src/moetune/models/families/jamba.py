"""Jamba (AI21, ``jamba``): a hybrid of Mamba and attention layers, with softmax-routed experts in every
``expert_layer_period``-th layer (``feed_forward`` with a ``router``).

The default attention targets take the Mamba layers' ``in_proj`` / ``x_proj`` / ``out_proj`` as well
as the attention's q/k/v/o_proj; not ``dt_proj``, whose weight the Mamba forward multiplies directly,
past any adapter. transformers computes the Switch loss. The Mamba
scan carries its state from one packed sample into the next, so rows are padded, never packed.
"""

from moetune.models.families._spec import one_type_family, softmax_router
from moetune.models.families._tiny import tiny_config

SPEC = one_type_family(
    "jamba",
    "jamba",
    tiny_config=tiny_config("num_experts", attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1,
                            expert_layer_offset=0, mamba_d_state=8, mamba_expand=2, use_mamba_kernels=False),
    router=softmax_router(transformers_aux_loss=True),
    attention={
        "q_proj": ("q_proj", "in_proj", "x_proj"),
        "k_proj": ("k_proj", "in_proj"),
        "v_proj": ("v_proj", "in_proj"),
        "o_proj": ("o_proj", "out_proj"),
    },
    token_mixers=("self_attn", "mamba"),
    router_name="router",
    packs_by_position_ids=False,
)
