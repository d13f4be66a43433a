"""Loss masks of conversations, per chat template, against the reference: the trained tokens are exactly each
assistant reply (its tool call included) and its end-of-turn token; reasoning only when asked."""

from __future__ import annotations

import pytest

from moetune.data.chat_render import ConversationError, chat_renderer
from moetune.data.encode import IGNORE_INDEX, encode
from moetune.errors import UserError

from .chat_template_fixtures import TEMPLATES, template_tokenizer

SYSTEM = {"role": "system", "content": "You are a payments assistant."}
MULTI_TURN = [
    SYSTEM,
    {"role": "user", "content": "What fee applies to card refunds?"},
    {"role": "assistant", "reasoning_content": "Refund fees follow the card fee.", "content": "Card refunds carry a 2% fee.",
     "train": True},
    {"role": "user", "content": "And bank transfers?"},
    {"role": "assistant", "reasoning_content": "Bank transfers are flat.", "content": "Bank transfers cost 0.50 EUR.",
     "train": True},
]
TOOLS = [{"type": "function", "function": {"name": "get_balance", "description": "Balance of an account.",
                                           "parameters": {"type": "object", "properties": {"account": {"type": "string"}},
                                                          "required": ["account"]}}}]
TOOL_CALLING = [
    SYSTEM,
    {"role": "user", "content": "What is the balance of acct_42?"},
    {"role": "assistant", "reasoning_content": "I should look it up.", "content": "", "train": True,
     "tool_calls": [{"type": "function", "id": "call00042",
                     "function": {"name": "get_balance", "arguments": {"account": "acct_42"}}}]},
    {"role": "tool", "tool_call_id": "call00042", "content": '{"balance": "120.00 EUR"}'},
    {"role": "assistant", "content": "The balance of acct_42 is 120.00 EUR.", "train": True},
]

REPLY_1, REPLY_2 = "Card refunds carry a 2% fee.", "Bank transfers cost 0.50 EUR."
FINAL = "The balance of acct_42 is 120.00 EUR."
QWEN_CALL = '<tool_call>\n{"name": "get_balance", "arguments": {"account": "acct_42"}}\n</tool_call>'
# (template, conversation, train_reasoning) -> the trained text, one string per trained turn.
EXPECTED = {
    ("qwen3", "multi_turn", False): [REPLY_1 + "<|im_end|>", REPLY_2 + "<|im_end|>"],
    # The first reply's reasoning is dropped by the template (it precedes the last user turn): nothing to train.
    ("qwen3", "multi_turn", True): [REPLY_1 + "<|im_end|>",
                                    "<think>\nBank transfers are flat.\n</think>\n\n" + REPLY_2 + "<|im_end|>"],
    ("qwen3", "tool_calling", False): [QWEN_CALL + "<|im_end|>", FINAL + "<|im_end|>"],
    ("qwen3", "tool_calling", True): ["<think>\nI should look it up.\n</think>\n\n" + QWEN_CALL + "<|im_end|>",
                                      FINAL + "<|im_end|>"],
    # Llama 2 writes " reply </s>"; the reply's first token carries the space before it (byte-level BPE: "ĠCard").
    ("llama2", "multi_turn", False): [f" {REPLY_1} </s>", f" {REPLY_2} </s>"],
    ("mistral_v3", "multi_turn", False): [f" {REPLY_1}</s>", f" {REPLY_2}</s>"],
    # The space before "The" is a token of its own in this small vocabulary: the template's, so not trained.
    ("mistral_v3", "tool_calling", False): [
        '[TOOL_CALLS] [{"name": "get_balance", "arguments": {"account": "acct_42"}, "id": "call00042"}]</s>', f"{FINAL}</s>"],
    ("harmony", "multi_turn", False): [REPLY_1 + "<|end|>", REPLY_2 + "<|return|>"],
    ("harmony", "multi_turn", True): [REPLY_1 + "<|end|>", "<|channel|>analysis<|message|>Bank transfers are flat.<|end|>"
                                      "<|start|>assistant<|channel|>final<|message|>" + REPLY_2 + "<|return|>"],
    # The call's reasoning is dropped (a final answer follows); the call itself is the model's to write.
    ("harmony", "tool_calling", False): [' to=functions.get_balance<|channel|>commentary json<|message|>'
                                         '{"account": "acct_42"}<|call|>', FINAL + "<|return|>"],
    ("deepseek_v31", "multi_turn", False): [REPLY_1 + "<｜end▁of▁sentence｜>", REPLY_2 + "<｜end▁of▁sentence｜>"],
    ("deepseek_v31", "tool_calling", False): [
        '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_balance<｜tool▁sep｜>{"account": "acct_42"}<｜tool▁call▁end｜>'
        "<｜tool▁calls▁end｜><｜end▁of▁sentence｜>", FINAL + "<｜end▁of▁sentence｜>"],
    # GLM has no end-of-turn token: a reply ends with the next role's token, the last one with eos (appended).
    ("glm45", "multi_turn", False): [REPLY_1 + "<|user|>", REPLY_2 + "<|endoftext|>"],
    ("glm45", "multi_turn", True): [REPLY_1 + "<|user|>",
                                    "\n<think>Bank transfers are flat.</think>\n" + REPLY_2 + "<|endoftext|>"],
    ("glm45", "tool_calling", False): ["<tool_call>get_balance\n<arg_key>account</arg_key>\n<arg_value>acct_42</arg_value>\n"
                                       "</tool_call><|observation|>", FINAL + "<|endoftext|>"],
}
CONVERSATIONS = {"multi_turn": MULTI_TURN, "tool_calling": TOOL_CALLING}


