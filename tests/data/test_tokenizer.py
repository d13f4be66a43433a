"""A byte-level BPE trained on the data when no pretrained tokenizer applies."""

from __future__ import annotations

from pathlib import Path

import pytest

from moetune.config import load_config
from moetune.data.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    load_or_train_tokenizer,
    load_run_tokenizer,
    pad_token_id,
    saved_tokenizer_folder,
    tokenizer_training_texts,
    with_pad_token,
)
from moetune.errors import UserError

TEXTS = ["pub fn add(a: i64, b: i64) -> i64 { a + b }", "impl Money { fn is_zero(&self) -> bool { self.minor == 0 } }",
         "Question: What is a refund?\nAnswer: Money returned to the payer.", "fn f() { let s = \"héllo wörld 🦀\"; }"] * 20


def _random_init_config(vocab: int = 300):
    return load_config(None, ["model.random_init=true", "model.architecture=mixtral", f"model.tokenizer_vocab_size={vocab}"])


def test_trained_tokenizer_round_trips_any_text_and_has_special_tokens(tmp_path: Path):
    tokenizer = load_or_train_tokenizer(_random_init_config(), TEXTS, save_dir=tmp_path / "tok")
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert 256 < len(tokenizer) <= 300
    unseen = "struct Ünïcode<'a> { x: &'a str } // 漢字 \t\n"
    assert tokenizer.decode(tokenizer(unseen, add_special_tokens=False)["input_ids"]) == unseen  # byte-level: no unknowns


def test_saved_tokenizer_reloads_identically(tmp_path: Path):
    trained = load_or_train_tokenizer(_random_init_config(), TEXTS, save_dir=tmp_path / "tok")
    reloaded = load_or_train_tokenizer(_random_init_config(), None, save_dir=tmp_path / "tok")
    assert reloaded(TEXTS[1])["input_ids"] == trained(TEXTS[1])["input_ids"]
    assert reloaded.eos_token_id == trained.eos_token_id
    with pytest.raises(UserError, match="no tokenizer was saved"):
        load_or_train_tokenizer(_random_init_config(), None, save_dir=tmp_path / "elsewhere")


def test_a_named_tokenizer_folder_is_loaded_and_a_missing_one_is_a_user_error(tmp_path: Path):
    load_or_train_tokenizer(_random_init_config(), TEXTS, save_dir=tmp_path / "tok")
    config = load_config(None, [f"model.tokenizer={tmp_path / 'tok'}"])
    assert load_or_train_tokenizer(config).eos_token == EOS_TOKEN
    with pytest.raises(UserError, match="cannot load a tokenizer"):
        load_or_train_tokenizer(load_config(None, [f"model.tokenizer={tmp_path / 'missing'}"]))


def test_a_tokenizer_without_a_pad_token_pads_with_its_end_of_sequence_token(tmp_path: Path):
    tokenizer = load_or_train_tokenizer(_random_init_config(), ["fn main() {}", "let x = 1;"] * 20)
    assert pad_token_id(tokenizer) == tokenizer.convert_tokens_to_ids(PAD_TOKEN)  # its own when it has one
    tokenizer.pad_token = None
    assert pad_token_id(tokenizer) == tokenizer.eos_token_id
    assert with_pad_token(tokenizer) is tokenizer and tokenizer.pad_token == EOS_TOKEN


def test_which_saved_tokenizer_a_run_uses(tmp_path: Path):
    run, named = tmp_path / "run", tmp_path / "named"
    load_or_train_tokenizer(_random_init_config(), TEXTS, save_dir=named)
    random_init = load_config(None, ["model.random_init=true", "model.architecture=mixtral", f"training.output_dir={run}"])
    pretrained = load_config(None, [f"model.tokenizer={named}", f"training.output_dir={run}"])
    checkpoint, final = run / "checkpoint-4", run
    checkpoint.mkdir(parents=True)
    # Nothing saved yet: the config's own (trained on the data, or the named one).
    assert saved_tokenizer_folder(random_init) is None and saved_tokenizer_folder(pretrained, checkpoint) is None
    load_or_train_tokenizer(_random_init_config(), TEXTS, save_dir=run / "tokenizer")
    # The run folder's tokenizer: for a checkpoint without its own, and for a tokenizer trained on the data.
    assert saved_tokenizer_folder(random_init, checkpoint) == run / "tokenizer"
    assert saved_tokenizer_folder(pretrained, checkpoint) == run / "tokenizer"
    assert saved_tokenizer_folder(random_init) == run / "tokenizer"
    assert saved_tokenizer_folder(pretrained) is None  # a named tokenizer is the config's, read afresh
    # A checkpoint's (or a final adapter's) own tokenizer comes first.
    load_or_train_tokenizer(_random_init_config(), TEXTS, save_dir=checkpoint)
    assert saved_tokenizer_folder(random_init, checkpoint) == checkpoint
    load_or_train_tokenizer(_random_init_config(), TEXTS, save_dir=final)
    assert saved_tokenizer_folder(pretrained, final) == final


def test_a_run_tokenizer_is_trained_only_when_none_is_saved_and_is_saved_where_asked(tmp_path: Path):
    config = load_config(None, ["model.random_init=true", "model.architecture=mixtral", "model.tokenizer_vocab_size=300",
                                f"training.output_dir={tmp_path}"])
    asked = []

    def texts():
        asked.append(True)
        return tokenizer_training_texts([{"text": text} for text in TEXTS[:2]] + [{"prompt": "Q:", "completion": TEXTS[2]}])

    with pytest.raises(UserError, match="none was saved"):
        load_run_tokenizer(config)
    trained = load_run_tokenizer(config, training_texts=texts, save_dir=tmp_path / "tokenizer")
    assert asked == [True] and (tmp_path / "tokenizer" / "tokenizer.json").is_file()
    saved = {p.name: p.read_bytes() for p in (tmp_path / "tokenizer").iterdir()}
    reloaded = load_run_tokenizer(config, training_texts=texts, save_dir=tmp_path / "tokenizer")
    assert asked == [True] and reloaded.get_vocab() == trained.get_vocab()
    assert {p.name: p.read_bytes() for p in (tmp_path / "tokenizer").iterdir()} == saved  # not written again
    assert list(tokenizer_training_texts([{"text": "a"}, {"prompt": "b", "completion": "c"}])) == ["a", "bc"]
    (tmp_path / "tokenizer" / "tokenizer.json").write_text("not json")
    with pytest.raises(UserError, match=f"the tokenizer saved in {tmp_path / 'tokenizer'} cannot be read"):
        load_run_tokenizer(config)
