"""Parameter counts of a planned model: total, active per token under the two conventions publishers use,
and what trains, split by part (:func:`moetune.models.trainable.counts.trainable_parts`, the split a run logs).

Active per token: every parameter but the routed experts a token is not sent to, i.e. each MoE block's
routed experts count top_k / num_experts of their parameters (shared experts, attention, routers, norms
and dense FFNs count whole). Publishers disagree on the embedding:

* ``all``: every parameter a token touches, the input embedding matrix included (Mistral's 12.9B for
  Mixtral-8x7B, Qwen's 3.3B for Qwen3-30B-A3B);
* ``without input embedding``: the embedding matrix left out, since a token only reads one of its rows,
  while the output projection (lm_head), a full matmul per token, counts (OpenAI's 3.6B for gpt-oss-20b,
  DeepSeek's 2.4B for DeepSeek-V2-Lite). With tied embeddings the matrix is the lm_head and counts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import nn

from moetune.models.layout import EXPERTS_NAME, find_moe_blocks
from moetune.models.trainable.counts import trainable_parts


@dataclass(frozen=True)
class RoutedExperts:
    """One MoE block's routed experts: how many, how many a token goes to, and their parameters."""

    path: str
    num_experts: int
    top_k: int
    parameters: int

    @property
    def inactive(self) -> float:
        """Parameters of this block's experts that one token does not use."""
        return self.parameters * (1 - self.top_k / self.num_experts)


@dataclass(frozen=True)
class ParameterCounts:
    """The counts ``moetune plan`` reports. ``trainable`` by part: attention, router, experts, shared
    experts, other (LoRA factors count under the part they adapt; the router copies PEFT saves count)."""

    total: int
    input_embedding: int
    blocks: tuple[RoutedExperts, ...]
    trainable: dict[str, int] = field(default_factory=dict)

    @property
    def active(self) -> int:
        """Active per token, every parameter a token touches (embedding matrix included)."""
        return round(self.total - sum(block.inactive for block in self.blocks))

    @property
    def active_without_input_embedding(self) -> int:
        """Active per token without the input embedding matrix (gpt-oss's and DeepSeek's convention)."""
        return self.active - self.input_embedding

    @property
    def trainable_total(self) -> int:
        return sum(self.trainable.values())


def count_base(base: nn.Module, family, top_k: int) -> ParameterCounts:
    """Counts of ``base``, the model before the training plan adds adapters and saved copies (nothing
    trains yet). ``top_k``: experts per token (:func:`experts_per_token`)."""
    blocks = tuple(_routed_experts(block, top_k) for block in find_moe_blocks(base, family.router_name))
    embedding = base.get_input_embeddings()
    output = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    tied = output is not None and output.weight is embedding.weight
    return ParameterCounts(total=sum(p.numel() for p in base.parameters()),
                           input_embedding=0 if tied else embedding.weight.numel(), blocks=blocks)


def with_trainable(counts: ParameterCounts, model: nn.Module, family) -> ParameterCounts:
    """``counts`` with what trains in ``model`` (after the training plan), by part."""
    parts = trainable_parts(model, find_moe_blocks(model, family.router_name), family)
    return dataclasses.replace(counts, trainable=parts)


def experts_per_token(hf_config, default: int = 1) -> int:
    """The routed experts each token goes to, from a model config (``num_experts_per_tok`` in every family)."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    for key in ("num_experts_per_tok", "experts_per_token", "moe_topk", "top_k"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def _routed_experts(block, top_k: int) -> RoutedExperts:
    experts = getattr(block.module, EXPERTS_NAME)
    if isinstance(experts, nn.ModuleList):
        count = len(experts)
    else:  # fused: every 3-D parameter is (E, ...)
        count = next((p.shape[0] for p in experts.parameters() if p.dim() == 3), None) or getattr(experts, "num_experts", 1)
    return RoutedExperts(path=block.experts_path, num_experts=count, top_k=min(top_k, count),
                         parameters=sum(p.numel() for p in experts.parameters()))
