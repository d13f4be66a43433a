"""Do the experts specialise? Routed-token shares per sample group, and how much the group tells.

A group is what the sample's source kind says (see :func:`group_of`): a QA sample's ``expert_label``,
a Rust sample's ``kind``. For each group and layer the report holds the share of its routed tokens
(top-k assignments) that each expert receives. One number sums it up: the mutual information
between the group and the chosen expert, per layer, in bits, divided by the entropy of the group.
That ratio is 0 when every group is routed the same way and 1 when the expert alone tells which
group a token came from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from moetune.data.sources import group_by_kind, record_kind


def group_of(record: dict) -> str:
    """The routing group of a dataset record, as its source kind says: ``label:<expert_label>`` for QA,
    ``kind:<kind>`` for Rust and for a record of a kind that is not registered."""
    kind = record_kind(record)
    return kind.routing_group(record) if kind is not None else group_by_kind(record)


def mutual_information_bits(joint_counts: torch.Tensor) -> float:
    """I(group; expert) in bits from a (groups, experts) table of counts."""
    total = joint_counts.sum()
    if total <= 0:
        return 0.0
    joint = joint_counts.double() / total
    p_group = joint.sum(1, keepdim=True)
    p_expert = joint.sum(0, keepdim=True)
    nonzero = joint > 0
    ratio = joint[nonzero] / (p_group * p_expert).expand_as(joint)[nonzero]
    return max(0.0, float((joint[nonzero] * torch.log2(ratio)).sum()))


def entropy_bits(counts: torch.Tensor) -> float:
    """Shannon entropy in bits of a vector of counts."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts.double() / total
    p = p[p > 0]
    return float(-(p * torch.log2(p)).sum())


@dataclass(frozen=True)
class RoutingReport:
    """Per group: (layers x experts) shares and its token count; per layer: I(group; expert)."""

    groups: tuple[str, ...]
    shares: dict[str, list[list[float]]]
    tokens: dict[str, int]
    mutual_information_bits: list[float]
    group_entropy_bits: float
    specialisation: float | None  # mean over layers of MI / H(group); None with fewer than two groups

    def as_dict(self) -> dict:
        return {"groups": list(self.groups), "tokens": self.tokens, "shares": self.shares,
                "mutual_information_bits": self.mutual_information_bits,
                "group_entropy_bits": self.group_entropy_bits, "specialisation": self.specialisation}


def build_routing_report(counts: dict[str, torch.Tensor], top_k: int) -> RoutingReport:
    """The report from ``{group: (layers, experts) assignment counts}`` (``top_k`` assignments per token)."""
    groups = tuple(sorted(g for g, c in counts.items() if c.sum() > 0))
    stacked = torch.stack([counts[g].double() for g in groups])  # (groups, layers, experts)
    shares = stacked / stacked.sum(-1, keepdim=True).clamp_min(1e-12)
    per_layer_mi = [mutual_information_bits(stacked[:, layer]) for layer in range(stacked.shape[1])]
    group_entropy = entropy_bits(stacked[:, 0].sum(-1))
    specialisation = None
    if len(groups) > 1 and group_entropy > 0:
        specialisation = sum(mi / group_entropy for mi in per_layer_mi) / len(per_layer_mi)
    return RoutingReport(
        groups=groups,
        shares={g: [[round(v, 6) for v in row] for row in shares[i].tolist()] for i, g in enumerate(groups)},
        tokens={g: int(round(float(stacked[i, 0].sum()) / top_k)) for i, g in enumerate(groups)},
        mutual_information_bits=per_layer_mi,
        group_entropy_bits=group_entropy,
        specialisation=specialisation,
    )


def save_routing_heatmap(report: RoutingReport, path: str | Path, title: str) -> Path:
    """One heatmap per layer (groups x experts, colour = share of the group's tokens) in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = len(report.mutual_information_bits)
    experts = len(next(iter(report.shares.values()))[0])
    columns = min(layers, 4)
    rows = math.ceil(layers / columns)
    # One colour scale for every layer; with top-k routing no share exceeds 1/k, so 1.0 would waste it.
    vmax = max(max(max(row) for row in layers_of_group) for layers_of_group in report.shares.values()) or 1.0
    fig, axes = plt.subplots(rows, columns, squeeze=False, dpi=100, layout="constrained",
                             figsize=(2.5 + columns * (1.0 + 0.45 * experts), 1.2 + rows * (1.0 + 0.35 * len(report.groups))))
    for layer in range(rows * columns):
        ax = axes[layer // columns][layer % columns]
        if layer >= layers:
            ax.axis("off")
            continue
        grid = [report.shares[g][layer] for g in report.groups]
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        if experts * len(report.groups) <= 64:  # small grids carry their numbers
            for row, shares in enumerate(grid):
                for expert, share in enumerate(shares):
                    ax.text(expert, row, f"{share:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if share > 0.6 * vmax else "white")
        ax.set_title(f"layer {layer}: MI {report.mutual_information_bits[layer]:.3f} bits", fontsize=8)
        ax.set_xticks(range(experts))
        ax.set_xlabel("expert", fontsize=8)
        ax.set_yticks(range(len(report.groups)))
        ax.set_yticklabels(report.groups if layer % columns == 0 else [""] * len(report.groups), fontsize=7)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="share of the group's routed tokens")
    fig.suptitle(title, fontsize=10)
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
