"""The data source kinds: one module per kind, each exporting one :class:`SourceKind` as ``SOURCE``.

The registry is :data:`moetune.plugins.SOURCE_MODULES` (kind -> module path), read at every call, so
a kind registered there (also from outside moetune) is found by the config loader, the build, the
split, the routing report and the evaluation alike. The modules import nothing heavy at module
level, so the config layer can load them to build ``data.sources`` without importing torch.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from moetune import plugins
from moetune.data.sources._kind import Evaluation, LongSamples, SampleWriter, SourceKind, group_by_kind, unit_by_text

__all__ = ["Evaluation", "LongSamples", "SampleWriter", "SourceKind", "group_by_kind", "record_kind", "registered_kinds",
           "source_kind", "unit_by_text"]


def source_kind(name: str) -> SourceKind:
    """The kind registered as ``name``; KeyError when none is."""
    module = plugins.SOURCE_MODULES[name]
    # Asked once per record by the split and the evaluation: an imported module is looked up directly.
    kind = (sys.modules.get(module) or importlib.import_module(module)).SOURCE
    if kind.name != name:  # the registry key is the kind's name, which its records carry as "source"
        raise RuntimeError(f"{module} exports a source kind named {kind.name!r}, registered as {name!r}")
    return kind


def registered_kinds() -> list[SourceKind]:
    """Every registered kind, in registry order."""
    return [source_kind(name) for name in plugins.SOURCE_MODULES]


def record_kind(record: dict[str, Any]) -> SourceKind | None:
    """The kind that wrote a dataset record (its ``source``), or None for a kind not registered (older datasets)."""
    name = record.get("source")
    return source_kind(name) if isinstance(name, str) and name in plugins.SOURCE_MODULES else None
