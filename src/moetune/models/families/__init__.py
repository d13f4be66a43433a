"""The model families: one module per family, each exporting one :class:`FamilySpec` as ``SPEC``.

The registry is the set of public modules in this package: adding a family means adding a module
(and its test), nothing else. :data:`FAMILY_NAMES` is read from the module files without importing
them, so the config layer can validate ``model.architecture`` without importing torch; the specs
themselves are imported on first use.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moetune.models.families._spec import FamilySpec

FAMILY_NAMES: tuple[str, ...] = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__)
                                             if not m.name.startswith("_")))


def get_family(name: str) -> FamilySpec:
    """The spec of the family called ``name`` (one of :data:`FAMILY_NAMES`)."""
    return _load(name)


def all_families() -> list[FamilySpec]:
    """Every family's spec, in name order."""
    return [_load(name) for name in FAMILY_NAMES]


def family_for_model_type(model_type: str | None) -> FamilySpec | None:
    """The family that loads config.json ``model_type``, or None when no family does."""
    return next((spec for spec in all_families() if model_type in spec.model_types), None)


def known_model_types() -> list[str]:
    """Every model_type some family loads, sorted (for error messages)."""
    return sorted(t for spec in all_families() for t in spec.model_types)


@cache
def _load(name: str) -> FamilySpec:
    if name not in FAMILY_NAMES:
        raise KeyError(name)
    spec = importlib.import_module(f"{__name__}.{name}").SPEC
    if spec.name != name:  # the module name is the registry key; a copied module must be renamed in both
        raise RuntimeError(f"moetune.models.families.{name} exports a spec named {spec.name!r}")
    return spec
