"""Gemma 4 (Google, 26B-A4B): the text model, ``gemma4_text``.

Each layer keeps its dense MLP (``mlp``) and adds an MoE beside it, not under it: the decoder layer
itself holds the ``router`` and the fused ``experts``, so the layer is the MoE block. The router
normalises and scales the hidden state, then returns ``(probabilities, weights, experts)`` (a softmax
over every expert, not logits): moetune takes the log of the probabilities as the logits, which has
the same softmax. transformers returns no aux loss, so the balance loss is the Switch loss moetune
computes for softmax routers. The dense MLP is neither an expert nor a shared expert: it trains
with everything else when ``lora.enabled`` is false.
"""

from moetune.models.families._spec import one_type_family, softmax_router
from moetune.models.families._tiny import tiny_config
from moetune.models.routing.capture import read_probabilities

SPEC = one_type_family(
    "gemma4",
    "gemma4_text",
    tiny_config=tiny_config(enable_moe_block=True, top_k_experts=2, moe_intermediate_size=32,
                            head_dim=16, global_head_dim=16, sliding_window=16,
                            layer_types=["sliding_attention", "full_attention"],
                            hidden_size_per_layer_input=0, vocab_size_per_layer_input=128),
    router=softmax_router(read=read_probabilities),
    router_name="router",
)
