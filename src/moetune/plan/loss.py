"""Memory of the LM loss at one micro-batch (what :func:`moetune.models.loss.lm_loss.forward_with_lm_loss`
runs), every position counted as labelled (the most it can be).

Chunked (the default where the lm_head is a plain Linear that is not partitioned: everything but ZeRO-3 and
FSDP): the gradient w.r.t. the final hidden states is computed in the forward pass and kept (tokens x
hidden, in the compute dtype), with the lm_head's own gradient when it trains; while it runs, the labelled
hidden states are gathered (tokens x hidden) and one chunk of 1,024 tokens' logits exists in float32, plus
half that again for its 16-bit copy (:mod:`moetune.models.loss.chunked`, which states these bounds).

Full logits: the (tokens x vocab) logits in the compute dtype, their float32 copy and log-softmax (kept for
backward), and in backward the float32 gradient: 2 + 12 bytes per logit with 16-bit weights.
"""

from __future__ import annotations

from dataclasses import dataclass

CHUNK_TOKENS = 1024  # chunked_causal_lm_loss's default


@dataclass(frozen=True)
class LossMemory:
    """Bytes per micro-batch row (``per_row``) and independent of the batch (``fixed``); ``chunked``: which path."""

    chunked: bool
    per_row: int
    fixed: int

    def at(self, batch: int) -> int:
        return self.fixed + batch * self.per_row


def loss_memory(*, tokens_per_row: int, hidden: int, vocab: int, compute_bytes: int, chunked: bool,
                lm_head_trains: bool = False, softcap: bool = False) -> LossMemory:
    """The LM loss's memory for rows of ``tokens_per_row`` tokens (see the module doc)."""
    if not chunked:
        return LossMemory(chunked=False, per_row=tokens_per_row * vocab * (compute_bytes + 12), fixed=0)
    chunk = CHUNK_TOKENS * vocab * 4
    if compute_bytes < 4:
        chunk += chunk // 2
    if softcap:
        chunk += CHUNK_TOKENS * vocab * 4
    head_gradient = vocab * hidden * compute_bytes if lm_head_trains else 0
    return LossMemory(chunked=True, per_row=2 * tokens_per_row * hidden * compute_bytes, fixed=chunk + head_gradient)
