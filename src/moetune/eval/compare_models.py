"""`moetune eval`: the base model against the fine-tuned one on the validation split.

For each model in turn (the fine-tuned one first, so a wrong adapter fails at once; for an adapter the
base is the same model with the adapter switched off): loss and perplexity per sample group,
routed-token counts per group, answers (exact match, token F1: QA answers, and the final assistant reply of
each conversation, generated from the conversation before it as its chat template renders it), Rust bodies
generated from their signatures, and on preference pairs both completions' log-probabilities, from which the
fine-tuned model's preference accuracy and reward margin against the base follow (:mod:`moetune.eval.preferences`;
a preference record's loss is its first completion's, the chosen one of a pair). Writes report.json, report.md
and one routing heatmap PNG per model.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moetune.config.schema import Config
from moetune.data.preference_sides import preference_sides
from moetune.data.records import is_preference
from moetune.data.sources import Evaluation, record_kind
from moetune.errors import UserError
from moetune.eval.generation import generate_from_ids, generate_texts, prompt_token_budget, rust_generation_prompt
from moetune.eval.load import load_base, load_eval_tokenizer, load_tuned, resolve_tuned_model
from moetune.eval.preferences import pair_logps, paired_records, preference_section
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
    pairs: tuple[torch.Tensor, list[dict]] | None = None
    """Preference pairs' (chosen, rejected) summed log-probabilities and the records of the pairs kept."""


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
    qa = answer_questions(samples, tokenizer)
    rust = [(r, *pair) for r in samples if _evaluated_as(r) == "body" and (pair := rust_generation_prompt(r)) is not None]
    pairs = paired_records(samples)
    _say(f"eval: {len(samples)} of {len(validation)} validation samples ({len(qa)} QA, {len(rust)} Rust items "
         f"to generate from, {len(pairs)} preference pairs); fine-tuned {tuned_path.kind}: {tuned_path.path}")

    if tuned_path.kind == "adapter":
        # The adapter is loaded first so a wrong one fails before any work; the base figures come from
        # the same weights with the adapter switched off (modules_to_save included), so one model is in memory.
        tuned_model = load_tuned(config, tuned_path, tokenizer, base=load_base(config, tokenizer))
        tuned = _evaluate_model(tuned_model, "tuned", tokenizer, samples, qa, rust, pairs, config)
        with tuned_model.disable_adapter():
            base = _evaluate_model(tuned_model, "base", tokenizer, samples, qa, rust, pairs, config)
    else:
        tuned_model = load_tuned(config, tuned_path, tokenizer)
        tuned = _evaluate_model(tuned_model, "tuned", tokenizer, samples, qa, rust, pairs, config)
        del tuned_model  # a merged model is whole: free it before building the base
        base = _evaluate_model(load_base(config, tokenizer), "base", tokenizer, samples, qa, rust, pairs, config)

    out.mkdir(parents=True, exist_ok=True)
    report = build_report(config, tuned_path, len(validation), samples, qa, rust, base, tuned, out, pairs)
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


@dataclass(frozen=True)
class Question:
    """A validation record whose answer is generated: the prompt's token ids, how the report shows the prompt, and
    the reference answer(s)."""

    record: dict
    prompt_ids: list[int]
    shown: str
    golds: list[str]


def answer_questions(samples: list[dict], tokenizer) -> list[Question]:
    """The records of kinds evaluated by their answer, each rendered as training renders it: a QA prompt (bos + its
    tokens), or a conversation up to its final assistant reply with the chat template's generation prompt."""
    from moetune.data.chat_render import ConversationError
    from moetune.data.rendering import answer_prompt, renderer_of

    renderer = renderer_of(tokenizer)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    questions = []
    for record in samples:
        if _evaluated_as(record) != "answer":
            continue
        try:
            found = answer_prompt(record, renderer)
        except ConversationError:
            continue  # training skipped it too, and counted it
        if found is None:
            continue
        prompt, with_bos, reference = found
        ids = (bos if with_bos else []) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        users = [m["content"] for m in record.get("messages", []) if m.get("role") == "user"]
        shown = record["prompt"] if "prompt" in record and with_bos else (users[-1] if users else prompt)
        golds = gold_answers(record) if "completion" in record and with_bos else [reference.strip()]
        questions.append(Question(record, ids, shown, golds))
    return questions


