"""The `preference` source kind and what a preference objective trains on: records of every TRL shape, their sides
encoded as SFT samples, and batches in the layout the preference losses read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moetune.cli import main
from moetune.config import load_config
from moetune.data.build import build_dataset, stats_path_for
from moetune.data.chat_templates import CHATML, control_tokens
from moetune.data.dataloaders import build_dataloaders, build_train_eval_datasets, data_lines
from moetune.data.encode import IGNORE_INDEX
from moetune.data.preference_batches import kl_row
from moetune.data.preference_encode import prompt_length
from moetune.data.split import split_unit
from moetune.errors import UserError

SYSTEM = {"role": "system", "content": "You are a payments assistant."}
ASK_FEE = {"role": "user", "content": "What fee applies to card refunds?"}
TOOLS = [{"type": "function", "function": {"name": "get_balance", "parameters": {"type": "object"}}}]
CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"type": "function", "function": {"name": "get_balance", "arguments": {"account": "acct_42"}}}]}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


# format -> (file suffix, rows, the records' content: (prompt, chosen, rejected) or (prompt, completion, desirable))
FORMATS = {
    "standard": (".jsonl", [
        {"prompt": "What fee applies to card refunds?", "chosen": " A 2% fee.", "rejected": " No fee at all.",
         "expert_label": "fees"},
        {"prompt": "Which card networks exist?", "chosen": " Visa and Mastercard.", "rejected": " Only cash.",
         "system": "Be brief."},
    ], [("What fee applies to card refunds?", " A 2% fee.", " No fee at all."),
        ("Be brief.\n\nWhich card networks exist?", " Visa and Mastercard.", " Only cash.")]),
    "conversational": (".jsonl", [
        {"prompt": [SYSTEM, ASK_FEE], "chosen": [_assistant("A 2% fee.")], "rejected": [_assistant("No fee at all.")],
         "expert_label": "fees"},
        {"prompt": [_user("Balance of acct_42?")], "chosen": [CALL], "rejected": [_assistant("I cannot tell.")],
         "tools": json.dumps(TOOLS)},
    ], [([SYSTEM, ASK_FEE], [_assistant("A 2% fee.")], [_assistant("No fee at all.")]),
        ([_user("Balance of acct_42?")], [CALL], [_assistant("I cannot tell.")])]),
    "implicit_prompt": (".jsonl", [
        {"chosen": [ASK_FEE, _assistant("A 2% fee.")], "rejected": [ASK_FEE, _assistant("No fee at all.")],
         "system": SYSTEM["content"]},
        {"chosen": [_user("Refund window?"), _assistant("30 days."), _user("For cards?"), _assistant("Also 30 days.")],
         "rejected": [_user("Refund window?"), _assistant("30 days."), _user("For cards?"), _assistant("Never.")]},
    ], [([SYSTEM, ASK_FEE], [_assistant("A 2% fee.")], [_assistant("No fee at all.")]),
        ([_user("Refund window?"), _assistant("30 days."), _user("For cards?")], [_assistant("Also 30 days.")],
         [_assistant("Never.")])]),
    "unpaired": (".jsonl", [
        {"prompt": "What fee applies to card refunds?", "completion": " A 2% fee.", "label": True, "expert_label": "fees"},
        {"prompt": [_user("Refund window?")], "completion": [_assistant("Never.")], "label": False},
        {"prompt": "Which card networks exist?", "completion": " Only cash.", "label": False},
    ], [("What fee applies to card refunds?", " A 2% fee.", True), ([_user("Refund window?")], [_assistant("Never.")], False),
        ("Which card networks exist?", " Only cash.", False)]),
    "parquet": (".parquet", [
        {"prompt": "What fee applies to card refunds?", "chosen": " A 2% fee.", "rejected": " No fee at all."},
        {"prompt": "Which card networks exist?", "chosen": " Visa and Mastercard.", "rejected": " Only cash."},
    ], [("What fee applies to card refunds?", " A 2% fee.", " No fee at all."),
        ("Which card networks exist?", " Visa and Mastercard.", " Only cash.")]),
}
# (format, objective): pairs train as pairs (dpo) and, for KTO, as two completions each.
CASES = [(fmt, "kto" if fmt == "unpaired" else "dpo") for fmt in FORMATS] + [("conversational", "kto")]

# (a bad row, what its error says)
BAD_ROWS = [
    ({"prompt": "q", "chosen": " a"}, "missing `rejected`"),
    ({"prompt": "q"}, "needs `chosen` and `rejected` (a pair) or `completion` and `label`"),
    ({"prompt": 5, "chosen": " a", "rejected": " b"}, "`prompt` must be a non-empty list of messages"),
    ({"prompt": "q", "chosen": [_assistant("a")], "rejected": " b"}, "`chosen` must be a string like `prompt`"),
    ({"prompt": "q", "chosen": "   ", "rejected": " b"}, "empty `chosen`"),
    ({"prompt": "q", "chosen": " same", "rejected": " same"}, "`chosen` is identical to `rejected`"),
    ({"prompt": [_user("q")], "chosen": [_assistant("a")], "rejected": [_assistant("a")]}, "identical"),
    ({"prompt": "q", "completion": " a", "label": "yes"}, "`label` must be true or false"),
    ({"prompt": "q", "completion": " a"}, "missing `label`"),
    ({"chosen": [_user("q"), _assistant("a")], "rejected": [_user("r"), _assistant("a")]}, "share no opening message"),
    ({"chosen": [_user("q"), _assistant("a"), _user("more")], "rejected": [_user("q"), _assistant("a"), _user("less")]},
     "first differ at message 2, a user turn"),
    ({"prompt": [_user("q")], "chosen": [_user("a")], "rejected": [_assistant("b")]}, "must open with an assistant message"),
]


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE with ChatML's control tokens and template (well under a second)."""
    from moetune.data.tokenizer import train_bpe_tokenizer

    texts = [json.dumps(rows) for _, rows, _ in FORMATS.values()] * 4
    bpe = train_bpe_tokenizer(texts, 400, control_tokens(CHATML))
    bpe.chat_template = CHATML
    return bpe


