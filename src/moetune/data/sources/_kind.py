"""What a data source kind is: :class:`SourceKind`, the one description each source module exports.

A source module (``rust_repo.py``, ``qa_jsonl.py``, or one's own module named in
:data:`moetune.plugins.SOURCE_MODULES`) builds one ``SourceKind`` named ``SOURCE``; everything moetune
knows about that kind lives there: its config class, how it turns a source into samples, what it
counts, and how its records are split, grouped and evaluated. The generic build (temporary files,
duplicate removal, the stats file) is :mod:`moetune.data.build`; it calls the fields below.
A module that defines its hooks as functions named like the fields ends with
``SOURCE = SourceKind.from_module(__name__, name=..., config_class=..., path_is=..., path_holds=...)``.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from moetune.config.schema import Config

Evaluation = Literal["answer", "body", "loss"]


class SampleWriter(Protocol):
    """Where a kind's ``add_samples`` writes: JSON lines, exact duplicates dropped and counted."""

    def write(self, digest: bytes, line: str, source: str, kind: str, chars: int) -> None:
        """Write one sample (``digest``: its content hash; ``line``: its JSON line) unless one with that hash was."""

    def write_file_samples(self, samples: list[tuple[bytes, str, str, int]], source: str,
                           breadth: Mapping[str, int]) -> None:
        """Write one file's ``(digest, line, kind, chars)`` samples; of identical ones, the one whose kind has
        the smallest ``breadth`` (0 when not listed) is kept."""


def unit_by_text(record: dict[str, Any]) -> str:
    """The split unit of a record no kind says more about: its text (or prompt)."""
    return "text:" + record.get("text", record.get("prompt", ""))


def group_by_kind(record: dict[str, Any]) -> str:
    """The routing group of a record by its sample ``kind`` (function, file, ...)."""
    return f"kind:{record.get('kind', 'unknown')}"


@dataclass(frozen=True)
class SourceKind:
    """Everything moetune knows about one data source kind. Field docs say what each fact is used for."""

    name: str
    """Registry key, the ``type`` of its ``data.sources`` entries and the ``source`` of every record it writes."""
    config_class: type
    """The frozen dataclass of one ``data.sources`` entry (fields ``type`` and ``path`` plus its own;
    loaded with strict keys like every section, and its help texts go into the README's reference)."""
    path_is: Literal["directory", "file"]
    """What an entry's ``path`` must be; the build checks it before reading anything."""
    path_holds: str
    """What that path holds, for the error when it is missing ("the root of a Rust repository")."""
    add_samples: Callable[[Any, Config, SampleWriter, dict], None]
    """``add_samples(source, config, writer, stats)``: write the samples of one entry through ``writer``
    and count what it read in ``stats`` (this kind's keys, and one entry appended to ``stats["sources"]``)."""
    new_stats: Callable[[], dict]
    """This kind's counters in the stats file, at zero: top-level keys, present in every build's stats.
    Secrets a kind redacts go under the shared key ``redactions`` ({secret type: count})."""
    summary_lines: Callable[[dict], list[str]]
    """The build summary's lines about this kind, from the whole stats; none when no such source was read."""
    describe_empty: Callable[[dict], str]
    """What the kind read, for the error of a build that produced no sample ("0 Rust files found, ...")."""
    input_files: Callable[[Any], list[Path]] | None = None
    """The files an entry reads, when they can be listed cheaply: a dataset built from them stays current
    while they are unchanged. None: they cannot (any file under a tree may change), so it is always rebuilt."""
    split_unit: Callable[[dict], str] = unit_by_text
    """The unit a record belongs to in the train/validation split; a unit is never divided."""
    routing_group: Callable[[dict], str] = group_by_kind
    """The group a record's routed tokens count for in the routing report (and ESFT's expert choice)."""
    evaluation: Evaluation = "loss"
    """What ``moetune eval`` does with a validation record beyond its loss: ``answer``: generate the
    completion of a prompt/completion record and score it against the gold answers; ``body``: generate
    a Rust item's body from its signature; ``loss``: nothing more."""

    @classmethod
    def from_module(cls, module_name: str, **facts: Any) -> SourceKind:
        """The kind whose hooks are the functions of module ``module_name`` named like the fields above
        (``add_samples``, ``new_stats``, ``summary_lines`` and ``describe_empty``; ``input_files``,
        ``split_unit`` and ``routing_group`` where it defines them, else their defaults); ``facts`` give
        the rest (``name``, ``config_class``, ``path_is``, ``path_holds``, ``evaluation``)."""
        module = sys.modules[module_name]
        hooks = {name: getattr(module, name) for name in HOOKS if hasattr(module, name)}
        required = [f.name for f in dataclasses.fields(cls)
                    if f.name in HOOKS and f.default is dataclasses.MISSING and f.name not in hooks]
        if required:
            raise TypeError(f"source kind module {module_name} defines no {', '.join(required)}: each kind's module "
                            "defines these functions (see moetune.data.sources.SourceKind)")
        return cls(**facts, **hooks)


HOOKS = ("add_samples", "new_stats", "summary_lines", "describe_empty", "input_files", "split_unit", "routing_group")
"""The fields of :class:`SourceKind` that are functions, which :meth:`SourceKind.from_module` reads from a module."""
