"""gpt-oss (OpenAI, gpt-oss-20b / 120b): a router with a bias, top-k on the logits then a softmax over
the chosen ones, experts with biases stored transposed, attention with learned sinks.

Hub checkpoints ship the experts in MXFP4. MXFP4 has no training kernels, so they are loaded
dequantised to bf16 (transformers' ``Mxfp4Config(dequantize=True)``), and that is logged. The
attention sinks (``self_attn.sinks``) are not Linears and stay frozen; transformers' sdpa kernel has
no sinks, so ``sdpa`` runs as ``eager`` (or pick flash_attention_2 / flex_attention). Its forward
builds the causal and sliding-window masks without the ``position_ids``, so eager and flex attention
would let packed samples attend to each other: rows are packed only for the flash kernels, which
split a flattened row at the restarting positions themselves; otherwise samples are padded. The
experts are stored transposed, (E, H, 2I) and (E, I, H), with biases; PEFT reads the layout from
the experts module's ``is_transposed``.
"""

from __future__ import annotations

from typing import Any

from moetune.models.families._spec import logger, one_type_family, softmax_router
from moetune.models.families._tiny import tiny_config


def mxfp4_dequantised(hf_config) -> dict[str, Any]:
    """``quantization_config=Mxfp4Config(dequantize=True)`` for a checkpoint stored in MXFP4."""
    quant = getattr(hf_config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if str(getattr(method, "value", method)) != "mxfp4":
        return {}
    from transformers import Mxfp4Config

    logger.warning("gpt-oss: the checkpoint's experts are MXFP4, which cannot be trained; loading them "
                   "dequantised to bf16 (about 4x their MXFP4 memory)")
    return {"quantization_config": Mxfp4Config(dequantize=True)}


SPEC = one_type_family(
    "gpt_oss",
    "gpt_oss",
    tiny_config=tiny_config("num_local_experts", intermediate_size=64, head_dim=16, sliding_window=16,
                            layer_types=["sliding_attention", "full_attention"],
                            rope_parameters={"rope_type": "default", "rope_theta": 150000.0}),
    router=softmax_router(transformers_aux_loss=True, top_k_of_logits=True),
    router_name="router",
    expert_parameters=("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"),
    attention_kernels=("eager", "flash_attention_2", "flex_attention"),
    packing_kernels=("flash_attention_2", "flash_attention_3"),
    example_config="configs/gpt-oss-20b.yaml",
    pretrained_kwargs=mxfp4_dequantised,
)