def _config(tmp_path: Path, source: Path, objective: str, *overrides: str):
    return load_config(None, [f"data.output_path={tmp_path / 'out' / 'all.jsonl'}", "validation.validation_split=0",
                              f"data.sources=[{{type: preference, path: {source}}}]", f"training.objective={objective}",
                              "model.max_seq_length=256", *overrides])


def _write(path: Path, rows: list) -> Path:
    if path.suffix == ".parquet":
        from datasets import Dataset

        Dataset.from_list(rows).to_parquet(str(path))
    else:
        path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def _records(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "out" / "all.jsonl").read_text().splitlines()]


def _prompt_and_trained_text(tokenizer, prompt, completion, tools=None) -> tuple[str, str]:
    """What a side's untrained opening and trained tokens must decode to, from the template and the tokenizer alone."""
    if isinstance(prompt, str):
        return tokenizer.bos_token + prompt, completion + tokenizer.eos_token
    opening = tokenizer.apply_chat_template(prompt, tools=tools, tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(prompt + completion, tools=tools, tokenize=False)
    return opening, whole[len(opening):].removesuffix("\n")


def _record_of(side: int, paired: bool) -> int:
    """The record of the ``side``-th side (a pair has two)."""
    return side // 2 if paired else side


def _unpadded(batch: dict, row: int, prefix: str = "") -> tuple[list[int], list[int]]:
    width = int(batch[f"{prefix}attention_mask"][row].sum())
    assert batch[f"{prefix}attention_mask"][row, :width].all()
    assert (batch[f"{prefix}labels"][row, width:] == IGNORE_INDEX).all()
    return batch[f"{prefix}input_ids"][row, :width].tolist(), batch[f"{prefix}labels"][row, :width].tolist()


@pytest.mark.parametrize(("fmt", "objective"), CASES)
def test_records_sides_and_batches(tmp_path: Path, tokenizer, capsys, fmt: str, objective: str):
    suffix, rows, contents = FORMATS[fmt]
    source = _write(tmp_path / f"prefs{suffix}", rows)
    labelled = any(row.get("expert_label") for row in rows)  # then label-guided routing gets each token's label id
    config = _config(tmp_path, source, objective, *(["moe.router_supervision.weight=0.1", "moe.freeze_router=false"] if labelled else []))
    assert build_dataset(config) == 0
    records = _records(tmp_path)
    paired = fmt != "unpaired"
    assert len(records) == len(contents)
    for n, (record, content) in enumerate(zip(records, contents, strict=True), 1):
        parts = ("prompt", "chosen", "rejected") if paired else ("prompt", "completion", "desirable")
        assert tuple(record[part] for part in parts) == content
        assert (record["source"], record["kind"]) == ("preference", "pair" if paired else "unpaired")
        assert record["expert_label"] == rows[n - 1].get("expert_label")
        assert record[("row" if suffix == ".parquet" else "line")] == n and record["file"] == str(source)
    if fmt == "conversational":
        assert records[1]["tools"] == TOOLS and "tools" not in records[0]
    stats = json.loads(stats_path_for(tmp_path / "out" / "all.jsonl").read_text())
    assert stats["samples"]["preference"] == {("pair" if paired else "unpaired"): len(contents)}

    data = build_train_eval_datasets(config, tokenizer)
    assert "pads its" in capsys.readouterr().err  # data.packing is on by default: one line says pairs are padded
    assert data.eval is None and not data.packed
    batch = data.collator([data.train[i] for i in range(len(data.train))])
    # Each record's sides, in dataset order: (prompt, completion, desirable, tools).
    sides = [(c[0], c[1 + s], s == 0 if paired else c[2], r.get("tools"))
             for r, c in zip(records, contents, strict=True) for s in range(2 if paired else 1)]
    if objective == "dpo":
        pairs = len(records)
        assert data.stats["train_pairs"] == data.stats["train_rows"] == pairs and data.stats["train_samples"] == 2 * pairs and batch["input_ids"].shape[0] == 2 * pairs
        assert batch["pair_index"].tolist() == list(range(pairs)) and batch["pair_index"].dtype == torch.int64
        order = [2 * i for i in range(pairs)] + [2 * i + 1 for i in range(pairs)]  # chosen rows, then rejected rows
        assert set(batch) == {"input_ids", "attention_mask", "labels", "pair_index"} | (
            {"expert_label_ids"} if labelled else set())
    else:
        assert data.stats["train_samples"] == len(sides)
        order = list(range(len(sides)))
        assert batch["desirable"].tolist() == [side[2] for side in sides]
        assert batch["pair_index"].tolist() == order
    encoded = [_unpadded(batch, row) for row in range(len(order))]
    if labelled:  # "fees" is the vocabulary's label 0 (NO_LABEL elsewhere), on every real token of its rows
        from moetune.data.expert_labels import NO_LABEL

        for row, side in enumerate(order):
            label = 0 if records[_record_of(side, paired)]["expert_label"] else NO_LABEL
            width = len(encoded[row][0])
            assert batch["expert_label_ids"][row].tolist() == [label] * width + [NO_LABEL] * (batch["input_ids"].shape[1] - width)
    for row, (ids, labels) in enumerate(encoded):
        prompt, completion, _, tools = sides[order[row]]
        opening, trained_text = _prompt_and_trained_text(tokenizer, prompt, completion, tools)
        cut = prompt_length(labels)
        assert labels[0] == IGNORE_INDEX and all(label == IGNORE_INDEX for label in labels[:cut])
        assert tokenizer.decode(ids[:cut], skip_special_tokens=False) == opening
        assert tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX],
                                skip_special_tokens=False) == trained_text
        assert all(label in (t, IGNORE_INDEX) for t, label in zip(ids, labels, strict=True))
    if objective == "dpo":  # both sides of a pair open with the very same prompt tokens
        for i in range(pairs):
            (c_ids, c_labels), (r_ids, r_labels) = encoded[i], encoded[pairs + i]
            assert c_ids[:prompt_length(c_labels)] == r_ids[:prompt_length(r_labels)]
        assert data.stats["train_preference"]["prompt_differs"] == 0
    else:  # KTO's KL rows: row i's prompt, then its partner's completion; the partners make one cycle through the rows
        partner = data.train.partner.tolist()
        assert sorted(partner) == order and all(j != i for i, j in enumerate(partner))
        cycle, i = [], 0
        while i not in cycle:
            cycle.append(i)
            i = partner[i]
        assert len(cycle) == len(order)
        for i, (ids, labels) in enumerate(encoded):
            j = partner[i]
            kl_ids, kl_labels = _unpadded(batch, i, "kl_")
            cut, other_cut = prompt_length(labels), prompt_length(encoded[j][1])
            assert kl_ids == ids[:cut] + encoded[j][0][other_cut:]
            assert kl_labels == [IGNORE_INDEX] * cut + encoded[j][1][other_cut:]


