"""AFMoE (Arcee Trinity, ``afmoe``): sigmoid routing with a correction bias, shared experts, dense FFNs
in the first ``num_dense_layers`` layers, and gated attention (``self_attn.gate_proj``).

The router is ``mlp.router`` (its Linear ``router.gate``); the correction bias is a Parameter on the
MoE block (``mlp.expert_bias``), handed to the router, kept frozen, and, lying outside the router,
not movable by ``moe.router_bias_update_rate``. transformers returns no aux loss, so the balance loss
is DeepSeek's sequence-wise one on the normalised sigmoids. The attention's output gate shares its
name with the MLPs' ``gate_proj``, so the default targets leave it out; name it in
``lora.target_modules`` as ``self_attn.gate_proj`` to adapt it. Its forward builds the attention
masks without the ``position_ids``, so, as for gpt-oss, rows are packed only for the flash kernels.
"""

from moetune.models.families._spec import one_type_family, sigmoid_router
from moetune.models.families._tiny import tiny_config

SPEC = one_type_family(
    "afmoe",
    "afmoe",
    tiny_config=tiny_config(moe_intermediate_size=32, head_dim=16, num_shared_experts=1,
                            num_dense_layers=1),
    router=sigmoid_router(correction_bias="expert_bias"),
    router_name="router",
    shared_experts=("shared_experts",),
    dense_layers_keys=("num_dense_layers",),
    packing_kernels=("flash_attention_2", "flash_attention_3"),
)
