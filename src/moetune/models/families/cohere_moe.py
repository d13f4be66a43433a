"""Cohere MoE (``cohere2_moe``): the top-k of the raw logits, weighted by a softmax or by sigmoids over
the k chosen as the config's ``expert_selection_fn`` says; sliding-window and global attention layers.

transformers returns no aux loss, so the balance loss follows the router's kind: the Switch loss for
a softmax, DeepSeek's sequence-wise loss on the normalised sigmoids for a sigmoid.
"""

from moetune.models.families._spec import one_type_family, sigmoid_router, softmax_router
from moetune.models.families._tiny import tiny_config

SOFTMAX = softmax_router(top_k_of_logits=True)
SIGMOID = sigmoid_router(top_k_of_logits=True)

SPEC = one_type_family(
    "cohere_moe",
    "cohere2_moe",
    tiny_config=tiny_config(head_dim=16, sliding_window=16),
    router=lambda hf_config: SIGMOID if hf_config.expert_selection_fn == "sigmoid" else SOFTMAX,
)
