"""The evaluation report: one JSON object, the same as Markdown, and a console table.

Every figure is given for the base and the fine-tuned model side by side. Improvements are
percentages of the base value, positive when the fine-tuned model is better (lower loss or
perplexity).
"""

from __future__ import annotations

import json
from pathlib import Path

REPORT_JSON, REPORT_MD = "report.json", "report.md"
# Long generations make the Markdown unreadable; report.json keeps them whole.
_MD_TEXT_CHARS = 600


def improvement_percent(base: float, tuned: float) -> float | None:
    """How much lower ``tuned`` is than ``base``, in percent of ``base`` (None when base is 0)."""
    return None if base == 0 else (base - tuned) / base * 100.0


def perplexity_section(base: dict, tuned: dict) -> dict:
    """Loss and perplexity of both models, overall and per group, with the improvements."""
    groups = sorted(set(base["per_group"]) | set(tuned["per_group"]))
    return {
        "base": {k: base[k] for k in ("loss", "perplexity", "tokens")},
        "tuned": {k: tuned[k] for k in ("loss", "perplexity", "tokens")},
        "loss_improvement_percent": improvement_percent(base["loss"], tuned["loss"]),
        "perplexity_improvement_percent": improvement_percent(base["perplexity"], tuned["perplexity"]),
        "per_group": {g: {"base_loss": base["per_group"].get(g, {}).get("loss"),
                          "tuned_loss": tuned["per_group"].get(g, {}).get("loss"),
                          "tokens": (tuned["per_group"].get(g) or base["per_group"][g])["tokens"]} for g in groups},
    }


