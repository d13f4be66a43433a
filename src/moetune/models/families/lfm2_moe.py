"""LFM2-MoE (Liquid AI, ``lfm2_moe``, e.g. LFM2-8B-A1B): short gated convolutions and attention layers,
dense FFNs in the first ``num_dense_layers`` layers, then sigmoid-routed experts (``feed_forward``).

The correction bias (``use_expert_bias``) sits on the MoE block (``feed_forward.expert_bias``) and is
handed to the router (``feed_forward.gate``), so ``moe.router_bias_update_rate`` cannot move it.
The default attention targets take the convolution layers' ``in_proj`` / ``out_proj``; the attention
itself names its output ``out_proj``. transformers returns no aux loss, so the balance loss is
DeepSeek's sequence-wise one on the normalised sigmoids. The causal convolution reads the last tokens
of the previous packed sample, so rows are padded, never packed.
"""

from moetune.models.families._spec import one_type_family, sigmoid_router
from moetune.models.families._tiny import tiny_config

BIASED = sigmoid_router(correction_bias="expert_bias")
PLAIN = sigmoid_router()

SPEC = one_type_family(
    "lfm2_moe",
    "lfm2_moe",
    tiny_config=tiny_config(moe_intermediate_size=32, num_dense_layers=1,
                            layer_types=["conv", "full_attention"]),
    router=lambda hf_config: BIASED if hf_config.use_expert_bias else PLAIN,
    attention={
        "q_proj": ("q_proj", "in_proj"),
        "k_proj": ("k_proj", "in_proj"),
        "v_proj": ("v_proj", "in_proj"),
        "o_proj": ("out_proj",),
    },
    token_mixers=("self_attn", "conv"),
    dense_layers_keys=("num_dense_layers",),
    packs_by_position_ids=False,
)