def trained_runs(tokenizer, row: dict) -> list[str]:
    """The trained tokens of an encoded row, decoded run by run."""
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"], strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


@pytest.mark.parametrize(("template", "conversation", "train_reasoning"), list(EXPECTED),
                         ids=[f"{t}-{c}" + ("-reasoning" if r else "") for t, c, r in EXPECTED])
def test_trained_tokens_are_exactly_each_reply_and_its_end_of_turn(template, conversation, train_reasoning):
    tokenizer = template_tokenizer(template)
    record = {"messages": CONVERSATIONS[conversation], "tools": TOOLS if conversation == "tool_calling" else None,
              "train_reasoning": train_reasoning, "source": "chat"}
    encoded = encode([record], tokenizer, 4096)
    assert encoded.stats == {"truncated": 0, "split": 0, "dropped": 0, "bad": 0}
    [row] = encoded.dataset
    assert trained_runs(tokenizer, row) == EXPECTED[(template, conversation, train_reasoning)]
    # The rendering is the template's own: apply_chat_template gives the same tokens (before an appended eos).
    as_the_template_reads = [chat_renderer(tokenizer, TEMPLATES[template])._template_message(m) for m in record["messages"]]
    reference = tokenizer.apply_chat_template(as_the_template_reads, tools=record["tools"], tokenize=True, return_dict=False)
    assert row["input_ids"][:len(reference)] == reference


def test_a_template_that_raises_names_its_message():
    renderer = chat_renderer(template_tokenizer("llama2"), TEMPLATES["llama2"])
    with pytest.raises(ConversationError, match="the chat template raised: .*roles must alternate"):
        renderer.render(TOOL_CALLING)


def test_untrained_turns_and_user_turns_when_asked():
    tokenizer = template_tokenizer("qwen3")
    renderer = chat_renderer(tokenizer, TEMPLATES["qwen3"])
    messages = [dict(m, train=m["role"] == "user") for m in MULTI_TURN]
    rendered = renderer.render(messages)
    assert [rendered.text[s:e] for s, e in rendered.trained] == [
        "What fee applies to card refunds?<|im_end|>", "And bank transfers?<|im_end|>"]
    assert rendered.turn_ends == [e for _, e in rendered.trained]


def test_a_conversation_the_template_cannot_render_is_skipped_and_counted_or_stops_under_strict(capsys):
    tokenizer = template_tokenizer("llama2")  # roles must alternate: a tool message makes it raise
    good = {"messages": MULTI_TURN, "source": "chat", "file": "chats.jsonl", "line": 1}
    bad = {"messages": TOOL_CALLING, "source": "chat", "file": "chats.jsonl", "line": 2}
    encoded = encode([good, bad], tokenizer, 4096)
    assert [row["record"] for row in encoded.dataset] == [0] and encoded.stats["bad"] == 1
    assert "skipped conversation chats.jsonl:2: the chat template raised: " in capsys.readouterr().err
    with pytest.raises(UserError, match=r"^chats.jsonl:2: the chat template raised: .*roles must alternate.*data.strict"):
        encode([good, bad], tokenizer, 4096, strict=True)


def test_a_conversation_without_a_template_names_data_chat_template():
    from moetune.data.tokenizer import train_bpe_tokenizer

    record = {"messages": MULTI_TURN, "source": "chat", "file": "chats.jsonl", "line": 3}
    with pytest.raises(UserError, match=r"chats.jsonl:3: a conversation needs a chat template.*set data.chat_template"):
        encode([record], train_bpe_tokenizer(["a b c"], 260), 256)
