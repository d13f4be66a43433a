"""Items found by tree-sitter: kinds, names, spans, doc comments, impl/trait context, module paths."""

from __future__ import annotations

from moetune.data.rust_items import find_items, new_parser

from .conftest import BROKEN_RS, LIB_RS, MONEY_RS, line_of


def _items(text: str):
    src = text.encode()
    return find_items(new_parser().parse(src), src)


def test_every_item_kind_with_exact_spans_context_and_modules():
    found = [(i.kind, i.name, i.start_line, i.end_line, i.module, i.context) for i in _items(MONEY_RS)]
    impl_money = "impl<'a, C: Currency> Money<'a, C>"
    impl_display = "impl<'a, C: Currency> fmt::Display for Money<'a, C>"
    at = lambda needle: line_of(MONEY_RS, needle)  # noqa: E731
    assert found == [
        ("struct", "Money", at("/// An amount"), at("pub currency") + 1, "", None),
        ("trait", "Currency", at("/// A currency"), at("fn decimals") + 3, "", None),
        ("function", "decimals", at("/// Decimal places"), at("fn decimals") + 2, "", "pub trait Currency"),
        ("enum", "Rounding", at("pub enum Rounding"), at("HalfEven") + 1, "", None),
        ("impl", "Money<'a, C>", at(impl_money), at("self.minor == 0") + 2, "", None),
        ("function", "add", at("/// Adds two"), at("pub fn add") + 2, "", impl_money),
        ("function", "is_zero", at("pub fn is_zero"), at("self.minor == 0") + 1, "", impl_money),
        ("impl", "fmt::Display for Money<'a, C>", at(impl_display), at("write!") + 2, "", None),
        ("function", "fmt", at("fn fmt"), at("write!") + 1, "", impl_display),
        ("module", "ledger", at("pub mod ledger"), at("pub static") - 2, "", None),
        ("struct", "Entry", at("pub struct Entry"), at("pub id: u64") + 1, "ledger", None),
        ("impl", "Entry", at("impl Entry"), at("Entry { id }") + 2, "ledger", None),
        ("function", "new", at("pub fn new"), at("Entry { id }") + 1, "ledger", "impl Entry"),
        ("static", "DEFAULT_SCALE", at("pub static"), at("pub static"), "", None),
        ("type", "Minor", at("pub type Minor"), at("pub type Minor"), "", None),
    ]


def test_doc_comments_and_attributes_stay_with_their_item():
    items = {i.name: i for i in _items(MONEY_RS)}
    money_src = MONEY_RS.encode()
    money = items["Money"]
    text = money_src[money.start_byte:money.end_byte].decode()
    assert text.startswith("/// An amount of money in minor units of a currency.\n#[derive(Debug, Clone, Copy, PartialEq, Eq)]\n")
    assert money.doc == "An amount of money in minor units of a currency."
    assert items["add"].doc == "Adds two amounts of the same currency and returns the sum."
    assert items["is_zero"].doc is None
    assert money_src[items["add"].item_start_byte:].startswith(b"    pub fn add(")


def test_cfg_attributes_macros_and_raw_strings_with_braces():
    items = [(i.kind, i.name, i.start_line, i.end_line, i.module) for i in _items(LIB_RS)]
    assert items == [
        ("const", "API_KEY", line_of(LIB_RS, "/// Shared API key"), line_of(LIB_RS, "pub const API_KEY"), ""),
        ("function", "template", line_of(LIB_RS, "/// A raw string"), line_of(LIB_RS, 'r#"') + 1, ""),
        ("module", "tests", line_of(LIB_RS, "#[cfg(test)]"), line_of(LIB_RS, "macro_rules!") - 2, ""),
        ("function", "template_is_json_like", line_of(LIB_RS, "#[test]"), line_of(LIB_RS, "starts_with") + 1, "tests"),
        ("macro", "cents", line_of(LIB_RS, "macro_rules!"), line_of(LIB_RS, "$e * 100") + 1, ""),
    ]


def test_a_syntax_error_spoils_only_the_items_it_touches():
    items = _items(BROKEN_RS)
    good = [(i.kind, i.name) for i in items if not i.has_error]
    assert good == [("function", "ok_before"), ("struct", "AfterBroken")]
    assert sum(i.has_error for i in items) == 1


def test_nested_items_generics_and_trailing_comments():
    text = (
        "const A: u8 = 1; // belongs to A\n"
        "fn outer<T: Into<Vec<u8>>>(x: T) -> usize {\n"
        "    fn helper<'a>(s: &'a [u8]) -> &'a [u8] { s }\n"
        "    helper(&x.into()).len()\n"
        "}\n"
    )
    items = [(i.kind, i.name, i.start_line, i.end_line) for i in _items(text)]
    assert items == [("const", "A", 1, 1), ("function", "outer", 2, 5), ("function", "helper", 3, 3)]
