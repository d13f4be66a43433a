"""Expert-specialised fine-tuning (ESFT, Wang et al. 2024): only the experts a task uses train.

``moe.expert_training: esft`` reads the selection ``moetune experts`` wrote (``moe.esft.experts``:
per MoE layer, the experts to train) and freezes everything else, the router and attention included.

Fused experts (Mixtral, Qwen-MoE, OLMoE, gpt-oss, DeepSeek: one (E, ...) tensor per projection)
stay frozen; each gets a parametrization holding a trainable copy of the selected experts' slices
only, written into the fused tensor on the fly (``index_copy``). So gradients and optimizer state
exist for the selected experts alone, and before any step the model computes exactly what the base
does. Per-expert modules (upcycled MPT's ``experts.N``) need no wrapper: the selected ones train.

A checkpoint or final artefact holds :data:`WEIGHTS_FILE` (the selected experts' weights, named
after the base parameter they replace) and :data:`SELECTION_FILE` (the selection). Merging writes
the slices back into the fused tensors and leaves a plain model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from moetune.errors import ConfigError, UserError
from moetune.models.layout import (
    EXPERTS_NAME,
    MoeBlockInfo,
    count_experts,
    find_moe_blocks,
    innermost_model,
)
from moetune.models.trainable.counts import log_trainable_parameters
from moetune.run_dir import ESFT_FILES

logger = logging.getLogger(__name__)

SELECTION_FILE, WEIGHTS_FILE = ESFT_FILES  # the run folder's names for them
_SELECTION_ATTR = "moetune_esft_selection"


class SelectedExperts(nn.Module):
    """Parametrization of a fused (E, ...) expert tensor: the rows ``index`` come from ``selected``."""

    def __init__(self, base: torch.Tensor, index: list[int]):
        super().__init__()
        self.register_buffer("index", torch.tensor(index, dtype=torch.long, device=base.device), persistent=False)
        self.selected = nn.Parameter(base.detach()[self.index].clone())

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        return base.index_copy(0, self.index, self.selected.to(base.dtype))


def read_selection(path: str | Path, key: str = "moe.esft.experts") -> list[list[int]]:
    """The experts to train per MoE layer from an experts.json (``moetune experts``) or a saved
    :data:`SELECTION_FILE`; a UserError naming ``key`` for a missing or malformed file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{key}: {path} does not exist; write it with `moetune experts --config ... --output {path}`.") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{key}: {path} is not a readable JSON file ({err}).") from None
    selected = data.get("selected") if isinstance(data, dict) else None
    if not (isinstance(selected, list) and all(isinstance(layer, list) and all(isinstance(e, int) and e >= 0 for e in layer)
                                               for layer in selected)):
        raise UserError(f"{key}: {path} has no \"selected\" list of expert indices per MoE layer (e.g. [[0, 3], [1]]); "
                        "write it with `moetune experts`.")
    if not any(selected):
        raise UserError(f"{key}: {path} selects no expert in any layer, so nothing would train; run `moetune experts` "
                        "with a higher --threshold.")
    return [sorted(set(layer)) for layer in selected]


def apply_esft_plan(model: nn.Module, config, family=None) -> nn.Module:
    """Freeze ``model`` but the experts ``moe.esft.experts`` selects; returns ``model``."""
    selection = read_selection(config.moe.esft.experts)
    install_selection(model, selection, family, key="moe.esft.experts")
    log_trainable_parameters(model)
    return model


def install_selection(model: nn.Module, selection: list[list[int]], family=None, key: str = "moe.esft.experts") -> None:
    """Freeze every weight, then make the selected experts of each MoE layer trainable (see module doc)."""
    blocks = expert_blocks(model, family)
    if len(selection) != len(blocks):
        raise ConfigError(key, f"{key} selects experts for {len(selection)} MoE layers but this model has {len(blocks)}; "
                          "it was written for another model. Run `moetune experts` with this config.")
    model.requires_grad_(False)
    for block, experts in zip(blocks, selection, strict=True):
        module = getattr(block.module, EXPERTS_NAME)
        count = count_experts(module)
        if experts and max(experts) >= count:
            raise ConfigError(key, f"{key} selects expert {max(experts)} in {block.path}, which has {count} experts.")
        if not experts:
            continue
        if isinstance(module, nn.ModuleList):
            for index in experts:
                module[index].requires_grad_(True)
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            parametrize.register_parametrization(module, name, SelectedExperts(param, experts))
        module.parametrizations.requires_grad_(True)
        for name in module.parametrizations:
            module.parametrizations[name].original.requires_grad_(False)
    setattr(innermost_model(model), _SELECTION_ATTR, [list(layer) for layer in selection])


