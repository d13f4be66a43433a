"""Question answering scores: exact match and token F1 with SQuAD's answer normalisation.

Both compare a predicted answer with every gold answer and keep the best score, as the SQuAD
v1.1 evaluation script does: lower case, punctuation removed, the articles a/an/the removed,
whitespace collapsed. F1 is over the multiset of normalised tokens.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer, else 0.0."""
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(gold) for gold in golds))


def token_f1(prediction: str, golds: Sequence[str]) -> float:
    """The best token-overlap F1 of the prediction against any gold answer (0.0 to 1.0)."""
    return max((_f1(normalize_answer(prediction).split(), normalize_answer(gold).split()) for gold in golds),
               default=0.0)


def _f1(predicted: list[str], gold: list[str]) -> float:
    if not predicted or not gold:
        # Two empty answers agree; an empty answer against a non-empty one shares nothing.
        return float(predicted == gold)
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class QaScore:
    """Mean exact match and F1 (both 0 to 1) over ``count`` answers."""

    exact_match: float
    f1: float
    count: int

    def as_dict(self) -> dict[str, float | int]:
        return {"exact_match": self.exact_match, "f1": self.f1, "count": self.count}


def aggregate_scores(scored: Iterable[tuple[str, float, float]]) -> tuple[QaScore, dict[str, QaScore]]:
    """(overall, per label) means from (label, exact_match, f1) triples; labels sorted by name."""
    by_label: dict[str, list[tuple[float, float]]] = {}
    everything: list[tuple[float, float]] = []
    for label, em, f1 in scored:
        by_label.setdefault(label, []).append((em, f1))
        everything.append((em, f1))
    return _mean(everything), {label: _mean(by_label[label]) for label in sorted(by_label)}


def _mean(pairs: list[tuple[float, float]]) -> QaScore:
    if not pairs:
        return QaScore(0.0, 0.0, 0)
    return QaScore(sum(p[0] for p in pairs) / len(pairs), sum(p[1] for p in pairs) / len(pairs), len(pairs))


def gold_answers(record: dict) -> list[str]:
    """The gold answers of a QA record: its ``answers`` list when present, else its completion."""
    answers = record.get("answers")
    if isinstance(answers, list) and answers:
        return [str(a).strip() for a in answers]
    return [record["completion"].strip()]


def clean_prediction(generated: str, golds: Sequence[str]) -> str:
    """The answer part of a generated continuation.

    A tiny or lightly tuned model often runs on past its answer into the next "Question: ..."; when
    no gold answer spans lines, only the first line counts as the answer.
    """
    text = generated.strip()
    if not any("\n" in gold for gold in golds):
        text = text.split("\n", 1)[0].strip()
    return text
