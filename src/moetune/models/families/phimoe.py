"""Phi-3.5-MoE (Microsoft, ``phimoe``): top-2 of 16 experts chosen by SparseMixer.

In training SparseMixer samples from jittered logits, so the choice is random; in evaluation it takes
the two largest logits. Either way the router (``mlp.router``) reports what it chose, which is what
expert usage and the balance loss read. transformers computes the Switch loss for it.
"""

from moetune.models.families._spec import one_type_family, softmax_router
from moetune.models.families._tiny import tiny_config

SPEC = one_type_family(
    "phimoe",
    "phimoe",
    tiny_config=tiny_config("num_local_experts"),
    router=softmax_router(transformers_aux_loss=True),
    router_name="router",
)