def write_report(report: dict, output_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``output_dir``; returns both paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / REPORT_JSON, out / REPORT_MD
    json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    md_path.write_text(render_markdown(report))
    return json_path, md_path


def console_table(report: dict) -> str:
    """The headline figures as an aligned plain-text table."""
    rows = [("metric", "base", "fine-tuned", "improvement")]
    p = report["perplexity"]
    rows.append(("loss", _num(p["base"]["loss"]), _num(p["tuned"]["loss"]), _pct(p["loss_improvement_percent"])))
    rows.append(("perplexity", _num(p["base"]["perplexity"]), _num(p["tuned"]["perplexity"]),
                 _pct(p["perplexity_improvement_percent"])))
    qa = report.get("qa")
    if qa and qa["tuned"]["overall"]["count"]:
        for key, name in (("exact_match", "QA exact match"), ("f1", "QA F1")):
            rows.append((name, _num(qa["base"]["overall"][key]), _num(qa["tuned"]["overall"][key]), ""))
    preference = report.get("preference")
    if preference and preference["pairs"]:
        rows.append(("prefers chosen", _num(preference["base_prefers_chosen"]), _num(preference["tuned_prefers_chosen"]), ""))
        rows.append(("preference accuracy", "", _num(preference["accuracy"]), ""))
        rows.append(("reward margin", "", _num(preference["margin"]), ""))
    routing = report.get("routing")
    if routing:
        rows.append(("routing specialisation", _num(routing["base"]["specialisation"]),
                     _num(routing["tuned"]["specialisation"]), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    """The whole report as Markdown: headline table, per-group losses, QA scores, routing, samples."""
    p = report["perplexity"]
    md = [f"# Evaluation of `{report['tuned_model']['path']}`", "",
          f"Base: `{report['base_model']}`; fine-tuned: {report['tuned_model']['kind']} `{report['tuned_model']['path']}`. "
          f"{report['samples']['evaluated']} of {report['samples']['validation']} validation samples "
          f"({report['samples']['qa']} QA, {report['samples']['rust_items']} Rust items generated from).", "",
          "## Summary", "", "```", console_table(report), "```", "",
          "## Loss per group", "", "| group | tokens | base loss | fine-tuned loss | improvement |", "|---|---:|---:|---:|---:|"]
    for group, g in p["per_group"].items():
        both = None not in (g["base_loss"], g["tuned_loss"])
        change = improvement_percent(g["base_loss"], g["tuned_loss"]) if both else None
        md.append(f"| {group} | {g['tokens']} | {_num(g['base_loss'])} | {_num(g['tuned_loss'])} | {_pct(change)} |")
    qa = report.get("qa")
    if qa and qa["tuned"]["overall"]["count"]:
        md += ["", "## Question answering (exact match / token F1, SQuAD normalisation)", "",
               "| expert_label | n | base EM | base F1 | fine-tuned EM | fine-tuned F1 |", "|---|---:|---:|---:|---:|---:|"]
        for label in [*qa["tuned"]["per_label"], "overall"]:
            b = qa["base"]["overall"] if label == "overall" else qa["base"]["per_label"][label]
            t = qa["tuned"]["overall"] if label == "overall" else qa["tuned"]["per_label"][label]
            md.append(f"| {label} | {t['count']} | {_num(b['exact_match'])} | {_num(b['f1'])} | "
                      f"{_num(t['exact_match'])} | {_num(t['f1'])} |")
    preference = report.get("preference")
    if preference and preference["pairs"]:
        md += ["", f"## Preference pairs (rewards against the base, beta {preference['beta']:g})", "",
               "Accuracy: share of pairs whose chosen completion gets the higher reward; prefers chosen: share of pairs "
               "where the model gives the chosen completion the higher log-probability.", "",
               "| expert_label | pairs | accuracy | margin | base prefers chosen | fine-tuned prefers chosen |",
               "|---|---:|---:|---:|---:|---:|"]
        for label, f in [*preference["per_label"].items(), ("overall", preference)]:
            md.append(f"| {label} | {f['pairs']} | {_num(f['accuracy'])} | {_num(f['margin'])} | "
                      f"{_num(f['base_prefers_chosen'])} | {_num(f['tuned_prefers_chosen'])} |")
    routing = report.get("routing")
    if routing:
        md += ["", "## Routing by group", "",
               "Specialisation = mutual information between group and expert divided by the group entropy "
               "(0: every group routed alike, 1: the expert tells the group).", ""]
        for name in ("base", "tuned"):
            r = routing[name]
            mi = ", ".join(f"{v:.3f}" for v in r["mutual_information_bits"])
            md += [f"- {name}: specialisation {_num(r['specialisation'])}; MI per layer (bits): {mi}; "
                   f"![routing {name}]({r['heatmap']})"]
    if report.get("qa", {}).get("samples"):
        md += ["", "## QA samples", ""]
        for s in report["qa"]["samples"]:
            md += [f"**{s['expert_label']}**: {_short(s['prompt'])}", "",
                   f"- gold: {_short(' | '.join(s['gold']))}",
                   f"- base (EM {s['base_exact_match']:.0f}, F1 {s['base_f1']:.2f}): {_short(s['base'])}",
                   f"- fine-tuned (EM {s['tuned_exact_match']:.0f}, F1 {s['tuned_f1']:.2f}): {_short(s['tuned'])}", ""]
    if report.get("rust", {}).get("samples"):
        md += ["", "## Rust samples (body generated from the signature and doc)", ""]
        for s in report["rust"]["samples"]:
            md += [f"### `{s['name']}` ({s['kind']}, {s['path']})", "", "```rust", _short(s["prompt"], tail=True), "```", "",
                   "| base | fine-tuned |", "|---|---|",
                   f"| {_cell(s['base'])} | {_cell(s['tuned'])} |", "",
                   "<details><summary>reference body</summary>", "", "```rust", _short(s["reference"]), "```", "</details>", ""]
    return "\n".join(md) + "\n"


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:+.2f}%"


def _short(text: str, tail: bool = False) -> str:
    if len(text) <= _MD_TEXT_CHARS:
        return text
    return "..." + text[-_MD_TEXT_CHARS:] if tail else text[:_MD_TEXT_CHARS] + "..."


def _cell(text: str) -> str:
    # A Markdown table cell is one line: keep the code's lines visible as <br>.
    return "<code>" + _short(text).replace("&", "&amp;").replace("<", "&lt;").replace("|", "&#124;").replace("\n", "<br>") + "</code>"
