"""The LM loss of a forward pass: next-token cross-entropy summed over the label tokens, from the
final hidden states a chunk at a time where that gives the same loss (:mod:`moetune.models.loss.chunked`),
else from the full logits. Training, validation and evaluation all score through
:func:`forward_with_lm_loss`, so they agree on every token counted.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import weakref
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from moetune.data.encode import IGNORE_INDEX
from moetune.errors import UserError
from moetune.models.layout import innermost_model
from moetune.models.loss.chunked import (
    chunked_causal_lm_loss,
    chunked_sequence_logps,
    lm_head_weight_and_bias,
    lm_loss_implementation,
    logit_options,
)

logger = logging.getLogger(__name__)


def scored_token_count(labels: torch.Tensor) -> torch.Tensor:
    """How many tokens the shifted next-token loss scores: labels after the first position that are not -100."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def mean_loss_and_perplexity(loss_sum: float, tokens: float) -> tuple[float, float]:
    """The per-token mean of a summed loss, and exp of it capped at exp(50), so a diverged model reports a
    huge perplexity instead of overflowing."""
    loss = loss_sum / max(tokens, 1)
    return loss, math.exp(min(loss, 50.0))


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
                   reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy (labels shifted here) over labels that are not -100.

    ``reduction="sum"`` gives the total, for token-weighted averages across batches and processes.
    """
    shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing,
                           reduction=reduction)


def forward_with_lm_loss(model: torch.nn.Module, inputs: Mapping[str, Any], labels: torch.Tensor,
                         label_smoothing: float = 0.0) -> tuple[Any, torch.Tensor]:
    """The forward pass and its LM loss summed over the label tokens.

    Where it gives the same loss, the model computes logits for its last position only and the loss
    comes from the final hidden states a chunk of tokens at a time (:mod:`moetune.models.loss.chunked`),
    so the (tokens, vocab) float32 logits and their gradient never exist: for a 151k vocabulary they are
    the largest allocation of a LoRA step. Otherwise (no ``logits_to_keep``, a partitioned or unusual
    lm_head) the full logits are used. The choice is made and logged once per model.
    """
    out, chunked = _forward_for_the_loss(model, inputs)
    if chunked is not None:
        hidden, head, options = chunked
        loss_sum, _ = chunked_causal_lm_loss(hidden, head, labels, label_smoothing=label_smoothing, **options)
        return out, loss_sum
    return out, causal_lm_loss(out.logits, labels, label_smoothing, reduction="sum")


def forward_with_sequence_logps(model: torch.nn.Module, inputs: Mapping[str, Any],
                                labels: torch.Tensor) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The forward pass, each row's summed log-probability of its label tokens (float32, (B,)), and each row's
    label-token count ((B,)): what preference objectives score a sequence by.

    The same path as :func:`forward_with_lm_loss` (chunked from the final hidden states where that gives the
    model's own logits, decided once per model), so the two agree on every token."""
    out, chunked = _forward_for_the_loss(model, inputs)
    if chunked is not None:
        hidden, head, options = chunked
        return (out, *chunked_sequence_logps(hidden, head, labels, **options))
    return (out, *sequence_logps(out.logits, labels))


def _forward_for_the_loss(model: torch.nn.Module, inputs: Mapping[str, Any]):
    """(output, (final hidden states, lm_head, logit options)) when the loss may come from the hidden states a chunk
    at a time (the model then computes its last position's logits only), else (output with full logits, None)."""
    inner = innermost_model(model)
    head = _chunkable_lm_head(inner)
    if head is not None:
        with _final_hidden_states(inner) as final:
            out = model(**inputs, logits_to_keep=1)
        hidden = final[0]
        options = logit_options(inner.config)
        if _LM_LOSS_PATH.get(inner) or _hidden_states_give_logits(inner, head, hidden, out.logits, options):
            return out, (hidden, head, options)
    return model(**inputs), None


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed next-token log-probability of its labels (not -100; shifted here), from full logits,
    and each row's label-token count."""
    shift_labels = labels[:, 1:].to(logits.device)
    scored = shift_labels != IGNORE_INDEX
    logps = logits[:, :-1, :].float().log_softmax(dim=-1)
    token_logps = logps.gather(2, shift_labels.clamp_min(0).unsqueeze(2)).squeeze(2)
    return (token_logps * scored).sum(dim=1), scored.sum(dim=1)


