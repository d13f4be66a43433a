"""`moetune eval`: the base model against the fine-tuned one on the validation split.

For each model in turn (the fine-tuned one first, so a wrong adapter fails at once; for an adapter the
base is the same model with the adapter switched off): loss and perplexity per sample group,
routed-token counts per group, QA answers (exact match, token F1) and Rust bodies generated from
their signatures. Writes report.json, report.md and one routing heatmap PNG per model.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from moetune.config.schema import Config
from moetune.data.sources import Evaluation, record_kind
from moetune.errors import UserError
from moetune.eval.generation import generate_texts, prompt_token_budget, rust_generation_prompt
from moetune.eval.load import load_base, load_eval_tokenizer, load_tuned, resolve_tuned_model
from moetune.eval.qa_metrics import aggregate_scores, clean_prediction, exact_match, gold_answers, token_f1
from moetune.eval.report import console_table, perplexity_section, write_report
from moetune.eval.routing_report import build_routing_report, save_routing_heatmap
from moetune.eval.scoring import ScoreResult, score_records
from moetune.run_dir import EVAL_DIR


@dataclass
class ModelEval:
    """One model's results: the scoring pass and its generations (QA answers, Rust bodies)."""

    score: ScoreResult
    qa_answers: list[str]
    rust_bodies: list[str]


def evaluate(config: Config, adapter_path: str | None = None, max_samples: int | None = None,
             output_dir: str | None = None) -> int:
    """Evaluate base vs fine-tuned and write the report; returns the exit code (0).

    ``adapter_path``: a PEFT adapter folder (default: the final adapter in training.output_dir) or a
    merged model folder. ``max_samples``: evaluate at most this many validation samples (a seeded
    choice). ``output_dir``: where the report goes (default: ``<adapter_path>/eval``).
    """
    started = time.perf_counter()
    if max_samples is not None and max_samples < 1:
        raise UserError(f"--max-samples must be a positive integer, got {max_samples}.")
    tuned_path = resolve_tuned_model(config, adapter_path)
    out = Path(output_dir) if output_dir is not None else tuned_path.path / EVAL_DIR
    tokenizer = load_eval_tokenizer(config, tuned_path)
    validation = validation_records(config)
    samples = choose_samples(validation, max_samples, config.training.seed)
    qa = [r for r in samples if _evaluated_as(r) == "answer" and "prompt" in r and "completion" in r]
    rust = [(r, *pair) for r in samples if _evaluated_as(r) == "body" and (pair := rust_generation_prompt(r)) is not None]
    _say(f"eval: {len(samples)} of {len(validation)} validation samples ({len(qa)} QA, {len(rust)} Rust items "
         f"to generate from); fine-tuned {tuned_path.kind}: {tuned_path.path}")

    if tuned_path.kind == "adapter":
        # The adapter is loaded first so a wrong one fails before any work; the base figures come from
        # the same weights with the adapter switched off (modules_to_save included), so one model is in memory.
        tuned_model = load_tuned(config, tuned_path, tokenizer, base=load_base(config, tokenizer))
        tuned = _evaluate_model(tuned_model, "tuned", tokenizer, samples, qa, rust, config)
        with tuned_model.disable_adapter():
            base = _evaluate_model(tuned_model, "base", tokenizer, samples, qa, rust, config)
    else:
        tuned_model = load_tuned(config, tuned_path, tokenizer)
        tuned = _evaluate_model(tuned_model, "tuned", tokenizer, samples, qa, rust, config)
        del tuned_model  # a merged model is whole: free it before building the base
        base = _evaluate_model(load_base(config, tokenizer), "base", tokenizer, samples, qa, rust, config)

    out.mkdir(parents=True, exist_ok=True)
    report = build_report(config, tuned_path, len(validation), samples, qa, rust, base, tuned, out)
    report["seconds"] = round(time.perf_counter() - started, 2)
    json_path, md_path = write_report(report, out)
    print(console_table(report))
    _say(f"eval: wrote {json_path} and {md_path}")
    return 0


def validation_records(config: Config) -> list[dict]:
    """The validation split of data.output_path; a UserError when there is none."""
    from moetune.data.split import load_splits

    _, validation = load_splits(config)
    if not validation:
        raise UserError(f"The validation split of {config.data.output_path} is empty (validation.validation_split = "
                        f"{config.validation.validation_split}); evaluation needs held-out samples.")
    return validation


