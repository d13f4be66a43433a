"""Find Rust items (functions, structs, impls, ...) in a source file with tree-sitter.

A real parser, not regexes: raw strings with braces, nested generics, lifetimes and macros do not
confuse it, and a syntax error only spoils the items it touches (tree-sitter recovers around
it). Each item keeps the doc comments and attributes written directly above it, and methods know
the ``impl``/``trait`` header they live in.
"""

from __future__ import annotations

from dataclasses import dataclass

import tree_sitter_rust
from tree_sitter import Language, Node, Parser, Query, QueryCursor

RUST = Language(tree_sitter_rust.language())

# tree-sitter node type -> the `kind` written into the dataset.
ITEM_KINDS = {
    "function_item": "function",
    "struct_item": "struct",
    "enum_item": "enum",
    "trait_item": "trait",
    "impl_item": "impl",
    "mod_item": "module",
    "macro_definition": "macro",
    "const_item": "const",
    "static_item": "static",
    "type_item": "type",
}
_ITEM_QUERY = Query(RUST, "[" + " ".join(f"({t})" for t in ITEM_KINDS) + "] @item")
_LEADING_TYPES = frozenset({"attribute_item", "line_comment", "block_comment"})
_CONTAINERS = frozenset({"impl_item", "trait_item"})


@dataclass(frozen=True)
class RustItem:
    """One item, its span (1-based, inclusive lines) and what surrounds it."""

    kind: str
    name: str
    start_byte: int  # start of the line holding the first doc comment / attribute
    item_start_byte: int  # start of the line holding the item itself (after docs and attributes)
    end_byte: int
    start_line: int
    end_line: int
    module: str  # inline `mod` names inside the file, joined by "::" ("" at file level)
    context: str | None  # `impl<T> Trait for Type` / `trait Name` header for methods and associated items
    doc: str | None  # the outer doc comment text, markers stripped
    has_error: bool  # tree-sitter had to recover from a syntax error inside this item


def new_parser() -> Parser:
    """A tree-sitter parser for Rust (one per process; parsers are not shareable across processes)."""
    return Parser(RUST)


def find_items(tree, src: bytes, with_docs: bool = True) -> list[RustItem]:
    """Every item in the file, nested ones included, in source order.

    ``with_docs=False`` leaves ``doc`` None (extracting it is only needed for instruction samples).
    """
    nodes = QueryCursor(_ITEM_QUERY).captures(tree.root_node).get("item", [])
    items = []
    for node in sorted(nodes, key=lambda n: (n.start_byte, -n.end_byte)):
        if node.type == "mod_item" and node.child_by_field_name("body") is None:
            continue  # `mod foo;` only points at another file
        first = leading_start(node, src)
        items.append(RustItem(
            kind=ITEM_KINDS[node.type],
            name=_item_name(node),
            start_byte=line_start(src, first.start_byte),
            item_start_byte=line_start(src, node.start_byte),
            end_byte=node.end_byte,
            start_line=first.start_point.row + 1,
            end_line=node.end_point.row + 1,
            module=_module_path(node),
            context=_container_header(node, src),
            doc=_doc_text(first, node) if with_docs else None,
            has_error=node.has_error,
        ))
    return items


def leading_start(node: Node, src: bytes) -> Node:
    """The first of the attributes and comments written directly above ``node`` (or ``node``).

    A comment counts when it starts its own line and no blank line separates it from the item,
    so a trailing comment on the previous item's line stays with that item.
    """
    first = node
    prev = node.prev_sibling
    while (prev is not None and prev.type in _LEADING_TYPES and first.start_point.row - prev.end_point.row <= 1
           and _starts_line(src, prev.start_byte)):
        # A line comment's node ends on the next line (it owns its newline): row gap 0 or 1 is adjacent.
        if prev.type == "line_comment" and first.start_point.row - prev.end_point.row > 0 and prev.end_point.column == 0:
            break
        first = prev
        prev = prev.prev_sibling
    return first


def line_start(src: bytes, offset: int) -> int:
    """Offset of the start of the line containing ``offset`` if only whitespace precedes it there."""
    start = src.rfind(b"\n", 0, offset) + 1
    return start if not src[start:offset].strip() else offset


def _starts_line(src: bytes, offset: int) -> bool:
    return line_start(src, offset) != offset or offset == 0 or src[offset - 1:offset] == b"\n"


def _item_name(node: Node) -> str:
    if node.type == "impl_item":
        target = _text(node.child_by_field_name("type"))
        trait = node.child_by_field_name("trait")
        return f"{_text(trait)} for {target}" if trait is not None else target
    return _text(node.child_by_field_name("name"))


def _module_path(node: Node) -> str:
    names = []
    parent = node.parent
    while parent is not None:
        if parent.type == "mod_item":
            names.append(_text(parent.child_by_field_name("name")))
        parent = parent.parent
    return "::".join(reversed(names))


def _container_header(node: Node, src: bytes) -> str | None:
    """``impl<'a, T> Trait for Type<'a, T> where ...`` for a direct member of an impl or trait block."""
    body = node.parent
    if body is None or body.type != "declaration_list" or body.parent is None or body.parent.type not in _CONTAINERS:
        return None
    container = body.parent
    return src[container.start_byte:body.start_byte].decode("utf-8", "replace").strip()


def _doc_text(first: Node, item: Node) -> str | None:
    """Outer doc comments (`///`, `/** */`) above the item, markers stripped, lines joined."""
    lines: list[str] = []
    node: Node | None = first
    while node is not None and node != item:
        if node.type in ("line_comment", "block_comment") and node.child_by_field_name("outer") is not None:
            doc = node.child_by_field_name("doc")
            if doc is not None:
                text = _text(doc)
                if node.type == "block_comment":
                    text = "\n".join(line.strip().removeprefix("*").strip() for line in text.splitlines())
                lines.append(text.strip("\n").removeprefix(" ") if node.type == "line_comment" else text.strip())
        node = node.next_sibling
    text = "\n".join(lines).strip()
    return text or None


def _text(node: Node | None) -> str:
    return node.text.decode("utf-8", "replace") if node is not None and node.text is not None else ""