@pytest.mark.parametrize("fmt", ["standard", "conversational"])
def test_long_completion_is_cut_and_a_pair_whose_prompt_does_not_fit_is_dropped(tmp_path: Path, tokenizer, fmt: str):
    long_answer = " fee" * 80
    if fmt == "standard":
        rows = [{"prompt": "Refund fee?", "chosen": long_answer, "rejected": " None."},
                {"prompt": "Refund fee? " * 40, "chosen": " A 2% fee.", "rejected": " None."},
                {"prompt": "Which card networks exist?", "chosen": " Visa.", "rejected": " Only cash."}]
    else:
        rows = [{"prompt": [_user("Refund fee?")], "chosen": [_assistant(long_answer)], "rejected": [_assistant("None.")]},
                {"prompt": [_user("Refund fee? " * 40)], "chosen": [_assistant("A 2% fee.")],
                 "rejected": [_assistant("None.")]},
                {"prompt": [_user("Card networks?")], "chosen": [_assistant("Visa.")], "rejected": [_assistant("Cash.")]}]
    config = _config(tmp_path, _write(tmp_path / "prefs.jsonl", rows), "dpo", "model.max_seq_length=48",
                     "data.packing=false")
    build_dataset(config)
    data = build_train_eval_datasets(config, tokenizer)
    assert data.stats["train_pairs"] == len(data.train) == 2
    assert data.stats["train_preference"]["dropped_pairs"] == 1
    assert data.stats["train_long_samples"] == {"truncated": 1, "split": 0, "dropped": 2, "bad": 0}
    assert any("1 of 3 pairs dropped" in line for line in data_lines(data.stats))
    cut, whole = data.train[0], data.train[1]
    assert len(cut["chosen_input_ids"]) == 48 and cut["chosen_input_ids"][-1] != tokenizer.eos_token_id
    assert sum(label != IGNORE_INDEX for label in cut["chosen_labels"]) > 20  # the kept part of the answer trains
    assert len(cut["rejected_input_ids"]) < 48 and whole["pair_index"] == 1