def _evaluated_as(record: dict) -> Evaluation:
    """What the record's source kind says eval does with it beyond its loss; loss only for a kind not registered."""
    kind = record_kind(record)
    return kind.evaluation if kind is not None else "loss"


def choose_samples(records: list[dict], max_samples: int | None, seed: int) -> list[dict]:
    """At most ``max_samples`` records, a seeded choice kept in dataset order (all when None)."""
    if max_samples is None or max_samples >= len(records):
        return list(records)
    chosen = sorted(random.Random(seed).sample(range(len(records)), max_samples))
    return [records[i] for i in chosen]


def _evaluate_model(model, name: str, tokenizer, samples, qa, rust, config: Config) -> ModelEval:
    batch = config.training.per_device_eval_batch_size
    score = score_records(model, tokenizer, samples, config.model.max_seq_length, batch, desc=f"{name}: loss")
    max_prompt = prompt_token_budget(config)
    seed = config.training.seed
    answers = generate_texts(model, tokenizer, [r["prompt"] for r in qa], config.inference, batch, max_prompt, seed,
                             desc=f"{name}: QA answers")
    bodies = generate_texts(model, tokenizer, [prompt for _, prompt, _ in rust], config.inference, batch, max_prompt,
                            seed, desc=f"{name}: Rust bodies")
    return ModelEval(score, answers, bodies)


def build_report(config: Config, tuned_path, validation_count: int, samples, qa, rust, base: ModelEval,
                 tuned: ModelEval, out: Path) -> dict:
    """The report.json object (see the README's evaluation section for every field)."""
    report = {
        "base_model": config.model.name,
        "tuned_model": {"path": str(tuned_path.path), "kind": tuned_path.kind},
        "samples": {"validation": validation_count, "evaluated": len(samples), "qa": len(qa), "rust_items": len(rust)},
        "inference": {k: getattr(config.inference, k) for k in config.inference.__dataclass_fields__},
        "perplexity": perplexity_section(base.score.as_dict(), tuned.score.as_dict()),
        "qa": _qa_section(qa, base.qa_answers, tuned.qa_answers),
        "rust": {"samples": [{"name": r.get("name"), "path": r.get("path"), "kind": r.get("kind"), "prompt": prompt,
                              "reference": reference, "base": b, "tuned": t}
                             for (r, prompt, reference), b, t in zip(rust, base.rust_bodies, tuned.rust_bodies, strict=True)]},
        "routing": None,
    }
    if base.score.routing_counts and tuned.score.routing_counts:
        report["routing"] = {}
        for name, result in (("base", base.score), ("tuned", tuned.score)):
            routing = build_routing_report(result.routing_counts, result.top_k)
            heatmap = save_routing_heatmap(routing, out / f"routing_{name}.png",
                                           f"{name}: share of each group's tokens per expert")
            report["routing"][name] = {**routing.as_dict(), "heatmap": heatmap.name}
    return report


def _qa_section(qa: list[dict], base_answers: list[str], tuned_answers: list[str]) -> dict:
    section: dict = {"samples": []}
    scored: dict[str, list[tuple[str, float, float]]] = {"base": [], "tuned": []}
    for record, base_raw, tuned_raw in zip(qa, base_answers, tuned_answers, strict=True):
        golds = gold_answers(record)
        label = record.get("expert_label") or "none"
        sample = {"expert_label": label, "prompt": record["prompt"], "gold": golds}
        for name, raw in (("base", base_raw), ("tuned", tuned_raw)):
            answer = clean_prediction(raw, golds)
            em, f1 = exact_match(answer, golds), token_f1(answer, golds)
            scored[name].append((label, em, f1))
            sample.update({name: answer, f"{name}_exact_match": em, f"{name}_f1": f1})
        section["samples"].append(sample)
    for name in ("base", "tuned"):
        overall, per_label = aggregate_scores(scored[name])
        section[name] = {"overall": overall.as_dict(), "per_label": {k: v.as_dict() for k, v in per_label.items()}}
    return section


def _say(text: str) -> None:
    print(text, file=sys.stderr)
