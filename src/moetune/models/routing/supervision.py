"""Label-guided routing: a cross-entropy that teaches every MoE layer's router the experts of a sample's label.

Upcycled experts start as exact copies, so the LM loss alone gives the router no reason to send
one kind of sample anywhere in particular. With ``moe.router_supervision.weight`` each token of a
labelled sample adds ``-log sum_{e in experts(label)} p_e``, ``p`` being the router's softmax over
its logits: the probability the router gives the label's experts, as one class. Tokens of
unlabelled samples (label id ``NO_LABEL``, padding too) add nothing.

Label ids come from the data layer (:mod:`moetune.data.expert_labels`): indices into the
vocabulary of labels. ``auto`` numbers the training data's labels most frequent first and sends label i
to expert ``i mod num_experts``; an explicit map's labels are numbered in sorted order, which is how
its experts are looked up here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from moetune.data.expert_labels import NO_LABEL
from moetune.errors import ConfigError

__all__ = ["NO_LABEL", "check_label_experts", "label_targets", "router_supervision_loss"]


def label_targets(label_to_expert: str | Mapping[str, Sequence[int]], label_ids: torch.Tensor,
                  num_experts: int) -> torch.Tensor:
    """(tokens, num_experts) bool: the experts each token's label goes to (rows of unlabelled tokens are all False)."""
    ids = label_ids.reshape(-1).long()
    labelled = ids != NO_LABEL
    if isinstance(label_to_expert, Mapping):
        check_label_experts(label_to_expert, num_experts)
        table = torch.zeros(len(label_to_expert), num_experts, dtype=torch.bool)
        for row, label in enumerate(sorted(label_to_expert)):
            table[row, list(label_to_expert[label])] = True
        targets = table.to(ids.device)[ids.clamp_min(0)]
    else:
        targets = torch.nn.functional.one_hot(ids.clamp_min(0) % num_experts, num_experts).bool()
    return targets & labelled[:, None]


def check_label_experts(label_to_expert: str | Mapping[str, Sequence[int]], num_experts: int) -> None:
    """Every expert an explicit ``moe.router_supervision.label_to_expert`` names must exist in the model's MoE layers."""
    if not isinstance(label_to_expert, Mapping):
        return
    for label in sorted(label_to_expert):
        highest = max(label_to_expert[label])
        if highest >= num_experts:
            key = f"moe.router_supervision.label_to_expert.{label}"
            raise ConfigError(key, f"{key} names expert {highest}, but the model's MoE layers have {num_experts} experts "
                              f"(0 to {num_experts - 1}).")


def router_supervision_loss(router_logits: Sequence[torch.Tensor], label_ids: torch.Tensor,
                            label_to_expert: str | Mapping[str, Sequence[int]]) -> torch.Tensor:
    """Mean over the labelled tokens of ``-log P(label's experts)``, averaged over the MoE layers.

    ``router_logits``: one (tokens, num_experts) tensor per layer, tokens in the order of
    ``label_ids.reshape(-1)``. Zero (still differentiable) when no token is labelled.
    """
    targets = label_targets(label_to_expert, label_ids, router_logits[0].shape[-1]).to(router_logits[0].device)
    labelled = targets.any(-1)
    count = labelled.sum().clamp_min(1)
    # Unlabelled rows look at every expert (log P = 0, finite gradients) and are then masked out:
    # a row of -inf alone would give NaN gradients even where its value is dropped.
    targets = targets | ~labelled[:, None]
    per_layer = []
    for logits in router_logits:
        if logits.shape[0] != targets.shape[0]:
            raise RuntimeError(f"router logits cover {logits.shape[0]} tokens but the batch's expert_label_ids "
                               f"{targets.shape[0]}; the router tap and the batch disagree on the token layout")
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        # log of the total probability on the label's experts
        on_label = log_probs.masked_fill(~targets, float("-inf")).logsumexp(-1)
        per_layer.append(-(on_label.masked_fill(~labelled, 0.0)).sum() / count)
    return torch.stack(per_layer).mean()
