"""Hunyuan-A13B (Tencent, ``hunyuan_v1_moe``): softmax top-k routing, a shared MLP beside the experts,
q/k layer norms in attention.

The router is ``mlp.gate``, whose Linear is ``gate.wg`` (so its weight is ``gate.wg.weight``); the
shared expert is ``mlp.shared_mlp``. transformers returns no aux loss for it, so the balance loss is
the Switch loss moetune computes for softmax routers.
"""

from moetune.models.families._spec import one_type_family, softmax_router
from moetune.models.families._tiny import tiny_config

SPEC = one_type_family(
    "hunyuan",
    "hunyuan_v1_moe",
    tiny_config=tiny_config(moe_topk=2, head_dim=16),
    router=softmax_router(),
    shared_experts=("shared_mlp",),
)
