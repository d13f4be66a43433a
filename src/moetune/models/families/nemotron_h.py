"""Nemotron-H / Nemotron 3 (NVIDIA, ``nemotron_h``): one mixer per layer, Mamba-2, attention, a dense
MLP or an MoE, in the order ``layers_block_type`` gives.

The MoE mixer routes with sigmoids, a correction bias (``mixer.gate.e_score_correction_bias``) and
groups, as DeepSeek-V3 does, and its experts have no gate projection: fused ``up_proj`` / ``down_proj``
with a squared-ReLU between, beside ``shared_experts``. Every layer's mixer is called ``mixer``, so
the trainable-parameters line counts attention by the Linears the default targets reach: q/k/v/o_proj
and the Mamba layers' ``in_proj`` (not their ``out_proj``, whose weight the fused Mamba-2 kernel reads
directly, past any adapter; PEFT refuses it). transformers returns no aux loss, so the balance loss
is DeepSeek's sequence-wise one. The Mamba scan carries its state from one packed sample into the
next, so rows are padded, never packed.
"""

from moetune.models.families._spec import one_type_family, sigmoid_router
from moetune.models.families._tiny import tiny_config

SPEC = one_type_family(
    "nemotron_h",
    "nemotron_h",
    tiny_config=tiny_config("n_routed_experts", layers_block_type=["mamba", "moe", "attention"],
                            moe_intermediate_size=32, moe_shared_expert_intermediate_size=32,
                            n_shared_experts=1, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16,
                            n_groups=1, chunk_size=16),
    router=sigmoid_router(correction_bias="gate.e_score_correction_bias", group_limited=True),
    attention={
        "q_proj": ("q_proj", "in_proj"),
        "k_proj": ("k_proj", "in_proj"),
        "v_proj": ("v_proj", "in_proj"),
    },
    token_mixers=(),
    expert_parameters=("up_proj", "down_proj"),
    shared_experts=("shared_experts",),
    packs_by_position_ids=False,
)
