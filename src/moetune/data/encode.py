"""Records -> token ids and labels, computed once and cached on disk with `datasets`.

Each record is rendered (:mod:`moetune.data.rendering`: its text and the character spans with loss),
tokenized once with offsets, and a token carries loss when it overlaps a trained span. Labels copy the ids
there and are -100 elsewhere; the first token of every sample is -100 too (in a packed row, that position
would be predicted from the *previous* sample's last token). A completion longer than ``max_target_length``
keeps its first tokens and no eos (it did not end).

A sample longer than ``max_seq_length`` is handled as ``data.long_samples`` says, or as its kind does by
default (:attr:`moetune.data.sources.SourceKind.long_samples`): ``truncate`` keeps it one sample, cut at
the end of the last whole trained turn that fits (a conversation) or inside the answer (a question keeps
its whole question; a question that alone does not fit is dropped); ``split`` cuts it into consecutive
windows, each a sample of its own; ``drop`` leaves it out. Every row records which (``handling``), so the
counts survive the cache (:class:`Encoded`).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moetune.data.chat_render import ConversationError
from moetune.data.rendering import Rendered, record_location, render_record, renderer_of
from moetune.data.sources._kind import LongSamples
from moetune.errors import UserError

IGNORE_INDEX = -100
# Bump when the encoding below changes, so old caches are not reused.
_ENCODING_VERSION = "3"
# Rows of records that became no sample carry no tokens; they are removed after counting.
_DROPPED, _BAD = "dropped", "bad"
MAX_PROBLEMS_PRINTED = 20
# Starting a process costs about a second (it imports the tokenizer and pickles it): not worth it for fewer records.
MIN_RECORDS_PER_PROCESS = 10_000


def encode_records(records, tokenizer, max_seq_length: int, cache_dir: str | Path | None = None,
                   max_target_length: int | None = None, label_ids: Sequence[int] | None = None,
                   long_samples: LongSamples | None = None, strict: bool = False):
    """The dataset of :func:`encode` (its counts left out)."""
    return encode(records, tokenizer, max_seq_length, cache_dir, max_target_length, label_ids, long_samples, strict).dataset


@dataclass(frozen=True)
class Encoded:
    """An encoding: ``dataset`` (see :func:`encode`) and ``stats``, how many records were ``truncated``, ``split``
    (into windows), ``dropped`` (too long under ``drop``, or nothing trained left) and ``bad`` (not renderable)."""

    dataset: Any
    stats: dict[str, int]


def encode(records, tokenizer, max_seq_length: int, cache_dir: str | Path | None = None,
           max_target_length: int | None = None, label_ids: Sequence[int] | None = None,
           long_samples: LongSamples | None = None, strict: bool = False,
           label_vocabulary: Sequence[str] | None = None, num_proc: int = 1) -> Encoded:
    """Encode ``records``: a list of dataset records, or a table of them (a ``datasets.Dataset`` with the JSON line
    in ``json`` and the ``expert_label`` in ``label``, :mod:`moetune.data.record_table`). Gives a ``datasets.Dataset``
    with columns ``input_ids``, ``labels``, ``length``, ``record`` (the index of the record a row came from) and
    ``handling`` (``whole``, ``truncated`` or ``split``), one row per sample, and the counts of how long and bad
    records were handled.

    With ``label_ids`` (one per record) or ``label_vocabulary`` (:mod:`moetune.data.expert_labels`: each record's
    ``expert_label`` looked up in it) the dataset also has ``expert_label_id``.
    ``long_samples`` None: each record's kind decides. A conversation the chat template cannot render is
    skipped and counted (its file and line printed), or, with ``strict``, a UserError naming them.

    With ``cache_dir`` the result is stored there under a key made of the records, the tokenizer (its
    vocabulary and chat template) and the options; an identical later call loads it instead. ``num_proc`` processes
    share the work when there are at least MIN_RECORDS_PER_PROCESS records for each.
    """
    from datasets import Dataset

    if isinstance(records, Dataset):
        raw = records
    else:
        columns: dict[str, list] = {"json": [json.dumps(record, ensure_ascii=False) for record in records],
                                    "label": [record.get("expert_label") for record in records]}
        raw = Dataset.from_dict(columns)
    if label_ids is not None:
        raw = raw.add_column("expert_label_id", list(label_ids))
    kwargs: dict[str, Any] = {}
    options = {"max_len": max_seq_length, "max_target": max_target_length, "long_samples": long_samples,
               "vocabulary": list(label_vocabulary) if label_vocabulary else None}
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        key = _cache_key(raw, tokenizer, options)
        kwargs = {"cache_file_name": str(Path(cache_dir) / f"encoded-{key}.arrow"), "load_from_cache_file": True}
    processes = max(1, min(num_proc, len(raw) // MIN_RECORDS_PER_PROCESS))
    encoded = raw.map(_encode_batch, batched=True, batch_size=500, with_indices=True, remove_columns=raw.column_names,
                      num_proc=processes if processes > 1 else None,
                      features=_features(label_ids is not None or bool(label_vocabulary)),
                      fn_kwargs={"tokenizer": tokenizer, "strict": strict, **options}, desc="Tokenizing", **kwargs)
    stats = _handling_counts(encoded)
    _report_problems(encoded)
    lengths = column_values(encoded, "length")
    kept = encoded if lengths.all() else encoded.select(lengths.nonzero()[0])  # an index mapping: nothing is copied
    return Encoded(kept.remove_columns(["problem"]), stats)


def _features(labelled: bool):
    """The encoded columns' types: 32-bit token ids (half the disk and mapped memory of the default int64)."""
    from datasets import Features, Sequence, Value

    features = {"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")), "length": Value("int32"),
                "record": Value("int64"), "handling": Value("string"), "problem": Value("string")}
    if labelled:
        features["expert_label_id"] = Value("int32")
    return Features(features)


def column_values(dataset, name: str):
    """A column of a ``datasets.Dataset`` as a numpy array, in the dataset's row order (an index mapping followed)."""
    # Arrow-formatted slicing gathers the column through the index mapping in one take, not row by row.
    return dataset.select_columns([name]).with_format("arrow")[:][name].to_numpy()


def _handling_counts(encoded) -> dict[str, int]:
    import pyarrow.compute as pc

    table = encoded.data.table
    unusual = table.filter(pc.not_equal(table.column("handling"), "whole")).select(["record", "handling"]).to_pylist()
    counts = {"truncated": 0, "split": 0, "dropped": 0, "bad": 0}
    seen: set[int] = set()
    for row in unusual:
        if row["record"] not in seen:
            counts[row["handling"]] += 1
            seen.add(row["record"])
    return counts


def _encode_batch(batch: dict[str, list], indices: list[int], tokenizer, max_len: int, max_target: int | None,
                  long_samples: LongSamples | None, strict: bool, vocabulary: list[str] | None) -> dict[str, list]:
    from moetune.data.expert_labels import NO_LABEL
    from moetune.data.sources import record_kind

    renderer = renderer_of(tokenizer) if any('"messages"' in line for line in batch["json"]) else None
    records = [json.loads(line) for line in batch["json"]]
    rendered: list[Rendered | str] = []
    for record in records:
        try:
            rendered.append(render_record(record, renderer))
        except ConversationError as err:
            if strict:
                raise UserError(f"{record_location(record)}: {err} (data.strict is true; set data.strict: false to "
                                "skip and count such conversations).") from None
            rendered.append(f"{record_location(record)}: {err}")
    good = [r for r in rendered if isinstance(r, Rendered)]
    tokens = iter(_tokenize(tokenizer, good))
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "record": [], "handling": [], "problem": []}
    label_ids = batch.get("expert_label_id")
    if vocabulary:
        index = {label: i for i, label in enumerate(vocabulary)}
        label_ids = [index.get(label, NO_LABEL) for label in batch["label"]]
    if label_ids is not None:
        out["expert_label_id"] = []

    def emit(n: int, ids: list[int], labels: list[int], handling: str, problem: str = "") -> None:
        if labels:
            labels = [IGNORE_INDEX] + labels[1:]
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
        out["record"].append(indices[n])
        out["handling"].append(handling)
        out["problem"].append(problem)
        if label_ids is not None:
            out["expert_label_id"].append(label_ids[n])

    for n, (record, item) in enumerate(zip(records, rendered, strict=True)):
        if not isinstance(item, Rendered):
            emit(n, [], [], _BAD, item)
            continue
        ids, labels, turn_ends, keep = next(tokens)
        head = bos if item.bos else []
        ids, labels = head + ids, [IGNORE_INDEX] * len(head) + labels
        cut = max_target is not None and item.turn_ends is None and item.keep > 0
        answer_tokens = len(ids) - (len(head) + keep)
        if cut and answer_tokens > max_target:
            ids, labels = ids[:len(head) + keep + max_target], labels[:len(head) + keep + max_target]
        elif item.eos and eos:
            ids, labels = ids + eos, labels + eos
        if len(ids) <= max_len:
            emit(n, ids, labels, "whole")
            continue
        kind = record_kind(record)
        policy = long_samples or (kind.long_samples if kind is not None else "split")
        if policy == "split":
            windows = [(ids[s:s + max_len], labels[s:s + max_len]) for s in range(0, len(ids), max_len)]
            # A window of prompt only teaches nothing.
            windows = [(w_ids, w_labels) for w_ids, w_labels in windows if any(x != IGNORE_INDEX for x in w_labels[1:])]
            for w_ids, w_labels in windows:
                emit(n, w_ids, w_labels, "split")
            if not windows:
                emit(n, [], [], _DROPPED)
            continue
        end = _truncation_point(turn_ends, len(head) + keep, max_len) if policy == "truncate" else 0
        if end and any(x != IGNORE_INDEX for x in labels[1:end]):
            emit(n, ids[:end], labels[:end], "truncated")
        else:
            emit(n, [], [], _DROPPED)
    return out


def _truncation_point(turn_ends: list[int] | None, keep_tokens: int, max_len: int) -> int:
    """Tokens kept: the end of the last whole turn that fits, or ``max_len`` when the cut may fall anywhere past
    ``keep_tokens``; 0 when nothing may be kept."""
    if turn_ends is None:
        return max_len if keep_tokens < max_len else 0
    return max((end for end in turn_ends if end <= max_len), default=0)


def _tokenize(tokenizer, items: list[Rendered]) -> list[tuple[list[int], list[int], list[int] | None, int]]:
    """(ids, labels, turn ends in tokens (bos not counted), tokens before ``keep``) of each rendered record.

    The text is tokenized once, whole, and spans are mapped through the offsets: tokenizing the parts
    apart would add word-start markers in SentencePiece vocabularies (Llama, Mixtral) that generation never
    produces. A token that overlaps a trained span carries loss.
    """
    if not items:
        return []
    if not getattr(tokenizer, "is_fast", False):
        return [_tokenize_slow(tokenizer, item) for item in items]
    out = tokenizer([item.text for item in items], add_special_tokens=False, return_offsets_mapping=True)
    results = []
    for item, ids, offsets in zip(items, out["input_ids"], out["offset_mapping"], strict=True):
        starts = [start for start, _ in offsets]  # non-decreasing: a cut at character c keeps the tokens starting before c
        head = 1 if item.bos and tokenizer.bos_token_id is not None else 0
        turn_ends = None if item.turn_ends is None else [head + bisect.bisect_left(starts, char) for char in item.turn_ends]
        results.append((ids, _labels(ids, offsets, item.trained), turn_ends, bisect.bisect_left(starts, item.keep)))
    return results


def _labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Each token's id where it overlaps a trained span (a zero-width token: where it sits inside one), else -100.
    Tokens and spans are both in text order: one pass over each."""
    labels = [IGNORE_INDEX] * len(ids)
    span = 0
    for n, (start, end) in enumerate(offsets):
        while span < len(spans) and spans[span][1] <= start:  # spans that end before this token: done with
            span += 1
        if span == len(spans):
            break
        span_start, span_end = spans[span]
        if start < span_end and (end > span_start or (start == end and start >= span_start)):
            labels[n] = ids[n]
    return labels


def _tokenize_slow(tokenizer, item: Rendered) -> tuple[list[int], list[int], None, int]:
    """Tokenizers without offsets: the parts are tokenized apart (text, or prompt and completion)."""
    if item.turn_ends is not None:
        raise UserError("Conversations need a fast tokenizer (one with a tokenizer.json): moetune maps the chat "
                        "template's rendering to tokens through its character offsets.")
    prompt = tokenizer(item.text[:item.keep], add_special_tokens=False)["input_ids"] if item.keep else []
    rest = tokenizer(item.text[item.keep:], add_special_tokens=False)["input_ids"]
    return prompt + rest, [IGNORE_INDEX] * len(prompt) + rest, None, len(prompt)


def _report_problems(encoded) -> None:
    import pyarrow.compute as pc

    table = encoded.data.table
    problems = table.filter(pc.equal(table.column("handling"), _BAD)).column("problem").to_pylist()
    for problem in problems[:MAX_PROBLEMS_PRINTED]:
        print(f"skipped conversation {problem}", file=sys.stderr)
    if len(problems) > MAX_PROBLEMS_PRINTED:
        print(f"... and {len(problems) - MAX_PROBLEMS_PRINTED} more conversations skipped", file=sys.stderr)


def _cache_key(raw, tokenizer, options: dict[str, Any]) -> str:
    from moetune.data.chat_templates import chat_template_of

    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{_ENCODING_VERSION}|{tokenizer.bos_token_id}|{tokenizer.eos_token_id}|{sorted(options.items())}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else repr(tokenizer.get_vocab()).encode())
    digest.update(b"template|" + (chat_template_of(tokenizer) or "").encode())
    # A table of the built dataset carries each line's digest: hashing those never reads the records again.
    content = "digest" if "digest" in raw.column_names else "json"
    columns = [content, "label"] + (["expert_label_id"] if "expert_label_id" in raw.column_names else [])
    for batch in raw.select_columns(columns).iter(batch_size=10_000):
        for value in batch[content]:
            digest.update(value.encode("utf-8", "surrogatepass") + b"\x00")
        digest.update(repr(batch["label"]).encode() + repr(batch.get("expert_label_id")).encode())
    return digest.hexdigest()
