"""File-level chunks: cut between items, never inside one unless it alone is too long."""

from __future__ import annotations

from moetune.data.rust_chunks import split_at_items
from moetune.data.rust_items import new_parser

from .conftest import MONEY_RS


def _chunks(text: str, budget: int) -> list[str]:
    src = text.encode()
    return [src[lo:hi].decode() for lo, hi in split_at_items(new_parser().parse(src).root_node, src, budget)]


def test_chunks_cover_the_file_exactly_and_fit_the_budget():
    chunks = _chunks(MONEY_RS, 400)
    assert "".join(chunks) == MONEY_RS
    assert all(len(c.encode()) <= 400 for c in chunks)
    assert len(chunks) == 5


def test_cuts_fall_only_between_items_with_docs_and_attributes_kept():
    chunks = _chunks(MONEY_RS, 400)
    # Each chunk starts where an item (or its doc comment) starts.
    assert [c.splitlines()[0] for c in chunks] == [
        "use std::fmt;",
        "/// A currency with a fixed number of decimals.",
        "impl<'a, C: Currency> Money<'a, C> {",
        "impl<'a, C: Currency> fmt::Display for Money<'a, C> {",
        "pub type Minor = i64;",
    ]
    assert "/// An amount of money" in chunks[0] and "#[derive(" in chunks[0]


def test_an_item_too_long_for_the_budget_is_cut_between_its_members():
    methods = "".join(f"    /// Method {i}.\n    pub fn m{i}(&self) -> u32 {{\n        {i}\n    }}\n\n" for i in range(6))
    text = f"pub struct S;\n\nimpl S {{\n{methods}}}\n"
    chunks = _chunks(text, 120)
    assert "".join(chunks) == text
    assert all(len(c) <= 120 for c in chunks)
    # No method is divided: each `pub fn` line is in the same chunk as its closing brace.
    for chunk in chunks:
        assert chunk.count("pub fn") == chunk.count("        }") or chunk.count("pub fn") == chunk.count("    }\n")
    assert sum(c.count("/// Method") for c in chunks) == 6


def test_a_single_huge_line_is_hard_cut_on_a_character_boundary():
    text = "const S: &str = \"" + "é" * 100 + "\";\n"
    chunks = _chunks(text, 50)
    assert "".join(chunks) == text
    assert all(len(c.encode()) <= 50 for c in chunks)
