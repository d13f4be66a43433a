"""`moetune experts`: which experts a task uses, and the selection ESFT trains (Wang et al. 2024).

The frozen model runs over training samples with its routing captured
(:func:`moetune.models.routing.capture.capture_routing`). For MoE layer l and expert i, two scores, each
averaged over the tokens of a sample, then over samples (the paper's definitions):

* average gate score: the combine weight expert i gets (0 where it is not among the token's top-k);
* token selection ratio: 1 / top_k where expert i is among the token's top-k, else 0.

Both are computed overall and per data group (a QA sample's ``expert_label``, a Rust sample's
``kind``: :func:`moetune.eval.routing_report.group_of`). Per layer, the experts are taken from
the highest score down until their cumulative share of the layer's total reaches the threshold
(0.1 for gate, 0.2 for token, as in the paper). The token ratios of a layer sum to 1, and so do
the gate scores of routers whose top-k weights are renormalised; the share makes the threshold
mean the same for the others (OLMoE, DeepSeek-V2's scaled weights). A sample longer than
``model.max_seq_length`` counts once per window, as training sees it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moetune.config.schema import Config
from moetune.data.tokenizer import pad_token_id
from moetune.errors import UserError

METHODS = ("gate", "token")
DEFAULT_THRESHOLDS = {"gate": 0.1, "token": 0.2}


@dataclass
class ExpertScores:
    """Per-sample-averaged (layers, experts) scores, overall and per group, with sample counts."""

    gate: torch.Tensor
    token: torch.Tensor
    samples: int
    per_group: dict[str, dict]  # group -> {"gate": tensor, "token": tensor, "samples": int}
    top_k: int

    def of(self, method: str) -> torch.Tensor:
        return self.gate if method == "gate" else self.token


def sample_scores(layers, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, layers, experts) gate and token scores of each row, averaged over its tokens where
    ``mask`` (rows, seq) is true; ``layers`` are :class:`~moetune.models.routing.capture.LayerRouting`."""
    rows, seq = mask.shape
    counted = mask.reshape(-1, 1).to(torch.float64)
    tokens = mask.sum(1).clamp_min(1).to(torch.float64).reshape(rows, 1)
    gate, token = [], []
    for layer in layers:
        experts = layer.experts.detach().long().reshape(rows * seq, -1)
        weights = layer.weights.detach().to(torch.float64).reshape(rows * seq, -1)
        top_k = experts.shape[-1]
        dense_gate = torch.zeros(rows * seq, layer.num_experts, dtype=torch.float64).scatter_add_(1, experts.cpu(), weights.cpu())
        dense_token = torch.zeros_like(dense_gate).scatter_add_(1, experts.cpu(), torch.full(experts.shape, 1.0 / top_k,
                                                                                              dtype=torch.float64))
        gate.append((dense_gate * counted).reshape(rows, seq, -1).sum(1) / tokens)
        token.append((dense_token * counted).reshape(rows, seq, -1).sum(1) / tokens)
    return torch.stack(gate, 1), torch.stack(token, 1)


@torch.no_grad()
def score_experts(model, tokenizer, records: list[dict], max_seq_length: int, batch_size: int) -> ExpertScores:
    """The ESFT scores of ``model`` over ``records`` (dataset records), overall and per group."""
    from moetune.data.encode import encode_records
    from moetune.data.padding import PaddingCollator
    from moetune.eval.routing_report import group_of
    from moetune.models.families import family_of
    from moetune.models.routing.capture import capture_routing

    model.eval()
    device = next(model.parameters()).device
    family = family_of(model)
    pad_id = pad_token_id(tokenizer)
    collate = PaddingCollator(pad_id)
    special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(group_of(record), []).append(record)
    sums: dict[str, list] = {}
    top_k = 0
    batches = []
    for group, members in sorted(groups.items()):
        encoded = encode_records(members, tokenizer, max_seq_length)
        rows = sorted(({"input_ids": ids, "labels": ids} for ids in encoded["input_ids"]), key=lambda r: len(r["input_ids"]))
        batches += [(group, collate(rows[i:i + batch_size])) for i in range(0, len(rows), batch_size)]
    for group, batch in tqdm(batches, desc="experts: routing", unit="batch", dynamic_ncols=True):
        with capture_routing(model, family) as captured:
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False)
        if not captured.layers:
            raise UserError("The model reports no routing (no MoE layer was found); `moetune experts` needs an MoE model.")
        top_k = captured.layers[0].experts.shape[-1]
        mask = batch["attention_mask"].bool() & ~torch.isin(batch["input_ids"], special_ids)
        gate, token = sample_scores(captured.layers, mask)
        total = sums.setdefault(group, [0.0, 0.0, 0])
        total[0], total[1], total[2] = total[0] + gate.sum(0), total[1] + token.sum(0), total[2] + gate.shape[0]
    if not sums:
        raise UserError("No training sample to score: the training split is empty.")
    per_group = {g: {"gate": s[0] / s[2], "token": s[1] / s[2], "samples": s[2]} for g, s in sorted(sums.items())}
    samples = sum(s[2] for s in sums.values())
    gate = sum(s[0] for s in sums.values()) / samples
    token = sum(s[1] for s in sums.values()) / samples
    return ExpertScores(gate=gate, token=token, samples=samples, per_group=per_group, top_k=top_k)


