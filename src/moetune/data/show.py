"""`moetune data --show N`: the first N training samples as the model will see them, trained tokens marked.

Each sample is the first training records encoded exactly as training encodes them (the same tokenizer,
chat template, masks and long-sample handling), so what is shown is what trains. In a terminal the trained
tokens are green and the rest dim; elsewhere (a pipe, a file) the trained spans are wrapped in ⟦ ⟧. A preference
record is shown as its sides (chosen and rejected, or its one labelled completion), each as a sample.
``--json`` writes one JSON object per sample instead: its token ids, token strings and labels (-100 where
no loss is taken), with the record it came from.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import IO

from moetune.config.schema import Config
from moetune.data.encode import IGNORE_INDEX, encode
from moetune.errors import UserError

_TRAINED, _UNTRAINED, _RESET = "\x1b[1;32m", "\x1b[2m", "\x1b[0m"
OPEN, CLOSE = "⟦", "⟧"


def show_samples(config: Config, count: int, as_json: bool = False, out: IO[str] | None = None) -> int:
    """Print the first ``count`` training samples of ``data.output_path`` (built first unless current). Returns 0."""
    from moetune.data.build import build_dataset_unless_current
    from moetune.data.record_table import iter_records, load_split_tables, table_records
    from moetune.data.rendering import record_location
    from moetune.data.tokenizer import load_run_tokenizer, tokenizer_training_texts

    if count < 1:
        raise UserError(f"--show takes a positive number of samples, got {count}.")
    out = out or sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # the build's summary is not a sample: stdout stays the samples'
        build_dataset_unless_current(config)
    train = load_split_tables(config).train
    if not len(train):
        raise UserError(f"{config.data.output_path} has no training samples after the validation split.")
    # The run's tokenizer as training decides on it; one trained on the data here is not saved (training saves its own).
    tokenizer = load_run_tokenizer(config, training_texts=lambda: tokenizer_training_texts(iter_records(train)))
    records = table_records(train.select(range(min(count, len(train)))))
    samples, owners = samples_of(records)
    preference = any(side is not None for _, side in owners)
    # A preference record's sides are encoded as a preference objective encodes them: truncated when too long.
    encoded = encode(samples, tokenizer, config.model.max_seq_length, max_target_length=config.data.max_target_length,
                     long_samples="truncate" if preference else config.data.long_samples, strict=config.data.strict)
    rows = encoded.dataset if preference else encoded.dataset.select(range(min(count, len(encoded.dataset))))
    color = not as_json and out.isatty()
    for n, row in enumerate(rows, 1):
        record, side = owners[row["record"]]
        if as_json:
            out.write(json.dumps({"sample": n, "source": record.get("source"), "kind": record.get("kind"),
                                  **({"side": side} if side else {}),
                                  "where": record_location(record), "handling": row["handling"],
                                  "input_ids": row["input_ids"], "tokens": tokenizer.convert_ids_to_tokens(row["input_ids"]),
                                  "labels": row["labels"]}, ensure_ascii=False) + "\n")
            continue
        trained = sum(label != IGNORE_INDEX for label in row["labels"])
        how = "" if row["handling"] == "whole" else f", {row['handling']}"
        named = f" ({side} side)" if side else ""
        out.write(f"── sample {n}: {record.get('source')} {record.get('kind')}{named}, {record_location(record)}: "
                  f"{len(row['input_ids']):,} tokens, {trained:,} trained{how}\n")
        out.write(marked_text(tokenizer, row["input_ids"], row["labels"], color) + "\n\n")
    if not as_json:
        legend = "trained tokens in green" if color else f"trained tokens between {OPEN} and {CLOSE}"
        skipped = {k: n for k, n in encoded.stats.items() if n}
        what = "sides" if preference else ""
        out.write(f"({legend}; {len(rows)}{' ' + what if what else ''} of the first {len(records)} training records"
                  + (f"; {', '.join(f'{n} {k}' for k, n in skipped.items())}" if skipped else "") + ")\n")
    return 0


def samples_of(records: list[dict]) -> tuple[list[dict], list[tuple[dict, str | None]]]:
    """The samples to encode for ``records`` (a preference record gives one per side), and for each sample its record
    and side name (chosen, rejected, desirable, undesirable; None for a record that is its own sample)."""
    from moetune.data.preference_sides import SIDE_NAMES, preference_sides
    from moetune.data.records import is_preference

    samples, owners = [], []
    for record in records:
        if not is_preference(record):
            samples.append(record)
            owners.append((record, None))
            continue
        names = SIDE_NAMES if "chosen" in record else ("desirable" if record["desirable"] else "undesirable",)
        for side, name in zip(preference_sides(record), names, strict=True):
            samples.append(side)
            owners.append((record, name))
    return samples, owners


def marked_text(tokenizer, ids: list[int], labels: list[int], color: bool) -> str:
    """The decoded sample with its trained runs marked: ANSI colours, or ⟦ ⟧ around each trained run."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(ids, labels, strict=True):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    parts = []
    for trained, run in runs:
        text = tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if color:
            parts.append((_TRAINED if trained else _UNTRAINED) + text + _RESET)
        else:
            parts.append(f"{OPEN}{text}{CLOSE}" if trained else text)
    return "".join(parts)