def choose_samples(records: list[dict], max_samples: int | None, seed: int) -> list[dict]:
    """At most ``max_samples`` records, a seeded choice kept in dataset order (all when None)."""
    if max_samples is None or max_samples >= len(records):
        return list(records)
    chosen = sorted(random.Random(seed).sample(range(len(records)), max_samples))
    return [records[i] for i in chosen]


def _evaluate_model(model, name: str, tokenizer, samples, qa: list[Question], rust, pairs: list[dict],
                    config: Config) -> ModelEval:
    batch = config.training.per_device_eval_batch_size
    # A preference record's loss is its first completion's (a pair's chosen one), rendered as training renders it.
    scored = [preference_sides(r)[0] if is_preference(r) else r for r in samples]
    score = score_records(model, tokenizer, scored, config.model.max_seq_length, batch, desc=f"{name}: loss",
                          long_samples=config.data.long_samples)
    scored_pairs = pair_logps(model, tokenizer, pairs, config, desc=f"{name}: pairs") if pairs else None
    max_prompt = prompt_token_budget(config)
    seed = config.training.seed
    answers = [c.text for c in generate_from_ids(model, tokenizer, [q.prompt_ids for q in qa], config.inference, batch,
                                                 max_prompt, seed, desc=f"{name}: QA answers")]
    bodies = generate_texts(model, tokenizer, [prompt for _, prompt, _ in rust], config.inference, batch, max_prompt,
                            seed, desc=f"{name}: Rust bodies")
    return ModelEval(score, answers, bodies, scored_pairs)


def build_report(config: Config, tuned_path, validation_count: int, samples, qa, rust, base: ModelEval,
                 tuned: ModelEval, out: Path, pairs: list[dict] = ()) -> dict:
    """The report.json object (see the README's evaluation section for every field)."""
    preference = None
    if base.pairs is not None and tuned.pairs is not None:
        preference = preference_section(base.pairs[0], tuned.pairs[0], tuned.pairs[1], config.training.dpo_beta)
    report = {
        "base_model": config.model.name,
        "tuned_model": {"path": str(tuned_path.path), "kind": tuned_path.kind},
        "samples": {"validation": validation_count, "evaluated": len(samples), "qa": len(qa), "rust_items": len(rust),
                    "preference_pairs": len(pairs)},
        "inference": {k: getattr(config.inference, k) for k in config.inference.__dataclass_fields__},
        "perplexity": perplexity_section(base.score.as_dict(), tuned.score.as_dict()),
        "qa": _qa_section(qa, base.qa_answers, tuned.qa_answers),
        "rust": {"samples": [{"name": r.get("name"), "path": r.get("path"), "kind": r.get("kind"), "prompt": prompt,
                              "reference": reference, "base": b, "tuned": t}
                             for (r, prompt, reference), b, t in zip(rust, base.rust_bodies, tuned.rust_bodies, strict=True)]},
        "routing": None,
        "preference": preference,
    }
    if base.score.routing_counts and tuned.score.routing_counts:
        report["routing"] = {}
        for name, result in (("base", base.score), ("tuned", tuned.score)):
            routing = build_routing_report(result.routing_counts, result.top_k)
            heatmap = save_routing_heatmap(routing, out / f"routing_{name}.png",
                                           f"{name}: share of each group's tokens per expert")
            report["routing"][name] = {**routing.as_dict(), "heatmap": heatmap.name}
    return report


def _qa_section(qa: list[Question], base_answers: list[str], tuned_answers: list[str]) -> dict:
    section: dict = {"samples": []}
    scored: dict[str, list[tuple[str, float, float]]] = {"base": [], "tuned": []}
    for question, base_raw, tuned_raw in zip(qa, base_answers, tuned_answers, strict=True):
        golds = question.golds
        label = question.record.get("expert_label") or "none"
        sample = {"expert_label": label, "source": question.record.get("source"), "prompt": question.shown, "gold": golds}
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
