"""Llama 4 (Meta, Scout 17B-16E / Maverick 17B-128E): the text model, ``llama4_text``.

The MoE block is ``feed_forward`` (in every ``interleave_moe_layer_step``-th layer; the others have a
dense ``feed_forward``) with a ``router``, a ``shared_expert`` every token goes through, and fused
experts stored transposed: ``gate_up_proj`` (E, H, 2I), ``down_proj`` (E, I, H). The router returns
``(scores, logits)``: the sigmoid of the top-k logits, scattered into an (tokens, E) tensor, and the
logits; every expert runs on every token, weighted by its score (zero when not chosen). transformers
returns no aux loss, so the balance loss is DeepSeek's sequence-wise one on the normalised sigmoids.
A multimodal Llama 4 checkpoint (``llama4``, what the hub holds) is loaded through its text model's config,
saved as ``llama4_text``. Its published config.json says ``attn_temperature_tuning: 4``, which the
modeling code reads as a truth value and transformers 5.x's strict config refuses (it wants a bool):
:func:`fix_config` makes it ``true``.
"""

from typing import Any

from moetune.models.families._spec import one_type_family, sigmoid_router
from moetune.models.families._tiny import tiny_config
from moetune.models.routing.capture import read_scores_and_logits


def fix_config(values: dict[str, Any]) -> dict[str, Any]:
    """``attn_temperature_tuning`` as the bool transformers 5.x requires (the modeling code tests its truth,
    so ``4`` meant true), in the text config and in a multimodal checkpoint's ``text_config``."""
    def fixed(text: dict[str, Any]) -> dict[str, Any]:
        if "attn_temperature_tuning" not in text:
            return text
        return {**text, "attn_temperature_tuning": bool(text["attn_temperature_tuning"])}

    if isinstance(values.get("text_config"), dict):
        return {**values, "text_config": fixed(values["text_config"])}
    return fixed(values)


SPEC = one_type_family(
    "llama4",
    "llama4_text",
    tiny_config=tiny_config("num_local_experts", intermediate_size=32, intermediate_size_mlp=128,
                            head_dim=16, interleave_moe_layer_step=1),
    router=sigmoid_router(top_k_of_logits=True, read=read_scores_and_logits),
    router_name="router",
    shared_experts=("shared_expert",),
    experts_take_every_token=True,
    multimodal_types={"llama4": "llama4_text"},
    config_fixes=fix_config,
)
