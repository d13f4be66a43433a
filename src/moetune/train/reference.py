"""DPO's and KTO's reference model for a run: chosen once, before the first step (:mod:`moetune.models.loss.reference`).

- An adapter trains: the policy with its adapter switched off, nothing copied.
- No adapter (full-parameter, ESFT or router training): a frozen copy of the model as loaded, taken before
  ``accelerator.prepare``; :func:`check_reference_fits` says before any weight is loaded when the device cannot
  hold the copy beside the policy.
- ``training.precompute_ref_logps``: every training and validation sequence's reference log-probability in one
  pass before the first step (with the adapter off, or the policy itself before it trains), saved in the run
  folder so a resumed run reads them: once training has started the reference exists nowhere else.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moetune.errors import UserError
from moetune.models.loss.preference import REFERENCE_OBJECTIVES
from moetune.models.loss.reference import AdapterOff, FrozenCopy, Precomputed, Reference, has_adapter
from moetune.run_dir import REFERENCE_LOGPS_FILE

logger = logging.getLogger(__name__)
GIB = 2**30


def needs_frozen_copy(config, model) -> bool:
    """Whether the run's reference is a frozen copy of ``model``: a reference objective, nothing precomputed, no adapter."""
    t = config.training
    return t.objective in REFERENCE_OBJECTIVES and not t.precompute_ref_logps and not has_adapter(model)


def check_reference_fits(config, weight_bytes: int, adapter: bool) -> None:
    """Before any weight is loaded: a frozen reference copy that cannot fit beside the policy is a UserError.

    ``weight_bytes``: the model's weights as the run loads them; ``adapter``: whether an adapter trains (then the
    reference is the policy with it switched off and costs nothing)."""
    t = config.training
    if t.objective not in REFERENCE_OBJECTIVES or t.precompute_ref_logps or adapter:
        return
    memory, where = device_memory()
    if memory is None or 2 * weight_bytes <= memory:
        return
    raise UserError(
        f"training.objective {t.objective!r} without an adapter keeps a frozen copy of the model as its reference: "
        f"{weight_bytes / GIB:.1f} GiB of weights twice is {2 * weight_bytes / GIB:.1f} GiB before any gradient or "
        f"optimizer state, more than the {memory / GIB:.1f} GiB of {where}. Set training.precompute_ref_logps: true (the "
        "reference log-probabilities are computed once before training, so no copy is kept), or train an adapter "
        "(lora.enabled: true, whose switching off gives the reference).")


def device_memory() -> tuple[int | None, str]:
    """(bytes, what) of the memory the model and its copy would share: the first GPU's, or this machine's free RAM."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, f"GPU 0 ({torch.cuda.get_device_name(0)})"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), "this machine's free memory"
    except (ValueError, OSError, AttributeError):  # not a POSIX system that tells
        return None, "this machine"


def frozen_copy(model: torch.nn.Module, accelerator) -> torch.nn.Module:
    """A frozen copy of ``model`` as loaded (before ``accelerator.prepare``); its memory is logged."""
    if _zero3(accelerator):
        raise UserError("A frozen reference copy cannot be made under DeepSpeed ZeRO-3, whose parameters are sharded "
                        "across processes; set training.precompute_ref_logps: true, or train an adapter (lora.enabled: true).")
    reference = copy.deepcopy(model).requires_grad_(False).eval()
    size = sum(p.numel() * p.element_size() for p in reference.parameters())
    if accelerator.is_main_process:
        print(f"reference: a frozen copy of the model ({size / GIB:.2f} GiB of weights), as no adapter trains",
              file=sys.stderr)
    return reference


def make_references(config, model, copied: torch.nn.Module | None, accelerator, train_loader,
                    val_loader) -> tuple[Reference | None, Reference | None]:
    """(training reference, validation reference) for the prepared ``model`` and loaders; None for both when the
    objective uses no reference. ``copied``: :func:`frozen_copy`'s copy when the run needs one."""
    t = config.training
    if t.objective not in REFERENCE_OBJECTIVES:
        return None, None
    if not t.precompute_ref_logps:
        # Not through accelerator.prepare: a prepared model is saved into every checkpoint, and the copy never changes.
        reference = FrozenCopy(copied.to(accelerator.device), accelerator.autocast) if copied is not None else AdapterOff()
        return reference, reference
    path = Path(t.output_dir) / REFERENCE_LOGPS_FILE
    loaders = {"train": train_loader, "eval": val_loader}
    if path.is_file():
        tables = torch.load(path, map_location=accelerator.device)
        _check_saved_tables(tables, loaders, path)
        if accelerator.is_main_process:
            print(f"reference: log-probabilities read from {path}", file=sys.stderr)
    else:
        if copied is None and not has_adapter(model) and _checkpoint_exists(t.output_dir):
            raise UserError(f"{path} is missing, and the reference log-probabilities of a run without an adapter can only "
                            "be computed before its first step; start the run again in an empty output_dir.")
        source = AdapterOff() if has_adapter(model) else FrozenCopy(model)  # the policy before it trains
        tables = {name: reference_table(source, model, loader, accelerator) for name, loader in loaders.items()
                  if loader is not None}
        if accelerator.is_main_process:
            torch.save({name: table.cpu() for name, table in tables.items()}, path)
        accelerator.wait_for_everyone()
    return Precomputed(tables["train"]), Precomputed(tables["eval"]) if "eval" in tables else None


@torch.no_grad()
def reference_table(source: Reference, model, loader, accelerator) -> torch.Tensor:
    """(sequences, 2) float32: each pair's (chosen, rejected) or each unpaired row's (own, KL) reference
    log-probability, over every process's share of ``loader`` (in evaluation mode: no dropout, no random routing)."""
    size = len(loader.dataset)
    table = torch.zeros(size, 2, dtype=torch.float64, device=accelerator.device)
    seen = torch.zeros(size, dtype=torch.float64, device=accelerator.device)
    was_training = model.training
    model.eval()
    for batch in tqdm(loader, desc="reference log-probs", disable=not accelerator.is_local_main_process):
        index = batch["pair_index"].to(table.device)
        logps = source.logps(model, batch)
        columns = (logps, source.logps(model, batch, "kl")) if "desirable" in batch else logps.chunk(2)
        table[index, 0], table[index, 1] = columns[0].double(), columns[1].double()
        seen[index] = 1.0  # a row seen twice (an uneven last batch repeats rows) holds one value
    model.train(was_training)
    table, seen = accelerator.reduce(table, "sum"), accelerator.reduce(seen, "sum")
    return (table / seen.clamp_min(1).unsqueeze(1)).float()


def _check_saved_tables(tables: dict, loaders: dict, path: Path) -> None:
    for name, loader in loaders.items():
        if loader is None:
            continue
        saved = tables.get(name)
        if saved is None or saved.shape[0] != len(loader.dataset):
            found = "none" if saved is None else f"{saved.shape[0]:,}"
            raise UserError(f"{path} holds reference log-probabilities for {found} {name} sequences, but the {name} data "
                            f"has {len(loader.dataset):,}: the data changed since the run started. Resume with the data "
                            "it started with, or start again in an empty output_dir.")


def _checkpoint_exists(output_dir: str) -> bool:
    from moetune.run_dir import latest_checkpoint

    return latest_checkpoint(output_dir) is not None


def _zero3(accelerator) -> bool:
    plugin = accelerator.state.deepspeed_plugin
    return plugin is not None and plugin.zero_stage == 3
