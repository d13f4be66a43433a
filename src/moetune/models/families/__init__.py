"""The model families: one module per family, each exporting one :class:`FamilySpec` as ``SPEC``.

The registry is :data:`moetune.plugins.FAMILY_MODULES` (name -> module): adding a family means adding
its module (and its test) and one line there. :data:`FAMILY_NAMES` comes from that table without
importing any family, so the config layer can validate ``model.architecture`` without importing
torch; the specs themselves are imported on first use.
"""

from __future__ import annotations

import importlib
import weakref
from functools import cache
from typing import TYPE_CHECKING

from moetune import plugins
from moetune.plugins import FAMILY_NAMES

if TYPE_CHECKING:
    from torch import nn

    from moetune.models.families._spec import FamilySpec

__all__ = ["FAMILY_NAMES", "all_families", "attach_family", "family_for_model_type", "family_of", "get_family",
           "known_model_types", "packs_by_position_ids"]

# The family of each model seen, looked up from its config once: the loss asks on every micro-batch.
_FAMILY_OF_MODEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def get_family(name: str) -> FamilySpec:
    """The spec of the family called ``name`` (one of :data:`FAMILY_NAMES`)."""
    return _load(name)


def all_families() -> list[FamilySpec]:
    """Every family's spec, in name order."""
    return [_load(name) for name in FAMILY_NAMES]


def family_for_model_type(model_type: str | None) -> FamilySpec | None:
    """The family that loads config.json ``model_type`` (a text model's, or a multimodal checkpoint's
    whose text model it trains), or None when no family does."""
    return next((spec for spec in all_families() if model_type in spec.model_types or model_type in spec.multimodal_types),
                None)


def attach_family(model: nn.Module, family: FamilySpec) -> None:
    """Make ``family`` the one :func:`family_of` gives for ``model`` (the build does, once per model)."""
    from moetune.models.layout import innermost_model

    _FAMILY_OF_MODEL[innermost_model(model)] = family


def family_of(model: nn.Module) -> FamilySpec:
    """The family of ``model`` (through DDP, DeepSpeed and PEFT wrappers): the one its build attached,
    else the one that loads its config's ``model_type`` (a model loaded by other means). Looked up
    once per model."""
    from moetune.models.layout import innermost_model

    inner = innermost_model(model)
    if inner not in _FAMILY_OF_MODEL:
        model_type = getattr(getattr(inner, "config", None), "model_type", None)
        family = family_for_model_type(model_type)
        if family is None:
            raise ValueError(f"no moetune family describes a {model_type!r} model; it loads "
                             f"{', '.join(known_model_types())}")
        _FAMILY_OF_MODEL[inner] = family
    return _FAMILY_OF_MODEL[inner]


def packs_by_position_ids(model) -> bool:
    """Whether samples packed into one row with restarting ``position_ids`` and no attention mask
    stay apart in ``model`` as built: its family's forward keeps them apart (MPT's ALiBi attention
    takes no position_ids, a hybrid's recurrent state would run from one sample into the next) and
    the attention kernel it runs, after any fallback, honours them (for gpt-oss only the flash
    kernels do: see its family module)."""
    from moetune.models.load.kernels import PACKING_KERNELS, attention_kernel

    family = family_of(model)
    if not family.packs_by_position_ids:
        return False
    kernel = attention_kernel(model)
    return kernel in PACKING_KERNELS and (family.packing_kernels is None or kernel in family.packing_kernels)


def known_model_types() -> list[str]:
    """Every config.json model_type some family loads, multimodal checkpoints' included, sorted (for error messages)."""
    return sorted(t for spec in all_families() for t in (*spec.model_types, *spec.multimodal_types))


@cache
def _load(name: str) -> FamilySpec:
    if name not in FAMILY_NAMES:
        raise KeyError(name)
    module = plugins.FAMILY_MODULES[name]
    spec = importlib.import_module(module).SPEC
    if spec.name != name:  # the registry key is the spec's name; a copied module must be renamed in both
        raise RuntimeError(f"{module} exports a spec named {spec.name!r}, registered as {name!r}")
    return spec
