"""The tokenizer: a named one (hub id or folder), or a byte-level BPE trained on the dataset.

Training one only happens for a randomly initialised model with no ``model.tokenizer``: there is
no pretrained vocabulary to stay compatible with, and nothing can be downloaded offline.
Which tokenizer a run, a checkpoint or an evaluation uses is decided once, by :func:`saved_tokenizer_folder`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from moetune.config.schema import Config
from moetune.errors import UserError
from moetune.run_dir import TOKENIZER_DIR, holds_tokenizer

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<s>", "</s>", "<pad>"
# Enough text for stable merges at a few thousand entries; more only slows training down.
MAX_TRAINING_CHARS = 20_000_000


def load_or_train_tokenizer(config: Config, texts: Iterable[str] | None = None, save_dir: str | Path | None = None):
    """Return a ``PreTrainedTokenizerFast`` with bos, eos and pad tokens set.

    - ``model.tokenizer`` set, or a pretrained model: ``AutoTokenizer.from_pretrained(model.tokenizer
      or model.name)``; a missing pad token becomes the eos token.
    - ``model.random_init`` with no ``model.tokenizer``: a byte-level BPE of ``model.tokenizer_vocab_size``
      entries trained on ``texts`` (the first MAX_TRAINING_CHARS characters). Without ``texts``,
      the tokenizer previously saved in ``save_dir`` is loaded (evaluation of such a run).

    ``save_dir`` (optional) receives ``save_pretrained`` output so checkpoints carry their tokenizer.
    """
    model = config.model
    if model.tokenizer is None and model.random_init:
        if texts is None:
            if save_dir is None or not holds_tokenizer(save_dir):
                raise UserError("model.random_init with no model.tokenizer trains a tokenizer on the data; "
                                "no texts were given and no tokenizer was saved before.")
            return _from_pretrained(str(save_dir))
        tokenizer = train_bpe_tokenizer(texts, model.tokenizer_vocab_size)
    else:
        tokenizer = _from_pretrained(model.tokenizer or model.name, trust_remote_code=model.trust_remote_code)
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def trains_tokenizer_on_data(config: Config) -> bool:
    """Whether the config's tokenizer is a BPE trained on the data (random_init with no model.tokenizer)."""
    return config.model.random_init and config.model.tokenizer is None


def saved_tokenizer_folder(config: Config, model_dir: str | Path | None = None) -> Path | None:
    """The folder whose saved tokenizer a run uses, or None for the config's own (named, or trained on the data).

    With ``model_dir`` (a checkpoint, a final adapter or a merged model): the tokenizer saved in it,
    else the run folder's ``tokenizer/`` beside it (a checkpoint-<step> inside a run folder).
    Otherwise, and when neither holds one: the ``tokenizer/`` of ``training.output_dir`` when the
    config trains its tokenizer on the data (retraining could differ once the data changed), and
    None for a named tokenizer, which the config names afresh each time.
    """
    if model_dir is not None:
        for folder in (Path(model_dir), Path(model_dir).parent / TOKENIZER_DIR):
            if holds_tokenizer(folder):
                return folder
    run_tokenizer = Path(config.training.output_dir) / TOKENIZER_DIR
    if trains_tokenizer_on_data(config) and holds_tokenizer(run_tokenizer):
        return run_tokenizer
    return None


def load_run_tokenizer(config: Config, model_dir: str | Path | None = None,
                       training_texts: Callable[[], Iterable[str]] | None = None, save_dir: str | Path | None = None):
    """The tokenizer :func:`saved_tokenizer_folder` decides on, with a pad token; saved into ``save_dir`` when given
    (unless it was read from there).

    ``training_texts`` gives the texts to train a tokenizer on when the config trains one and none
    was saved (called only then: reading the data is not free); without it that case is a UserError.
    """
    folder = saved_tokenizer_folder(config, model_dir)
    if folder is not None:
        tokenizer = _from_pretrained(str(folder), trust_remote_code=config.model.trust_remote_code,
                                     where=f"the tokenizer saved in {folder}")
    elif trains_tokenizer_on_data(config):
        if training_texts is None:
            raise UserError(f"model.random_init with no model.tokenizer trains a tokenizer on the data, and none was saved "
                            f"in {Path(config.training.output_dir) / TOKENIZER_DIR}"
                            f"{f' or {model_dir}' if model_dir is not None else ''}; train the run first (`moetune train`) "
                            "or name the tokenizer with model.tokenizer.")
        tokenizer = train_bpe_tokenizer(training_texts(), config.model.tokenizer_vocab_size)
    else:
        tokenizer = _from_pretrained(config.model.tokenizer or config.model.name,
                                     trust_remote_code=config.model.trust_remote_code)
    # Saving a tokenizer back where it was read would rewrite its files (transformers adds keys).
    if save_dir is not None and (folder is None or Path(save_dir).resolve() != folder.resolve()):
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def tokenizer_training_texts(records: Iterable[dict]) -> Iterator[str]:
    """The text of each record a tokenizer trained on the data learns from."""
    return (r["text"] if "text" in r else r["prompt"] + r["completion"] for r in records)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE (any byte sequence encodes, no unknown token) wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD_TOKEN, BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(_capped(texts, MAX_TRAINING_CHARS), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, clean_up_tokenization_spaces=False)


def _from_pretrained(name: str, trust_remote_code: bool = False, where: str | None = None):
    """``where``: a saved tokenizer's folder, named in the error instead of the config's keys."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        if where is not None:
            raise UserError(f"{where} cannot be read ({err}).") from None
        raise UserError(f"model.tokenizer / model.name: cannot load a tokenizer from {name!r} ({err}). Give a local "
                        "folder or a hub id reachable from this machine, or set model.random_init: true to train one "
                        "on the data.") from None
    return with_pad_token(tokenizer)


def with_pad_token(tokenizer):
    """``tokenizer`` with a pad token: its own, else its end-of-sequence token (causal LMs often ship none).

    Padded positions carry no loss and no attention, so which token pads does not change any result.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pad_token_id(tokenizer) -> int:
    """The id batches are padded with (see :func:`with_pad_token`)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _capped(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    total = 0
    for text in texts:
        if total >= max_chars:
            return
        total += len(text)
        yield text