def test_bad_records_are_counted_or_stop_a_strict_build_with_exit_2(tmp_path: Path, capsys, monkeypatch):
    good = {"prompt": "q", "chosen": " a", "rejected": " b"}
    source = _write(tmp_path / "prefs.jsonl", [good] + [row for row, _ in BAD_ROWS] + ["{not json"])
    config = _config(tmp_path, source, "dpo")
    assert build_dataset(config) == 0
    stats = json.loads(stats_path_for(tmp_path / "out" / "all.jsonl").read_text())
    assert stats["preference_bad_records"] == len(BAD_ROWS) + 1 and stats["samples_total"] == 1
    for n, (_, reason) in enumerate(BAD_ROWS, 2):
        assert any(detail.startswith(f"{source}:{n}: ") and reason in detail for detail in stats["bad_line_details"]), reason
    assert "Created 1 preference pairs and 0 unpaired completions" in capsys.readouterr().out

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(f"data: {{output_path: strict/all.jsonl, strict: true, sources: [{{type: preference, path: {source}}}]}}\n"
                    "training: {objective: dpo}\n")
    assert main(["data", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{source}:2: missing `rejected`" in err and "data.strict is true" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "strict" / "all.jsonl").exists()


def test_objective_and_dataset_kind_must_match(tmp_path: Path, tokenizer):
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [ASK_FEE, _assistant("2%")], "source": "chat", "kind": "conversation"}) + "\n")
    config = load_config(None, [f"data.output_path={chat}", f"data.sources=[{{type: preference, path: {chat}}}]",
                                "training.objective=orpo"])
    with pytest.raises(UserError, match=rf"{chat} holds chat records, .* rebuild it with `moetune data`"):
        build_train_eval_datasets(config, tokenizer)

    source = _write(tmp_path / "prefs.jsonl", FORMATS["unpaired"][1] + FORMATS["standard"][1])
    build_dataset(_config(tmp_path, source, "kto"))
    sft = load_config(None, [f"data.output_path={tmp_path / 'out' / 'all.jsonl'}", "training.objective=sft"])
    with pytest.raises(UserError, match=r"holds preference records, .* training.objective is 'sft'"):
        build_train_eval_datasets(sft, tokenizer)
    with pytest.raises(UserError, match=r"'dpo' needs prompt/chosen/rejected pairs; 3 records .* are unpaired"):
        build_train_eval_datasets(_config(tmp_path, source, "dpo"), tokenizer)
    kto = build_train_eval_datasets(_config(tmp_path, source, "kto"), tokenizer)
    assert kto.stats["train_samples"] == 3 + 2 * 2  # each pair is two completions


