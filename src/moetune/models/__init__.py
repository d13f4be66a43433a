"""Models: build a ready-to-train MoE model from config, its losses, and MPT sparse upcycling.

Importing this package registers the ``mpt_moe`` model type with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained`` loads upcycled checkpoints afterwards.
"""

from moetune.models.factory import ARCHITECTURES, build_base_model, build_model, enable_gradient_checkpointing
from moetune.models.layout import find_moe_blocks, freeze_experts, moe_shape
from moetune.models.losses import LossParts, compute_losses, expert_token_counts, load_balancing_loss, router_z_loss
from moetune.models.mpt_moe import MoeFeedForward, MptMoeConfig, MptMoeForCausalLM
from moetune.models.upcycle import upcycle_checkpoint, upcycle_mpt

__all__ = [
    "ARCHITECTURES", "LossParts", "MoeFeedForward", "MptMoeConfig", "MptMoeForCausalLM", "build_base_model", "build_model",
    "compute_losses", "enable_gradient_checkpointing", "expert_token_counts", "find_moe_blocks", "freeze_experts",
    "load_balancing_loss", "moe_shape", "router_z_loss", "upcycle_checkpoint", "upcycle_mpt",
]
