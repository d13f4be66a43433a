"""Llama 4 (Meta, Scout 17B-16E / Maverick 17B-128E): the text model, ``llama4_text``.

The MoE block is ``feed_forward`` (in every ``interleave_moe_layer_step``-th layer; the others have a
dense ``feed_forward``) with a ``router``, a ``shared_expert`` every token goes through, and fused
experts stored transposed: ``gate_up_proj`` (E, H, 2I), ``down_proj`` (E, I, H). The router returns
``(scores, logits)``: the sigmoid of the top-k logits, scattered into an (tokens, E) tensor, and the
logits; every expert runs on every token, weighted by its score (zero when not chosen). transformers
returns no aux loss, so the balance loss is DeepSeek's sequence-wise one on the normalised sigmoids.
A multimodal Llama 4 checkpoint (``llama4``) is loaded through its text model's config, saved as
``llama4_text``.
"""

from moetune.models.families._spec import one_type_family, sigmoid_router
from moetune.models.families._tiny import tiny_config
from moetune.models.routing.capture import read_scores_and_logits

SPEC = one_type_family(
    "llama4",
    "llama4_text",
    tiny_config=tiny_config("num_local_experts", intermediate_size=32, intermediate_size_mlp=128,
                            head_dim=16, interleave_moe_layer_step=1),
    router=sigmoid_router(top_k_of_logits=True, read=read_scores_and_logits),
    router_name="router",
    shared_experts=("shared_expert",),
)