def test_split_keeps_a_prompt_on_one_side_and_kl_rows_are_cut_to_the_limit():
    a = {"source": "preference", "kind": "pair", "prompt": "q", "chosen": " a", "rejected": " b"}
    assert split_unit(a) == split_unit({**a, "chosen": " c"}) != split_unit({**a, "prompt": "r"})
    first, second = ([1, 5, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 6, 7]), ([1, 8, 9], [IGNORE_INDEX, IGNORE_INDEX, 9])
    assert kl_row(first, second) == ([1, 5, 9], [IGNORE_INDEX, IGNORE_INDEX, 9])
    assert kl_row(second, first) == ([1, 8, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 6, 7])
    assert kl_row(second, first, max_length=3) == ([1, 8, 6], [IGNORE_INDEX, IGNORE_INDEX, 6])


def test_kl_partners_stay_fixed_across_shuffles(tmp_path: Path, tokenizer):
    rows = [{"prompt": f"Question {n}?", "chosen": f" Yes {n}.", "rejected": f" No {n}."} for n in range(6)]
    config = _config(tmp_path, _write(tmp_path / "prefs.jsonl", rows), "kto", "training.per_device_train_batch_size=3")
    build_dataset(config)
    train, _, data = build_dataloaders(config, tokenizer)
    kl_of = {}
    for _ in range(2):  # two epochs, shuffled differently: each row's KL row is the same
        for batch in train:
            for n, index in enumerate(batch["pair_index"].tolist()):
                seen = _unpadded(batch, n, "kl_")
                assert kl_of.setdefault(index, seen) == seen
    assert len(kl_of) == 12
    assert build_train_eval_datasets(config, tokenizer).train.partner.tolist() == data.train.partner.tolist()


def test_show_prints_each_side(tmp_path: Path, capsys):
    source = _write(tmp_path / "prefs.jsonl", FORMATS["conversational"][1][:1] + FORMATS["unpaired"][1][:1])
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{random_init: true, architecture: mixtral, tokenizer_vocab_size: 300}}\n"
                      f"data: {{output_path: {tmp_path / 'out' / 'all.jsonl'}, chat_template: chatml, "
                      f"sources: [{{type: preference, path: {source}}}]}}\n"
                      f"validation: {{validation_split: 0}}\ntraining: {{objective: kto, output_dir: {tmp_path / 'run'}}}\n")
    assert main(["data", "--config", str(config), "--show", "2"]) == 0
    shown = capsys.readouterr().out
    assert "preference pair (chosen side)" in shown and "preference pair (rejected side)" in shown
    assert "<|im_start|>assistant\n⟦A 2% fee.<|im_end|>⟧" in shown and "⟦No fee at all.<|im_end|>⟧" in shown
    assert "preference unpaired (desirable side)" in shown and "What fee applies to card refunds?⟦ A 2% fee.</s>⟧" in shown
    assert "3 sides of the first 2 training records" in shown


def test_a_prompt_its_sides_tokenize_differently_is_counted_and_kept(tmp_path: Path, tokenizer):
    # " fee" is one token of this vocabulary: the chosen side merges the prompt's end into its completion.
    rows = [{"prompt": "What fe", "chosen": "e applies?", "rejected": "w apply?"}]
    config = _config(tmp_path, _write(tmp_path / "prefs.jsonl", rows), "dpo")
    build_dataset(config)
    data = build_train_eval_datasets(config, tokenizer)
    assert data.stats["train_preference"]["prompt_differs"] == 1 and len(data.train) == 1
    assert any("1 pairs whose sides tokenize their shared prompt differently" in line for line in data_lines(data.stats))