@contextlib.contextmanager
def _final_hidden_states(inner: torch.nn.Module):
    """A one-slot list that holds the decoder's output hidden states (after the final norm) of the forward
    run inside the ``with``. Taken from the decoder module itself rather than ``output_hidden_states``,
    which would return every layer's states, each copied to float32 by accelerate's mixed precision."""
    slot: list[torch.Tensor] = []

    def keep(module, args, output):
        slot.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = inner.get_decoder().register_forward_hook(keep)
    try:
        yield slot
    finally:
        handle.remove()


# Per innermost model, decided once: True = chunked from the hidden states (checked on the first batch),
# False = full logits. Held beside the model, not on it, so the model's attributes stay its own.
_LM_LOSS_PATH: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()


def lm_loss_is_chunked(model: torch.nn.Module) -> bool | None:
    """Whether ``model``'s LM loss comes from its hidden states in chunks; None before its first batch."""
    return _LM_LOSS_PATH.get(innermost_model(model))


def use_full_logits(model: torch.nn.Module) -> None:
    """Score ``model`` from its full logits from now on (the reference path, for comparisons)."""
    _LM_LOSS_PATH[innermost_model(model)] = False


def _chunkable_lm_head(inner: torch.nn.Module) -> torch.nn.Module | None:
    """The model's lm_head when the chunked loss may apply to it (not ruled out earlier), else None."""
    decided = _LM_LOSS_PATH.get(inner)
    if decided is False:
        return None
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if decided:
        return head
    reason = None
    if (head is None or "logits_to_keep" not in inspect.signature(inner.forward).parameters
            or not hasattr(inner, "get_decoder")):
        reason = "the model computes its logits in one piece (no logits_to_keep)"
    elif inner.get_decoder() is inner:  # Llama-4's text model names no decoder whose output is the hidden states
        reason = "the model has no separate decoder to take the hidden states from"
    else:
        try:
            weight, _ = lm_head_weight_and_bias(head)
        except UserError as err:
            reason = str(err).split(";")[0]
        else:
            # ZeRO-3 and FSDP hold a shard of the weight outside the module's own forward.
            if hasattr(weight, "ds_id") or type(weight).__name__ == "DTensor":
                reason = "lm_head's weight is partitioned (ZeRO-3 / FSDP)"
    if reason is not None:
        _decide_lm_loss(inner, False, reason)
        return None
    return head


def _hidden_states_give_logits(inner, head, hidden: torch.Tensor, logits: torch.Tensor, options) -> bool:
    """Whether the last hidden state, through lm_head, reproduces the model's own logits (checked on the
    first batch): the families differ in what they return as hidden states and apply to logits."""
    with torch.no_grad():
        # Accelerate's mixed precision returns float32 hidden states from a model whose lm_head may be bf16.
        mine = head(hidden[:, -1:].to(lm_head_weight_and_bias(head)[0].dtype)).float()
        if options["logit_scale"] is not None:
            mine = mine * options["logit_scale"]
        if options["softcap"] is not None:
            mine = options["softcap"] * torch.tanh(mine / options["softcap"])
        theirs = logits[:, -1:].float()
        tolerance = 1e-4 if logits.dtype == torch.float32 else 2e-2
        same = mine.shape == theirs.shape and bool(((mine - theirs).abs() <= tolerance * (1 + theirs.abs())).all())
    _decide_lm_loss(inner, same, None if same else "the model's last hidden state does not reproduce its logits")
    return same


def _decide_lm_loss(inner, chunked: bool, reason: str | None) -> None:
    _LM_LOSS_PATH[inner] = chunked
    if chunked:
        logger.info("LM loss: %s, from the final hidden states (never the full logits)",
                    lm_loss_implementation(next(inner.parameters()).device))
    else:
        logger.info("LM loss: from the full logits (%s)", reason)


