"""How an entry of ``data.sources`` finds its config class: by its ``type``, in the registry.

Each source kind's config class lives in that kind's module (``moetune.data.sources.<kind>``), which
:data:`moetune.plugins.SOURCE_MODULES` names by path; it is imported when a config uses the kind, so
the config layer never imports the data stage.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Protocol

from moetune import plugins


class SourceConfig(Protocol):
    """One entry of ``data.sources``: the config class of a source kind (a frozen dataclass of that kind's
    module, e.g. ``moetune.data.sources.rust_repo.RustRepoSourceConfig``). The loader picks the class by
    the entry's ``type`` from the registry, :data:`moetune.plugins.SOURCE_MODULES`."""

    type: str
    path: str


def source_config_class(kind: str) -> type:
    """The config class of the source kind registered as ``kind``; KeyError when none is.

    The kind's module is imported now, not when the config layer is: the registry names its module
    by path, so the config layer never imports the data stage.
    """
    return importlib.import_module(plugins.SOURCE_MODULES[kind]).SOURCE.config_class


class _SourceConfigClasses(Mapping[str, type]):
    """Registered kind -> its config class, read from the registry at each use (a kind's module is
    imported when its class is asked for)."""

    def __getitem__(self, kind: str) -> type:
        return source_config_class(kind)

    def __contains__(self, kind: object) -> bool:
        return kind in plugins.SOURCE_MODULES  # without importing the kind's module

    def __iter__(self) -> Iterator[str]:
        return iter(list(plugins.SOURCE_MODULES))

    def __len__(self) -> int:
        return len(plugins.SOURCE_MODULES)


SOURCE_TYPES: Mapping[str, type] = _SourceConfigClasses()
