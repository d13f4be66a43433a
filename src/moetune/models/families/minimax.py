"""MiniMax-Text-01 (``minimax``): a hybrid of lightning (linear) attention and softmax attention, with
softmax-routed experts.

Lightning-attention layers project with ``self_attn.qkv_proj`` and gate their output with
``output_gate`` before ``out_proj``; the default attention targets take them as well as the softmax
layers' q/k/v/o_proj. transformers computes the Switch loss. The lightning attention carries a
decaying key-value state from one token to the next, across packed samples too, so rows are padded.
"""

from moetune.models.families._spec import one_type_family, softmax_router
from moetune.models.families._tiny import tiny_config

SPEC = one_type_family(
    "minimax",
    "minimax",
    tiny_config=tiny_config("num_local_experts", head_dim=16, block_size=16,
                            layer_types=["linear_attention", "full_attention"]),
    router=softmax_router(transformers_aux_loss=True),
    attention={
        "q_proj": ("q_proj", "qkv_proj"),
        "k_proj": ("k_proj", "qkv_proj"),
        "v_proj": ("v_proj", "qkv_proj"),
        "o_proj": ("o_proj", "out_proj", "output_gate"),
    },
    packs_by_position_ids=False,
)
