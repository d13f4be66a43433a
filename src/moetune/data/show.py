"""`moetune data --show N`: the first N training samples as the model will see them, trained tokens marked.

Each sample is the first training records encoded exactly as training encodes them (the same tokenizer,
chat template, masks and long-sample handling), so what is shown is what trains. In a terminal the trained
tokens are green and the rest dim; elsewhere (a pipe, a file) the trained spans are wrapped in ⟦ ⟧.
``--json`` writes one JSON object per sample instead: its token ids, token strings and labels (-100 where
no loss is taken), with the record it came from.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import IO

from moetune.config.schema import Config
from moetune.data.encode import IGNORE_INDEX, encode
from moetune.errors import UserError

_TRAINED, _UNTRAINED, _RESET = "\x1b[1;32m", "\x1b[2m", "\x1b[0m"
OPEN, CLOSE = "⟦", "⟧"


def show_samples(config: Config, count: int, as_json: bool = False, out: IO[str] | None = None) -> int:
    """Print the first ``count`` training samples of ``data.output_path`` (built first unless current). Returns 0."""
    from moetune.data.build import build_dataset_unless_current
    from moetune.data.rendering import record_location
    from moetune.data.split import load_splits

    if count < 1:
        raise UserError(f"--show takes a positive number of samples, got {count}.")
    out = out or sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # the build's summary is not a sample: stdout stays the samples'
        build_dataset_unless_current(config)
    train, _ = load_splits(config)
    if not train:
        raise UserError(f"{config.data.output_path} has no training samples after the validation split.")
    tokenizer = _tokenizer(config, train)
    records = train[:count]
    encoded = encode(records, tokenizer, config.model.max_seq_length, max_target_length=config.data.max_target_length,
                     long_samples=config.data.long_samples, strict=config.data.strict)
    rows = encoded.dataset.select(range(min(count, len(encoded.dataset))))
    color = not as_json and out.isatty()
    for n, row in enumerate(rows, 1):
        record = records[row["record"]]
        if as_json:
            out.write(json.dumps({"sample": n, "source": record.get("source"), "kind": record.get("kind"),
                                  "where": record_location(record), "handling": row["handling"],
                                  "input_ids": row["input_ids"], "tokens": tokenizer.convert_ids_to_tokens(row["input_ids"]),
                                  "labels": row["labels"]}, ensure_ascii=False) + "\n")
            continue
        trained = sum(label != IGNORE_INDEX for label in row["labels"])
        how = "" if row["handling"] == "whole" else f", {row['handling']}"
        out.write(f"── sample {n}: {record.get('source')} {record.get('kind')}, {record_location(record)}: "
                  f"{len(row['input_ids']):,} tokens, {trained:,} trained{how}\n")
        out.write(marked_text(tokenizer, row["input_ids"], row["labels"], color) + "\n\n")
    if not as_json:
        legend = "trained tokens in green" if color else f"trained tokens between {OPEN} and {CLOSE}"
        skipped = {k: n for k, n in encoded.stats.items() if n}
        out.write(f"({legend}; {len(rows)} of the first {len(records)} training records"
                  + (f"; {', '.join(f'{n} {k}' for k, n in skipped.items())}" if skipped else "") + ")\n")
    return 0


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


def _tokenizer(config: Config, train: list[dict]):
    """The tokenizer training uses: the run's saved one, a named one, or one trained on the training records as the
    trainer trains it (not saved: training trains and saves its own)."""
    from moetune.data.records import record_text
    from moetune.data.tokenizer import load_or_train_tokenizer
    from moetune.run_dir import TOKENIZER_DIR

    if config.model.random_init and config.model.tokenizer is None:
        saved = Path(config.training.output_dir) / TOKENIZER_DIR
        if (saved / "tokenizer.json").is_file():
            return load_or_train_tokenizer(config, None, save_dir=saved)
        return load_or_train_tokenizer(config, (record_text(r) for r in train))
    return load_or_train_tokenizer(config)