def select_experts(scores: torch.Tensor, threshold: float) -> list[list[int]]:
    """Per layer (row of ``scores``), the highest-scoring experts until their cumulative share of the
    layer's total reaches ``threshold``; ties go to the lower index. Sorted expert indices per layer."""
    selection = []
    for row in scores.double():
        total = float(row.sum())
        order = sorted(range(len(row)), key=lambda i: (-float(row[i]), i))
        chosen, cumulative = [], 0.0
        for index in order:
            if total <= 0 or cumulative >= threshold - 1e-9:
                break
            chosen.append(index)
            cumulative += float(row[index]) / total
        selection.append(sorted(chosen))
    return selection


def expert_selection_report(scores: ExpertScores, method: str, threshold: float, layer_paths: list[str]) -> dict:
    """The experts.json object: the selection (overall and per group), every score, and a summary."""
    selected = select_experts(scores.of(method), threshold)
    experts = scores.gate.shape[1]

    def table(t: torch.Tensor) -> list[list[float]]:
        return [[round(float(v), 6) for v in row] for row in t]

    return {
        "method": method,
        "threshold": threshold,
        "samples": scores.samples,
        "top_k": scores.top_k,
        "num_experts": experts,
        "moe_blocks": layer_paths,
        "selected": selected,
        "summary": {"experts_per_layer": [len(layer) for layer in selected],
                    "selected": sum(len(layer) for layer in selected), "of": len(selected) * experts},
        "scores": {"gate": table(scores.gate), "token": table(scores.token)},
        "per_group": {g: {"samples": s["samples"], "selected": select_experts(s[method], threshold),
                          "scores": {"gate": table(s["gate"]), "token": table(s["token"])}}
                      for g, s in scores.per_group.items()},
    }


def save_expert_heatmap(report: dict, path: str | Path) -> Path:
    """A layer x expert heatmap of the chosen method's scores; selected experts are outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    grid = report["scores"][report["method"]]
    layers, experts = len(grid), report["num_experts"]
    fig, ax = plt.subplots(dpi=100, layout="constrained", figsize=(2.5 + 0.45 * experts, 1.5 + 0.4 * layers))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0)
    for layer, chosen in enumerate(report["selected"]):
        for expert in chosen:
            ax.add_patch(Rectangle((expert - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    ax.set_xticks(range(experts))
    ax.set_yticks(range(layers))
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    name = "average gate score" if report["method"] == "gate" else "token selection ratio"
    fig.colorbar(image, ax=ax, label=name)
    ax.set_title(f"{name}; outlined: selected (threshold {report['threshold']:g}, "
                 f"{report['summary']['selected']} of {report['summary']['of']})", fontsize=8)
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def run_expert_selection(config: Config, adapter_path: str | None = None, method: str = "gate",
                         threshold: float | None = None, max_samples: int | None = None,
                         output: str = "experts.json") -> int:
    """`moetune experts`: score the experts on training samples, write experts.json and its PNG."""
    from moetune.data.split import load_splits
    from moetune.eval.compare_models import choose_samples
    from moetune.models.trainable.esft import expert_blocks

    if method not in METHODS:
        raise UserError(f"--method must be one of {list(METHODS)}, got {method!r}.")
    threshold = DEFAULT_THRESHOLDS[method] if threshold is None else threshold
    if not 0 < threshold <= 1:
        raise UserError(f"--threshold must be in (0, 1], got {threshold}.")
    if max_samples is not None and max_samples < 1:
        raise UserError(f"--max-samples must be a positive integer, got {max_samples}.")
    out = Path(output)
    if out.suffix != ".json":
        raise UserError(f"--output {output} must name a .json file (the heatmap goes beside it as .png).")
    if out.is_dir():
        raise UserError(f"--output {output} is a directory; name a .json file.")
    train, _ = load_splits(config)
    samples = choose_samples(train, max_samples, config.training.seed)
    model, tokenizer = _load_model(config, adapter_path, train)
    _say(f"experts: scoring {len(samples)} of {len(train)} training samples ({method}, threshold {threshold:g})")
    scores = score_experts(model, tokenizer, samples, config.model.max_seq_length,
                           config.training.per_device_eval_batch_size)
    report = expert_selection_report(scores, method, threshold, [b.path for b in expert_blocks(model)])
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    partial.replace(out)
    heatmap = save_expert_heatmap(report, out.with_suffix(".png"))
    summary = report["summary"]
    print(f"experts: {summary['selected']} of {summary['of']} experts selected; per MoE layer: "
          f"{' '.join(str(n) for n in summary['experts_per_layer'])}")
    _say(f"experts: wrote {out} and {heatmap}; train them with moe.expert_training=esft moe.esft.experts={out} "
         "lora.enabled=false")
    return 0


def _load_model(config: Config, adapter_path: str | None, train_records: list[dict]):
    """The model whose routing is scored (the base, or a fine-tuned one) and its tokenizer."""
    from moetune.eval.load import load_base, load_eval_tokenizer, load_tuned, resolve_tuned_model

    if adapter_path is not None:
        tuned = resolve_tuned_model(config, adapter_path)
        tokenizer = load_eval_tokenizer(config, tuned)
        return load_tuned(config, tuned, tokenizer), tokenizer
    from moetune.data.tokenizer import load_run_tokenizer, tokenizer_training_texts

    # A tokenizer trained on the data and not saved yet is trained on the training split as the
    # training run will: the same texts give the same tokenizer.
    tokenizer = load_run_tokenizer(config, training_texts=lambda: tokenizer_training_texts(train_records))
    return load_base(config, tokenizer), tokenizer


def _say(text: str) -> None:
    print(text, file=sys.stderr)
