"""The `chat` source kind: every shape of conversation data becomes `messages` records; bad records are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moetune.config import load_config
from moetune.data.build import build_dataset, stats_path_for
from moetune.data.split import split_records
from moetune.errors import ConfigError, UserError

OPENAI = [
    {"messages": [{"role": "system", "content": "You are a payments assistant."},
                  {"role": "user", "content": "What fee applies to card refunds?"},
                  {"role": "assistant", "content": "<think>\nRefunds follow the card fee.\n</think>\n\nA 2% fee."},
                  {"role": "user", "content": "And bank transfers?"},
                  {"role": "assistant", "thinking": "Flat fee.", "content": "0.50 EUR."}], "expert_label": "fees"},
    {"messages": [{"role": "user", "content": "Balance of acct_42?"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "call00042", "type": "function",
                       "function": {"name": "get_balance", "arguments": "{\"account\": \"acct_42\"}"}}]},
                  {"role": "tool", "tool_call_id": "call00042", "content": "{\"balance\": \"120.00 EUR\"}"},
                  {"role": "assistant", "content": [{"type": "text", "text": "120.00 EUR."}]}],
     "tools": json.dumps([{"type": "function", "function": {"name": "get_balance", "parameters": {"type": "object"}}}]),
     "system": "Answer with amounts."},
]
SHAREGPT = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Refund window?"},
                               {"from": "function_call", "value": "{\"name\": \"policy\", \"arguments\": {\"topic\": \"refunds\"}}"},
                               {"from": "observation", "value": "30 days"}, {"from": "gpt", "value": "30 days."}],
             "expert_label": "refunds"}]
# (a bad row, what its error says)
BAD_ROWS = [
    ({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}, "message 0: unknown role 'wizard'"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}, "message 0 (user) has no content"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no trainable turn"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": "{not json"}}]}]}, "the arguments of tool call 'f' are not JSON"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}, "mixed shapes"),
    ({"messages": "not a list"}, "`messages` is text that is not JSON"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "train": "yes"}]},
     "`train` must be true or false"),
]


def _config(tmp_path: Path, sources: list[dict], **data):
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"data": {"output_path": str(tmp_path / "out" / "all.jsonl"), "sources": sources, **data}}))
    return load_config(path)


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def _built(tmp_path: Path) -> tuple[list[dict], dict]:
    out = tmp_path / "out" / "all.jsonl"
    return [json.loads(line) for line in out.read_text().splitlines()], json.loads(stats_path_for(out).read_text())


def test_openai_and_sharegpt_files_become_messages_records(tmp_path: Path):
    folder = tmp_path / "chats"
    folder.mkdir()
    _write_jsonl(folder / "a.jsonl", OPENAI)
    _write_jsonl(folder / "b.jsonl", SHAREGPT)
    assert build_dataset(_config(tmp_path, [{"type": "chat", "path": str(folder)}])) == 0
    records, stats = _built(tmp_path)

    fees, balance, refunds = records
    assert [(m["role"], m["content"], m.get("reasoning_content"), m["train"]) for m in fees["messages"]] == [
        ("system", "You are a payments assistant.", None, False), ("user", "What fee applies to card refunds?", None, False),
        ("assistant", "A 2% fee.", "Refunds follow the card fee.", True), ("user", "And bank transfers?", None, False),
        ("assistant", "0.50 EUR.", "Flat fee.", True)]
    assert (fees["source"], fees["kind"], fees["expert_label"], fees["line"]) == ("chat", "conversation", "fees", 1)
    assert balance["messages"][0] == {"role": "system", "content": "Answer with amounts.", "train": False}
    assert balance["messages"][2]["tool_calls"] == [
        {"type": "function", "function": {"name": "get_balance", "arguments": {"account": "acct_42"}}, "id": "call00042"}]
    assert balance["messages"][4]["content"] == "120.00 EUR." and balance["tools"][0]["function"]["name"] == "get_balance"
    assert [m["role"] for m in refunds["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert refunds["messages"][2]["tool_calls"][0]["function"] == {"name": "policy", "arguments": {"topic": "refunds"}}
    assert (stats["samples"]["chat"], stats["chat_records_read"], stats["chat_trained_turns"]) == ({"conversation": 3}, 3, 6)
    assert (stats["chat_tool_calls"], stats["chat_with_reasoning"], stats["expert_labels"]) == (2, 1, {"fees": 1, "refunds": 1})
    assert [s["shapes"] for s in stats["sources"]] == [["openai", "sharegpt"]]


def test_mapped_parquet_and_arrow_files(tmp_path: Path):
    from datasets import Dataset

    rows = [{"dialogue": [{"speaker": "customer", "text": "Is a chargeback free?"},
                          {"speaker": "agent", "text": "No, it costs 15 EUR."}], "topic": "disputes"},
            {"dialogue": [{"speaker": "customer", "text": "How long does it take?"},
                          {"speaker": "agent", "text": "Up to 60 days."}], "topic": "disputes"}]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "dialogues.parquet"))
    Dataset.from_list(rows[:1]).save_to_disk(str(tmp_path / "saved"))
    mapping = {"field_messages": "dialogue", "role_key": "speaker", "content_key": "text", "label_field": "topic",
               "roles": {"customer": "user", "agent": "assistant"}}
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    config = _config(tmp_path, [{"type": "chat", "path": str(tmp_path / "dialogues.parquet"), **mapping},
                                {"type": "chat", "path": str(arrow), **mapping}])
    assert build_dataset(config) == 0
    records, stats = _built(tmp_path)
    assert [[(m["role"], m["content"]) for m in r["messages"]] for r in records] == [
        [("user", "Is a chargeback free?"), ("assistant", "No, it costs 15 EUR.")],
        [("user", "How long does it take?"), ("assistant", "Up to 60 days.")]]
    assert [(r["expert_label"], r["row"]) for r in records] == [("disputes", 1), ("disputes", 2)]
    assert stats["duplicates_removed"] == 1  # the arrow file's conversation is the parquet file's first: written once


@pytest.mark.parametrize(("row", "reason"), BAD_ROWS, ids=[reason for _, reason in BAD_ROWS])
def test_a_bad_record_is_named_by_file_and_line(tmp_path: Path, row: dict, reason: str):
    data = _write_jsonl(tmp_path / "chats.jsonl", [OPENAI[0], row, "{broken"])
    assert build_dataset(_config(tmp_path, [{"type": "chat", "path": str(data)}])) == 0
    records, stats = _built(tmp_path)
    assert len(records) == 1 and stats["chat_bad_records"] == 2
    assert stats["bad_line_details"][0].startswith(f"{data}:2: ") and reason in stats["bad_line_details"][0]
    assert stats["bad_line_details"][1].startswith(f"{data}:3: invalid JSON")
    with pytest.raises(UserError, match=rf"^{data}:2: .*{reason.replace('(', '.').replace(')', '.')}.*data.strict is true"):
        build_dataset(_config(tmp_path, [{"type": "chat", "path": str(data)}], strict=True))


def test_a_parquet_file_missing_the_mapped_column(tmp_path: Path):
    from datasets import Dataset

    Dataset.from_list([{"messages": OPENAI[0]["messages"]}]).to_parquet(str(tmp_path / "c.parquet"))
    source = {"type": "chat", "path": str(tmp_path / "c.parquet"), "field_messages": "dialogue"}
    with pytest.raises(UserError, match=r"c.parquet: no column 'dialogue' \(its columns: messages\)"):
        build_dataset(_config(tmp_path, [source], strict=True))
    with pytest.raises(UserError, match="The build produced no samples: 0 chat records read, 1 bad"):
        build_dataset(_config(tmp_path, [source]))


def test_which_turns_train(tmp_path: Path):
    conversation = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                 {"role": "user", "content": "c"}, {"role": "assistant", "content": "d", "train": False},
                                 {"role": "user", "content": "e"}, {"role": "assistant", "content": "f"}]}
    data = _write_jsonl(tmp_path / "c.jsonl", [conversation])
    for options, trained in [({}, ["b", "f"]), ({"train_on_turns": "last"}, ["f"]),
                             ({"roles_to_train": ["user", "assistant"], "train_on_turns": "all"}, ["a", "b", "c", "e", "f"])]:
        assert build_dataset(_config(tmp_path, [{"type": "chat", "path": str(data), **options}])) == 0
        [record], _ = _built(tmp_path)
        assert [m["content"] for m in record["messages"] if m["train"]] == trained


def test_config_checks_and_the_split_unit(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"data.sources\[0\].roles.bot must be one of system, developer"):
        _config(tmp_path, [{"type": "chat", "path": "x.jsonl", "roles": {"bot": "robot"}}])
    with pytest.raises(ConfigError, match=r"data.sources\[0\].train_on_turns must be one of all, last"):
        _config(tmp_path, [{"type": "chat", "path": "x.jsonl", "train_on_turns": "first"}])
    data = _write_jsonl(tmp_path / "c.jsonl", [OPENAI[0], {**OPENAI[0], "expert_label": "other"}, OPENAI[1]])
    assert build_dataset(_config(tmp_path, [{"type": "chat", "path": str(data)}])) == 0
    records, stats = _built(tmp_path)
    assert len(records) == 2 and stats["duplicates_removed"] == 1  # identical conversations are one
    train, validation = split_records(records, 0.5, seed=1)
    assert len(train) == len(validation) == 1