def selection_of(model: nn.Module) -> list[list[int]] | None:
    """The selection installed on ``model`` (through wrappers), or None when it trains no ESFT plan."""
    return getattr(innermost_model(model), _SELECTION_ATTR, None)


def esft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The selected experts' weights: ``<experts path>.<param>`` -> (selected, ...) slices for fused
    experts, ``<experts path>.<N>.<param>`` for per-expert modules."""
    inner = innermost_model(model)
    selection = selection_of(inner)
    state: dict[str, torch.Tensor] = {}
    for block, experts in zip(expert_blocks(inner), selection, strict=True):
        module = getattr(block.module, EXPERTS_NAME)
        if not experts:
            continue
        if isinstance(module, nn.ModuleList):
            for index in experts:
                for name, param in module[index].named_parameters():
                    state[f"{block.experts_path}.{index}.{name}"] = param.detach()
            continue
        for name, holder in module.parametrizations.items():
            state[f"{block.experts_path}.{name}"] = holder[0].selected.detach()
    return state


def save_esft(model: nn.Module, directory: str | Path) -> None:
    """Write the selected experts' weights and the selection into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.contiguous().cpu() for name, tensor in esft_state_dict(model).items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    blocks = [block.path for block in expert_blocks(innermost_model(model))]
    (directory / SELECTION_FILE).write_text(json.dumps({"selected": selection_of(model), "moe_blocks": blocks}, indent=2) + "\n")


def load_esft(model: nn.Module, directory: str | Path) -> None:
    """Load what :func:`save_esft` wrote into ``model``, which trains the same selection."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    saved = read_selection(directory / SELECTION_FILE, key=str(directory))
    if saved != selection_of(model):
        raise UserError(f"{directory} holds experts {saved} but this run trains {selection_of(model)} "
                        "(moe.esft.experts changed?); resume with the selection the run started with.")
    try:
        weights = load_file(str(directory / WEIGHTS_FILE))
    except (FileNotFoundError, SafetensorError, OSError) as err:
        raise UserError(f"{directory / WEIGHTS_FILE} is missing or corrupt ({err}).") from None
    expected = esft_state_dict(model)
    wrong = sorted(set(weights) ^ set(expected)) + [n for n in expected if n in weights and weights[n].shape != expected[n].shape]
    if wrong:
        raise UserError(f"The experts in {directory / WEIGHTS_FILE} do not fit this model: {wrong[:3]} "
                        "(trained with another model config?).")
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(weights[name])


def merge_esft(model: nn.Module) -> nn.Module:
    """Write the trained slices into the fused tensors and drop the wrappers; returns ``model``."""
    inner = innermost_model(model)
    for block in expert_blocks(inner):
        module = getattr(block.module, EXPERTS_NAME)
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    if hasattr(inner, _SELECTION_ATTR):
        delattr(inner, _SELECTION_ATTR)
    return model.requires_grad_(False)


def load_esft_artefact(base: nn.Module, directory: str | Path) -> nn.Module:
    """``base`` with the experts saved in ``directory`` written in (a plain, merged model)."""
    install_selection(base, read_selection(Path(directory) / SELECTION_FILE, key=str(directory)), key=str(directory))
    load_esft(base, directory)
    return merge_esft(base)


def is_esft_folder(directory: str | Path) -> bool:
    """Whether ``directory`` holds an ESFT artefact (checkpoint or final)."""
    directory = Path(directory)
    return (directory / SELECTION_FILE).is_file() and (directory / WEIGHTS_FILE).is_file()


def expert_blocks(model: nn.Module, family=None) -> list[MoeBlockInfo]:
    """The MoE blocks of ``model`` in layer order (the order routing capture reports them in)."""
    from moetune.models.families import family_of

    inner = innermost_model(model)
    return find_moe_blocks(inner, (family or family_of(inner)).router_name)
