"""Records -> token ids and labels, computed once and cached on disk with `datasets`.

Each record becomes ``[bos] + tokens + [eos]``. Labels copy the ids except where no loss is
wanted (-100): the prompt of a prompt/completion record, and the first token of every sample
(in a packed row, that position would be predicted from the *previous* sample's last token).
A completion longer than ``max_target_length`` keeps its first tokens and no eos (it did not end).
A sample longer than ``max_seq_length`` is cut into consecutive windows, each a sample of its own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100
# Bump when the encoding below changes, so old caches are not reused.
_ENCODING_VERSION = "1"


def encode_records(records: Sequence[dict[str, Any]], tokenizer, max_seq_length: int, cache_dir: str | Path | None = None,
                   max_target_length: int | None = None, label_ids: Sequence[int] | None = None):
    """A ``datasets.Dataset`` with columns ``input_ids``, ``labels`` and ``length`` (one row per window).

    With ``label_ids`` (one per record, :mod:`moetune.data.expert_labels`) it also has ``expert_label_id``:
    every window of a record carries the record's id.

    With ``cache_dir`` the result is stored there under a key made of the records' content, the
    tokenizer's vocabulary, ``max_seq_length`` and ``max_target_length``; an identical later call
    loads it instead of tokenizing again.
    """
    from datasets import Dataset

    columns: dict[str, list] = {"text": [], "prompt": [], "completion": []}
    for record in records:
        columns["text"].append(record.get("text"))
        columns["prompt"].append(record.get("prompt"))
        columns["completion"].append(record.get("completion"))
    if label_ids is not None:
        columns["expert_label_id"] = list(label_ids)
    raw = Dataset.from_dict(columns)
    kwargs: dict[str, Any] = {}
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        key = _cache_key(columns, tokenizer, max_seq_length, max_target_length)
        kwargs = {"cache_file_name": str(Path(cache_dir) / f"encoded-{key}.arrow"), "load_from_cache_file": True}
    return raw.map(
        _encode_batch, batched=True, batch_size=1000, remove_columns=list(columns),
        fn_kwargs={"tokenizer": tokenizer, "max_len": max_seq_length, "max_target": max_target_length},
        desc="Tokenizing", **kwargs,
    )


def _encode_batch(batch: dict[str, list], tokenizer, max_len: int, max_target: int | None = None) -> dict[str, list]:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    n = len(batch["text"])
    plain = [i for i in range(n) if batch["text"][i] is not None]
    paired = [i for i in range(n) if batch["text"][i] is None]
    encoded: dict[int, tuple[list[int], list[int]]] = {}
    if plain:
        for i, ids in zip(plain, _ids(tokenizer, [batch["text"][i] for i in plain]), strict=True):
            full = bos + ids + eos
            encoded[i] = (full, list(full))
    if paired:
        for i, (ids, n_prompt) in zip(paired, _paired_ids(tokenizer, [batch["prompt"][i] for i in paired],
                                                         [batch["completion"][i] for i in paired]), strict=True):
            cut = max_target is not None and len(ids) - n_prompt > max_target
            full = bos + (ids[:n_prompt + max_target] if cut else ids + eos)
            encoded[i] = (full, [IGNORE_INDEX] * (len(bos) + n_prompt) + full[len(bos) + n_prompt:])
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
    label_ids = batch.get("expert_label_id")
    if label_ids is not None:
        out["expert_label_id"] = []
    for i in range(n):
        ids, labels = encoded[i]
        for start in range(0, len(ids), max_len):
            window_labels = labels[start:start + max_len]
            window_labels[0] = IGNORE_INDEX
            if all(label == IGNORE_INDEX for label in window_labels):
                continue  # a window of prompt only teaches nothing
            out["input_ids"].append(ids[start:start + max_len])
            out["labels"].append(window_labels)
            out["length"].append(len(window_labels))
            if label_ids is not None:
                out["expert_label_id"].append(label_ids[i])
    return out


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _paired_ids(tokenizer, prompts: list[str], completions: list[str]) -> list[tuple[list[int], int]]:
    """(ids of prompt + completion, number of leading prompt tokens) for each pair.

    The pair is tokenized as one text and split by character offsets: tokenizing the completion
    alone would add a second word-start marker in SentencePiece vocabularies (Llama, Mixtral), so
    training would see token sequences that generation never produces. A token straddling the
    boundary counts as prompt.
    """
    if not getattr(tokenizer, "is_fast", False):  # slow tokenizers have no offsets: tokenize the parts
        return [(p + c, len(p)) for p, c in zip(_ids(tokenizer, prompts), _ids(tokenizer, completions), strict=True)]
    texts = [p + c for p, c in zip(prompts, completions, strict=True)]
    out = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    pairs = []
    for ids, offsets, prompt in zip(out["input_ids"], out["offset_mapping"], prompts, strict=True):
        n_prompt = sum(1 for start, _ in offsets if start < len(prompt))
        pairs.append((ids, n_prompt))
    return pairs


def _cache_key(columns: dict[str, list], tokenizer, max_seq_length: int, max_target_length: int | None) -> str:
    digest = hashlib.blake2b(digest_size=16)
    # An uncapped key is the one earlier versions made, so their caches stay valid.
    cap = "" if max_target_length is None else f"target={max_target_length}|"
    digest.update(f"{_ENCODING_VERSION}|{max_seq_length}|{tokenizer.bos_token_id}|{tokenizer.eos_token_id}|{cap}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else repr(tokenizer.get_vocab()).encode())
    for name in ("text", "prompt", "completion"):
        for value in columns[name]:
            digest.update(b"\x00" if value is None else value.encode("utf-8", "surrogatepass") + b"\x01")
    if "expert_label_id" in columns:  # absent from the key otherwise, so caches without label ids stay valid
        digest.update(b"labels|" + ",".join(map(str, columns["expert_label_id"])).encode())
    return digest.hexdigest()
