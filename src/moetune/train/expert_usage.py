"""Expert usage: how the routed tokens spread over experts, per layer, and how balanced that is.

The trainer accumulates (layers, experts) top-k assignment counts on the device between log steps
(``moetune.models.routing.capture.expert_token_counts``) and sums them across processes only when it logs,
so counting costs no host sync per step. This module turns those counts into figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerBalance:
    """Balance figures of one layer's expert shares."""

    layer: int
    shares: tuple[float, ...]
    entropy: float  # normalised to [0, 1]: 1 = perfectly even
    cv: float  # coefficient of variation of the shares: 0 = perfectly even
    min_share: float
    max_share: float


def summarize_usage(counts: torch.Tensor) -> list[LayerBalance]:
    """Shares and balance figures per layer from (num_layers, num_experts) counts."""
    counts = counts.double().cpu()
    num_experts = counts.shape[-1]
    totals = counts.sum(-1, keepdim=True).clamp_min(1e-12)
    shares = counts / totals
    out = []
    for layer, row in enumerate(shares):
        entropy = -(row * row.clamp_min(1e-12).log()).sum().item() / math.log(num_experts)
        cv = (row.std(unbiased=False) / row.mean()).item()
        out.append(LayerBalance(layer, tuple(round(v, 4) for v in row.tolist()), entropy, cv,
                                row.min().item(), row.max().item()))
    return out


def usage_warnings(balance: list[LayerBalance], starving_share: float, dominant_share: float) -> list[str]:
    """Human warnings for layers where an expert starves or one expert takes most tokens.

    ``starving_share`` is a fraction of the fair share 1/E; ``dominant_share`` a fraction of all tokens.
    """
    warnings = []
    for layer in balance:
        fair = 1.0 / len(layer.shares)
        shares = "[" + ", ".join(f"{s:.2f}" for s in layer.shares) + "]"
        starving = [e for e, s in enumerate(layer.shares) if s < starving_share * fair]
        if layer.max_share > dominant_share:
            top = max(range(len(layer.shares)), key=layer.shares.__getitem__)
            warnings.append(f"Expert utilization layer {layer.layer}: {shares} (expert {top} takes "
                            f"{layer.max_share:.0%} of routed tokens)")
        elif starving:
            warnings.append(f"Expert utilization layer {layer.layer}: {shares} (starving: expert(s) "
                            f"{', '.join(map(str, starving))} under {starving_share:.0%} of a fair share)")
    return warnings


def usage_scalars(balance: list[LayerBalance]) -> dict[str, float]:
    """Flat scalars for trackers: per-layer shares and balance figures, plus means over layers."""
    scalars: dict[str, float] = {}
    for layer in balance:
        for expert, share in enumerate(layer.shares):
            scalars[f"expert_usage/layer_{layer.layer}/expert_{expert}"] = share
        scalars[f"expert_balance/layer_{layer.layer}/entropy"] = layer.entropy
        scalars[f"expert_balance/layer_{layer.layer}/cv"] = layer.cv
    if balance:
        scalars["expert_balance/mean_entropy"] = sum(b.entropy for b in balance) / len(balance)
        scalars["expert_balance/min_share"] = min(b.min_share for b in balance)
        scalars["expert_balance/max_share"] = max(b.max_share for b in balance)
    return scalars


def usage_heatmap(balance: list[LayerBalance], title: str = "expert share per layer"):
    """An RGB (H, W, 3) uint8 image of the layer x expert share matrix, for TensorBoard."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.array([b.shares for b in balance])
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * grid.shape[1], 1.0 + 0.35 * grid.shape[0]), dpi=80)
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(grid.max(), 1e-6))
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb
