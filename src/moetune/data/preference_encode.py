"""Preference records -> encoded pairs (DPO, ORPO) or encoded labelled completions (KTO), through SFT's encoding.

Each record is expanded into its sides (:mod:`moetune.data.preference_sides`), every side is encoded once by
:func:`moetune.data.encode.encode` with ``long_samples="truncate"`` (so it is cached, masked and truncated
exactly as SFT's samples are: a too-long completion is cut, a side whose prompt alone does not fit is
dropped), and the encoded rows are grouped back by record:

- ``paired``: one row per pair, its chosen and its rejected side; a pair that lost a side is dropped and counted.
- ``unpaired``: one row per completion with ``desirable``; for KTO a pair gives two, its chosen side
  desirable and its rejected one not (as TRL's ``unpair_preference_dataset`` does).

A side's prompt is its tokens before its first trained label. Both sides of a pair are rendered from one
prompt, but a tokenizer may merge the prompt's last characters with a completion's first ones (SentencePiece
vocabularies do): such pairs are counted (``prompt_differs``) and kept, each side conditioned on its own tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from moetune.data.encode import IGNORE_INDEX, column_values, encode
from moetune.errors import UserError

Layout = Literal["paired", "unpaired"]


def layout_of(objective: str) -> Layout:
    """How an objective's batches hold preferences: pairs (dpo, orpo) or labelled completions (kto)."""
    return "unpaired" if objective == "kto" else "paired"


@dataclass(frozen=True)
class EncodedPreferences:
    """Encoded preferences: ``sides`` is :func:`moetune.data.encode.encode`'s dataset, one row per kept side
    (``input_ids``, ``labels``, ``length``[, ``expert_label_id``]). Paired: ``chosen[i]`` and ``rejected[i]`` are the
    rows of pair i's sides. Unpaired: ``completions[i]`` is row i's side and ``desirable[i]`` its label. ``records[i]``:
    the input record of pair or row i. ``stats``: ``records``, ``pairs`` or ``completions`` kept, ``dropped_pairs``
    (or ``dropped_completions``), ``prompt_differs``, ``tokens``, and ``sides`` (encode's counts of the sides that
    were truncated, dropped or bad)."""

    layout: Layout
    sides: Any
    records: np.ndarray
    stats: dict[str, Any]
    chosen: np.ndarray | None = None
    rejected: np.ndarray | None = None
    completions: np.ndarray | None = None
    desirable: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.records)


def encode_preferences(records, tokenizer, max_seq_length: int, objective: str, cache_dir: str | Path | None = None,
                       max_target_length: int | None = None, label_vocabulary=None, strict: bool = False,
                       num_proc: int = 1, where: str = "the dataset") -> EncodedPreferences:
    """Encode preference ``records`` (a list of dataset records, or a table of them as
    :func:`moetune.data.encode.encode` takes) for ``objective`` (dpo, orpo: pairs; kto: labelled completions).

    A UserError when a paired objective meets unpaired records, or a record is not a preference record
    (``where`` names the dataset in the message).
    """
    from datasets import Dataset

    layout = layout_of(objective)
    raw = records if isinstance(records, Dataset) else Dataset.from_dict(
        {"json": [json.dumps(r, ensure_ascii=False) for r in records], "label": [r.get("expert_label") for r in records]})
    sides = raw.map(_expand_batch, batched=True, batch_size=1000, with_indices=True, remove_columns=raw.column_names,
                    fn_kwargs={"where": where}, desc="Preference sides")
    record_of_side, side_number = column_values(sides, "record"), column_values(sides, "side")
    unpaired = int(len(raw) - np.count_nonzero(side_number == 1)) if len(raw) else 0
    if layout == "paired" and unpaired:
        raise UserError(f"training.objective {objective!r} needs prompt/chosen/rejected pairs; {unpaired:,} records of "
                        f"{where} are unpaired (prompt/completion/label, for objective: kto); remove them from "
                        "data.sources or train with objective: kto.")
    encoding = encode(sides.select_columns(["json", "label"]), tokenizer, max_seq_length, cache_dir=cache_dir,
                      max_target_length=max_target_length, long_samples="truncate", strict=strict,
                      label_vocabulary=label_vocabulary, num_proc=num_proc)
    encoded = encoding.dataset
    kept_side = column_values(encoded, "record")  # the side each encoded row is (truncate: at most one row a side)
    stats: dict[str, Any] = {"records": len(raw), "sides": encoding.stats,
                             "tokens": int(column_values(encoded, "length").sum()) if len(encoded) else 0}
    if layout == "unpaired":
        desirable = column_values(sides, "desirable")[kept_side].astype(bool)
        stats.update(completions=len(kept_side), dropped_completions=len(sides) - len(kept_side), prompt_differs=0)
        return EncodedPreferences(layout, encoded, record_of_side[kept_side], stats,
                                  completions=np.arange(len(kept_side)), desirable=desirable)
    chosen, rejected = np.full(len(raw), -1), np.full(len(raw), -1)
    rows = np.arange(len(kept_side))
    is_chosen = side_number[kept_side] == 0
    chosen[record_of_side[kept_side[is_chosen]]] = rows[is_chosen]
    rejected[record_of_side[kept_side[~is_chosen]]] = rows[~is_chosen]
    whole = np.flatnonzero((chosen >= 0) & (rejected >= 0))
    chosen, rejected = chosen[whole], rejected[whole]
    stats.update(pairs=len(whole), dropped_pairs=len(raw) - len(whole), prompt_differs=_prompts_differing(encoded, chosen, rejected))
    return EncodedPreferences(layout, encoded, whole, stats, chosen=chosen, rejected=rejected)


def prompt_length(labels) -> int:
    """Tokens of a side's prompt: those before its first trained label (the first token never carries one)."""
    labels = np.asarray(labels)
    trained = np.flatnonzero(labels[1:] != IGNORE_INDEX)
    return int(trained[0]) + 1 if len(trained) else len(labels)


def _expand_batch(batch: dict[str, list], indices: list[int], where: str) -> dict[str, list]:
    from moetune.data.preference_sides import preference_sides
    from moetune.data.records import is_preference

    out: dict[str, list] = {"json": [], "label": [], "record": [], "side": [], "desirable": []}
    for line, label, index in zip(batch["json"], batch["label"], indices, strict=True):
        record = json.loads(line)
        if not is_preference(record):
            raise UserError(f"{where} holds {record.get('source', 'non-preference')} records (record {index + 1} of the "
                            "split), which a preference objective cannot train on; rebuild it from preference sources "
                            "with `moetune data`.")
        for n, side in enumerate(preference_sides(record)):
            out["json"].append(json.dumps(side, ensure_ascii=False))
            out["label"].append(label)
            out["record"].append(index)
            out["side"].append(n)
            out["desirable"].append(bool(record["desirable"]) if "desirable" in record else n == 0)
    return out


def _prompts_differing(encoded, chosen: np.ndarray, rejected: np.ndarray, chunk: int = 10_000) -> int:
    """How many pairs' sides begin with different prompt tokens (numpy over the flat token columns, a chunk at a time)."""
    differing = 0
    for start in range(0, len(chosen), chunk):
        sides = [_flat(encoded.select(rows[start:start + chunk])) for rows in (chosen, rejected)]
        (c_ids, c_offsets, c_prompt), (r_ids, r_offsets, r_prompt) = sides
        same_length = c_prompt == r_prompt
        lengths = c_prompt[same_length]
        if lengths.sum():
            within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            equal = (c_ids[np.repeat(c_offsets[:-1][same_length], lengths) + within]
                     == r_ids[np.repeat(r_offsets[:-1][same_length], lengths) + within])
            starts = (np.cumsum(lengths) - lengths)[lengths > 0]
            same_tokens = np.ones(len(lengths), dtype=bool)
            same_tokens[lengths > 0] = np.logical_and.reduceat(equal, starts)
            same_length[same_length] = same_tokens
        differing += int(np.count_nonzero(~same_length))
    return differing


def _flat(rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(all token ids, each row's offset into them (and the end), each row's prompt length) of encoded rows."""
    table = rows.select_columns(["input_ids", "labels"]).with_format("arrow")[:]
    columns = []
    for name in ("input_ids", "labels"):
        column = table[name].combine_chunks()
        offsets = column.offsets.to_numpy()
        columns.append((column.flatten().to_numpy(), offsets - offsets[0]))
    (ids, offsets), (labels, _) = columns
    trained = labels != IGNORE_INDEX
    trained[offsets[:-1]] = False  # a row's first token never carries loss
    at = np.flatnonzero(trained)
    row_of = np.searchsorted(offsets, at, side="right") - 1
    prompt = np.diff(offsets).copy()  # a row with no trained token (none is kept) would be all prompt
    rows_found, first = np.unique(row_of, return_index=True)
    prompt[rows_found] = at[first] - offsets[rows_found]
    return ids, offsets, prompt
