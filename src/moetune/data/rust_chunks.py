"""Split a Rust file into chunks that fit the model's context, cutting only between items.

A file is first cut before every top-level item (its doc comments and attributes stay with it).
Consecutive pieces are merged greedily while they fit the budget. A single item that is too long
is cut between its members when it has any (``impl``, ``trait``, ``mod`` bodies), and only as a
last resort between lines; a single line longer than the budget is cut at the budget.
"""

from __future__ import annotations

from tree_sitter import Node

from moetune.data.rust_items import leading_start, line_start

_LEADING_TYPES = frozenset({"attribute_item", "line_comment", "block_comment"})
_BODY_TYPES = frozenset({"declaration_list", "field_declaration_list", "enum_variant_list"})


def split_at_items(root: Node, src: bytes, budget_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges covering ``src`` in order; each fits ``budget_bytes`` unless one line alone does not."""
    if len(src) <= budget_bytes:
        return [(0, len(src))]
    pieces = _fit(_segments(root, 0, len(src), src), src, budget_bytes)
    return _merge(pieces, budget_bytes)


def _segments(container: Node, lo: int, hi: int, src: bytes) -> list[tuple[int, int, Node | None]]:
    """Cut [lo, hi) before each named child of ``container`` that is not a comment or attribute."""
    starts: list[tuple[int, Node]] = []
    for child in container.named_children:
        if child.type in _LEADING_TYPES or child.start_byte < lo or child.start_byte >= hi:
            continue
        start = max(lo, line_start(src, leading_start(child, src).start_byte))
        if not starts or start > starts[-1][0]:
            starts.append((start, child))
    segments: list[tuple[int, int, Node | None]] = []
    if not starts or starts[0][0] > lo:
        segments.append((lo, starts[0][0] if starts else hi, None))
    for i, (start, node) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else hi
        segments.append((start, end, node))
    return segments


def _fit(segments: list[tuple[int, int, Node | None]], src: bytes, budget: int) -> list[tuple[int, int]]:
    pieces: list[tuple[int, int]] = []
    for lo, hi, node in segments:
        if hi - lo <= budget:
            pieces.append((lo, hi))
            continue
        body = _body(node)
        inner = _segments(body, lo, hi, src) if body is not None else []
        if len(inner) > 1:
            pieces.extend(_fit(inner, src, budget))
        else:
            pieces.extend(_split_lines(src, lo, hi, budget))
    return pieces


def _body(node: Node | None) -> Node | None:
    """The member list of an impl, trait, mod, struct or enum; None for anything without one."""
    if node is None:
        return None
    body = node.child_by_field_name("body")
    if body is not None and body.type in _BODY_TYPES:
        return body
    return None


def _split_lines(src: bytes, lo: int, hi: int, budget: int) -> list[tuple[int, int]]:
    pieces: list[tuple[int, int]] = []
    start = lo
    while hi - start > budget:
        cut = src.rfind(b"\n", start, start + budget)
        if cut > start:
            cut += 1
        else:
            cut = start + budget
            while cut > start + 1 and src[cut] & 0xC0 == 0x80:
                cut -= 1  # never inside a multi-byte UTF-8 character
        pieces.append((start, cut))
        start = cut
    if start < hi:
        pieces.append((start, hi))
    return pieces


def _merge(pieces: list[tuple[int, int]], budget: int) -> list[tuple[int, int]]:
    """Join neighbouring pieces while the union fits the budget."""
    merged: list[tuple[int, int]] = []
    for lo, hi in pieces:
        if merged and hi - merged[-1][0] <= budget:
            merged[-1] = (merged[-1][0], hi)
        else:
            merged.append((lo, hi))
    return merged
