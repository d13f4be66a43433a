"""What a chat template writes around a turn, learned once per template by rendering probe conversations.

Masks come from one rendering of each real conversation (:mod:`moetune.data.chat_render`); to tell, in
that rendering, where an assistant turn's own tokens begin and end, a few facts about the template are
needed that no template states. They are read off renderings of tiny probe conversations:

- ``header``: what ``add_generation_prompt`` appends (``<|im_start|>assistant\\n``); where a turn begins
  when its reasoning is trained. Empty for templates that ignore the flag (Llama 2, Mistral).
- ``end_of_turn``: the tokens that end a turn (``<|im_end|>``, ``<|return|>``, ``</s>`` ...): the first
  special token the template writes after a reply, the tokenizer's eos token, and the end-of-turn tokens of
  common templates that the tokenizer has (GLM ends a turn with the next role's token, ``<|user|>`` or
  ``<|observation|>``, which no probe of a plain reply shows).
- ``tool_open``: what the template writes before a tool call's function name (``<tool_call>\\n{"name": "``,
  `` to=functions.``): the model writes it too, so it is trained. None when the template renders no tool call.
- ``tool_arguments_as_text``: the template needs a call's arguments as JSON text (DeepSeek concatenates
  them as a string); otherwise they are passed as an object, as most templates (and transformers) expect.
- ``stop``: the token the template writes after a final reply (``<|im_end|>``, ``<|return|>``): where a
  generation ends besides eos.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

# End-of-turn tokens of common templates, used when the tokenizer has them: ChatML, Llama 3, harmony
# (gpt-oss), Gemma, DeepSeek, GLM, Llama 2 / Mistral.
KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
                     "<｜end▁of▁sentence｜>", "<|user|>", "<|observation|>", "<|endoftext|>", "</s>")
PROBE_FUNCTION = "moetune_probe_function"
# Text no template writes itself, so a probe's reply is found exactly.
_REPLY, _QUESTION, _FOLLOW_UP = "\ue010reply\ue011", "\ue010question\ue011", "\ue010follow\ue011"


@dataclass(frozen=True)
class TemplateAnatomy:
    """See the module docstring for each field."""

    header: str
    end_of_turn: tuple[str, ...]
    tool_open: str | None
    tool_arguments_as_text: bool
    stop: tuple[str, ...] = ()


class TemplateRaised(ValueError):
    """The chat template raised (``raise_exception`` or a Jinja error); the message is the template's."""


def render(template: str, special_tokens: tuple[tuple[str, str], ...], conversations: list[list[dict]],
           tools: list | None = None, add_generation_prompt: bool = False) -> list[str]:
    """Each conversation rendered by ``template`` as ``tokenizer.apply_chat_template(tokenize=False)`` renders it
    (the special tokens map is passed as template variables, reasoning is aliased to the names templates read).
    Raises TemplateRaised with the template's message when it fails."""
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, _ = render_jinja_template(conversations, tools=tools or None, chat_template=template,
                                            add_generation_prompt=add_generation_prompt, **dict(special_tokens))
    except Exception as err:  # a template is code: jinja2 errors, TypeError on `str + dict`, raise_exception ...
        raise TemplateRaised(f"{type(err).__name__}: {err}".strip()) from None
    return rendered


@lru_cache(maxsize=16)
def template_anatomy(template: str, special_tokens: tuple[tuple[str, str], ...],
                     added_special: tuple[str, ...]) -> TemplateAnatomy:
    """The anatomy of ``template`` as a tokenizer with ``special_tokens`` (its special tokens map, as items) and
    ``added_special`` (every special token string it has) renders it."""
    user = {"role": "user", "content": _QUESTION}
    reply = {"role": "assistant", "content": _REPLY}
    header = _generation_prompt(template, special_tokens, user)
    end_of_turn = [token for token in KNOWN_END_OF_TURN if token in added_special]
    eos = dict(special_tokens).get("eos_token")
    if eos:
        end_of_turn.append(eos)
    stop = []
    for conversation in ([user, reply], [user, reply, {"role": "user", "content": _FOLLOW_UP}]):
        try:
            [text] = render(template, special_tokens, [conversation])
        except TemplateRaised:
            continue
        after = text.find(_REPLY)
        if after >= 0:
            first = _first_token_after(text, after + len(_REPLY), added_special)
            if first is not None:
                end_of_turn.append(first)
                if len(conversation) == 2:
                    stop.append(first)
    tool_open, as_text = _tool_open(template, special_tokens, user, reply)
    # Longest first, so a token that begins another (<|end|>, <|endoftext|>) is matched whole.
    ordered = tuple(sorted(dict.fromkeys(end_of_turn), key=lambda token: (-len(token), token)))
    return TemplateAnatomy(header, ordered, tool_open, as_text, tuple(stop))


def _generation_prompt(template: str, special_tokens, user: dict) -> str:
    try:
        without, with_prompt = (render(template, special_tokens, [[user]], add_generation_prompt=flag)[0]
                                for flag in (False, True))
    except TemplateRaised:
        return ""
    return with_prompt[len(without):] if with_prompt.startswith(without) else ""


def _first_token_after(text: str, start: int, tokens: tuple[str, ...]) -> str | None:
    found = [(text.find(token, start), -len(token), token) for token in tokens]
    found = [hit for hit in found if hit[0] >= 0]
    return min(found)[2] if found else None


def _tool_open(template: str, special_tokens, user: dict, reply: dict) -> tuple[str | None, bool]:
    """(what precedes a tool call's name, whether arguments must be JSON text); (None, False) when the template
    renders no tool call."""
    for as_text in (False, True):
        arguments = json.dumps({"probe": "value"}) if as_text else {"probe": "value"}
        call = {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "id": "probe0001", "function": {"name": PROBE_FUNCTION, "arguments": arguments}}]}
        try:
            plain, called = (render(template, special_tokens, [[user, message]])[0] for message in (reply, call))
        except TemplateRaised:
            continue
        name_at = called.find(PROBE_FUNCTION)
        if name_at < 0 or "value" not in called[name_at:]:
            continue  # the template ignores tool calls, or dropped the arguments it was given
        shared = _common_prefix_length(plain, called)
        return called[min(shared, name_at):name_at], as_text
    return None, False


def _common_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
