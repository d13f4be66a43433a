"""Where each key of a YAML (or JSON: JSON is YAML) file is: dotted key -> "file:line", for errors."""

from __future__ import annotations

import yaml

from moetune.errors import UserError


def record_key_lines(node: yaml.Node | None, filename: str, where: dict[str, str], prefix: str = "",
                     repeated_key_is_error: bool = True) -> None:
    """Map every dotted key (``a.b``, ``a.list[0]``) under ``node`` to "file:line" in ``where``.

    A key given twice is an error naming both lines (PyYAML would keep the last one silently), unless
    ``repeated_key_is_error`` is False: JSON readers keep the last value, and so does the line recorded.
    """
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            location = f"{filename}:{key_node.start_mark.line + 1}"
            if key in where and repeated_key_is_error:
                raise UserError(f"{location}: key {key!r} is given twice (first at {where[key]}).")
            where[key] = location
            record_key_lines(value_node, filename, where, key, repeated_key_is_error)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            where[f"{prefix}[{i}]"] = f"{filename}:{item.start_mark.line + 1}"
            record_key_lines(item, filename, where, f"{prefix}[{i}]", repeated_key_is_error)
