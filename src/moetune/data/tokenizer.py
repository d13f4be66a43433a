"""The tokenizer: a named one (hub id or folder), or a byte-level BPE trained on the dataset.

Training one only happens for a randomly initialised model with no ``model.tokenizer``: there is
no pretrained vocabulary to stay compatible with, and nothing can be downloaded offline.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from moetune.config.schema import Config
from moetune.data.chat_templates import apply_chat_template_setting, control_tokens, read_chat_template
from moetune.errors import UserError

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

    ``data.chat_template`` (when set) becomes the tokenizer's chat template; a tokenizer trained here gets its
    control tokens as special tokens. ``save_dir`` (optional) receives ``save_pretrained`` output so checkpoints
    carry their tokenizer, template included.
    """
    model = config.model
    setting = config.data.chat_template
    if model.tokenizer is None and model.random_init:
        if texts is None:
            if save_dir is None or not (Path(save_dir) / "tokenizer.json").is_file():
                raise UserError("model.random_init with no model.tokenizer trains a tokenizer on the data; "
                                "no texts were given and no tokenizer was saved before.")
            return apply_chat_template_setting(_from_pretrained(str(save_dir)), setting)
        # A template's control tokens (<|im_start|> ...) must each be one token of the vocabulary it is trained with.
        special = control_tokens(read_chat_template(setting)) if setting is not None else []
        tokenizer = train_bpe_tokenizer(texts, model.tokenizer_vocab_size, special)
    else:
        tokenizer = _from_pretrained(model.tokenizer or model.name, trust_remote_code=model.trust_remote_code)
    apply_chat_template_setting(tokenizer, setting)
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, extra_special_tokens: Sequence[str] = ()):
    """A byte-level BPE (any byte sequence encodes, no unknown token) wrapped as a PreTrainedTokenizerFast.

    ``extra_special_tokens`` (a chat template's control tokens) are added after pad, bos and eos.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *extra_special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(_capped(texts, MAX_TRAINING_CHARS), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                                        pad_token=PAD_TOKEN, clean_up_tokenization_spaces=False)
    if extra_special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(extra_special_tokens)})
    return tokenizer


def _from_pretrained(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
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
