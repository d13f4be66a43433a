"""Where DPO's and KTO's reference log-probabilities come from: three ways, one interface.

- :class:`AdapterOff`: the policy itself with its adapter switched off (PEFT's ``disable_adapter``): the frozen
  base model is the reference, and no second copy of the weights exists. The default when an adapter trains.
- :class:`FrozenCopy`: a frozen copy of the model as loaded, for full-parameter, expert (ESFT) or router
  training, where no adapter can be switched off; it costs the weights' memory again.
- :class:`Precomputed`: a table of every sequence's reference log-probability, computed in one pass before
  training (``training.precompute_ref_logps``); looked up by the batch's ``pair_index``.

A reference forward runs without gradients and outside the routing capture, so the balance loss, expert
usage and router supervision see the policy's routed tokens only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from moetune.models.loss.lm_loss import forward_with_sequence_logps

Rows = Literal["main", "kl"]
"""Which rows of a batch: its own (a pair batch's chosen then rejected rows, an unpaired batch's rows), or an
unpaired batch's KL rows (mismatched prompt/completion, for KTO's KL estimate)."""

# Batch entries that are not the model's inputs.
_NOT_INPUTS = ("labels", "expert_label_ids", "pair_index", "desirable", "kl_input_ids", "kl_attention_mask", "kl_labels")


def rows_of(batch, rows: Rows) -> tuple[dict, torch.Tensor]:
    """(model inputs, labels) of a batch's main rows or its KL rows."""
    if rows == "kl":
        return {"input_ids": batch["kl_input_ids"], "attention_mask": batch["kl_attention_mask"]}, batch["kl_labels"]
    return {k: v for k, v in batch.items() if k not in _NOT_INPUTS}, batch["labels"]


class Reference(Protocol):
    """The reference model's summed log-probability of each sequence of a batch, without gradients."""

    def logps(self, model: torch.nn.Module, batch, rows: Rows = "main") -> torch.Tensor:
        """(rows,) float32: each row's summed log-probability of its label tokens under the reference."""


@dataclass
class AdapterOff:
    """The policy with its adapters switched off."""

    def logps(self, model, batch, rows: Rows = "main") -> torch.Tensor:
        inputs, labels = rows_of(batch, rows)
        with torch.no_grad(), peft_model_of(model).disable_adapter():
            _, sums, _ = forward_with_sequence_logps(model, {**inputs, "use_cache": False}, labels)
        return sums


@dataclass
class FrozenCopy:
    """A frozen copy of the model as it was before training. ``autocast``: the mixed-precision context the policy's
    forward runs under (the trainer's ``accelerator.autocast``), so both score in the same precision."""

    model: torch.nn.Module
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    def logps(self, model, batch, rows: Rows = "main") -> torch.Tensor:
        inputs, labels = rows_of(batch, rows)
        with torch.no_grad(), self.autocast():
            _, sums, _ = forward_with_sequence_logps(self.model, {**inputs, "use_cache": False}, labels)
        return sums.float()


@dataclass
class Precomputed:
    """A (sequences, 2) table, one row per pair (chosen, rejected) or per unpaired row (its own, its KL row)."""

    table: torch.Tensor

    def logps(self, model, batch, rows: Rows = "main") -> torch.Tensor:
        index = batch["pair_index"].to(self.table.device)
        found = self.table.index_select(0, index)
        if "desirable" in batch:  # an unpaired batch: column 0 its rows, column 1 their KL rows
            return found[:, 1 if rows == "kl" else 0]
        return torch.cat([found[:, 0], found[:, 1]])


def peft_model_of(model: torch.nn.Module):
    """The PEFT model inside ``model`` (DDP / DeepSpeed / compile wrappers unwrapped); ValueError when there is none."""
    from peft import PeftModel

    seen = model
    for _ in range(8):
        if isinstance(seen, PeftModel):
            return seen
        inner = getattr(seen, "module", None) or getattr(seen, "_orig_mod", None)
        if inner is None:
            break
        seen = inner
    raise ValueError(f"{type(model).__name__} holds no PEFT adapter to switch off")


def has_adapter(model: torch.nn.Module) -> bool:
    """Whether ``model`` trains through a PEFT adapter (whose switching off gives the reference)."""
    with contextlib.suppress(ValueError):
        return peft_model_of(model) is not None
    return False
