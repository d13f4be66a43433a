"""Tokenize: labels mask the prompt and each window's first token, long samples become windows, a disk cache."""

from __future__ import annotations

from pathlib import Path

from moetune.data.encode import IGNORE_INDEX, encode_records


def test_labels_mask_the_prompt_and_each_sample_start_and_long_samples_become_windows(mixed_records, mixed_tokenizer):
    tokenizer = mixed_tokenizer
    qa = mixed_records[-1]
    (encoded,) = encode_records([qa], tokenizer, 64)
    prompt_ids = tokenizer(qa["prompt"], add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(qa["completion"], add_special_tokens=False)["input_ids"]
    assert encoded["input_ids"] == [tokenizer.bos_token_id, *prompt_ids, *answer_ids, tokenizer.eos_token_id]
    assert encoded["labels"] == [IGNORE_INDEX] * (1 + len(prompt_ids)) + answer_ids + [tokenizer.eos_token_id]

    long_text = {"text": " ".join(f"x{i}" for i in range(200))}
    windows = encode_records([long_text], tokenizer, 16)
    assert all(length <= 16 for length in windows["length"])
    assert sum(windows["length"]) == len(tokenizer(long_text["text"], add_special_tokens=False)["input_ids"]) + 2
    assert all(labels[0] == IGNORE_INDEX for labels in windows["labels"])


def test_encoding_is_cached_on_disk(tmp_path: Path, mixed_records, mixed_tokenizer):
    first = encode_records(mixed_records, mixed_tokenizer, 32, cache_dir=tmp_path)
    cached = list(tmp_path.glob("encoded-*.arrow"))
    assert len(cached) == 1
    again = encode_records(mixed_records, mixed_tokenizer, 32, cache_dir=tmp_path)
    assert again["input_ids"] == first["input_ids"] and list(tmp_path.glob("encoded-*.arrow")) == cached
    encode_records(mixed_records, mixed_tokenizer, 24, cache_dir=tmp_path)  # another max length: another cache entry
    assert len(list(tmp_path.glob("encoded-*.arrow"))) == 2
