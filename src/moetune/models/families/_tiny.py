"""The tiny random model every family is tested on: 2 layers, hidden 64, 4 heads (2 of them for keys
and values), 4 experts with 2 chosen per token, a vocabulary of 128 (bos 1, eos 2) and 128 positions,
under the key names of one model type's config class."""

from __future__ import annotations

from typing import Any

TINY_SHAPE: dict[str, Any] = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                  num_key_value_heads=2, num_experts_per_tok=2, vocab_size=128,
                                  max_position_embeddings=128, bos_token_id=1, eos_token_id=2)


def tiny_config(experts_key: str = "num_experts", **values: Any) -> dict[str, Any]:
    """:data:`TINY_SHAPE` with 4 experts under ``experts_key`` (``num_local_experts``, ``n_routed_experts``,
    ...), updated with ``values`` (the keys and values particular to one model type)."""
    return {**TINY_SHAPE, experts_key: 4, **values}
