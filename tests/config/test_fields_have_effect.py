"""Every config key does something: each field is read by code outside the schema that declares it.

A key that is accepted, documented and then ignored is worse than an unknown-key error: the user
believes they changed the run. Reading means an attribute access or a string naming the field (as
getattr and dict lookups do) in moetune's own modules; the schema's checks do not count.
"""

import ast
import dataclasses
import typing
from pathlib import Path

import moetune
from moetune.config.schema import Config
from moetune.config.sources import SOURCE_TYPES, SourceConfig

PACKAGE = Path(moetune.__file__).parent


def config_fields(cls=Config, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        sections = [k for k in _types_within(hints[f.name]) if dataclasses.is_dataclass(k)]
        for section in sections:
            yield from config_fields(section, path)
        if not sections:
            yield path, f.name


def _types_within(tp):
    """``tp`` and every type inside it: tuple[A | B, ...] gives the tuple, A and B; a source entry gives
    every registered kind's config class."""
    yield tp
    if tp is SourceConfig:
        yield from SOURCE_TYPES.values()
    for arg in typing.get_args(tp):
        yield from _types_within(arg)


def _config_classes(cls=Config):
    yield cls
    for tp in typing.get_type_hints(cls).values():
        for inner in _types_within(tp):
            if dataclasses.is_dataclass(inner):
                yield from _config_classes(inner)


def names_read_outside_the_schema() -> set[str]:
    # A source kind's config class lives in the kind's module, beside the code that reads it: the
    # class's own body (its checks) does not count there either.
    schema_classes = {cls.__name__ for cls in _config_classes()}
    names = set()
    for source in PACKAGE.rglob("*.py"):
        if source.relative_to(PACKAGE).as_posix() == "config/schema.py":
            continue
        for node in _outside_classes(ast.parse(source.read_text(), str(source)), schema_classes):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
                names.add(node.value)
    return names


def _outside_classes(tree: ast.AST, class_names: set[str]):
    """Every node of ``tree`` except those inside the classes named ``class_names``."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        todo.extend(child for child in ast.iter_child_nodes(node)
                    if not (isinstance(child, ast.ClassDef) and child.name in class_names))


def test_every_config_field_is_read_somewhere():
    read = names_read_outside_the_schema()
    unread = [path for path, name in config_fields() if name not in read]
    assert unread == []


def test_the_walk_sees_nested_and_source_fields():
    paths = {path for path, _ in config_fields()}
    assert {"training.learning_rate", "advanced.torch_compile", "moe.upcycling.top_k"} <= paths
    assert any(p.startswith("data.sources.") for p in paths)
