"""A dataset record -> the text the model reads and the character spans that carry loss.

This is the one place that knows the record shapes of :mod:`moetune.data.records`; everything after it
(tokenizing, labels, long samples) works on a :class:`Rendered`, whatever the kind:

- ``text``: the whole text is trained; bos before it, eos after it (trained).
- ``prompt`` + ``completion``: the completion is trained, and the eos after it.
- ``messages``: rendered by the tokenizer's chat template (:mod:`moetune.data.chat_render`); the messages
  whose ``train`` is true are trained, each with its end-of-turn token. The template places its own special
  tokens. A record that also holds ``prompt`` + ``completion`` (an instruction) falls back to them when
  the tokenizer has no template; one that does not is an error naming ``data.chat_template``. With
  ``truncate_completion`` (a preference side) a too-long conversation is cut anywhere after its untrained
  opening, as a prompt/completion record is, rather than at a turn's end.

A preference record is never rendered whole: each of its sides is (:mod:`moetune.data.preference_sides`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moetune.data.chat_render import ChatRenderer, chat_renderer
from moetune.data.chat_templates import chat_template_of, require_chat_template
from moetune.data.records import is_preference
from moetune.errors import UserError


@dataclass
class Rendered:
    """What one record becomes before tokenization.

    ``trained``: (start, end) character spans with loss. ``turn_ends``: where a too-long sample may be cut and stay
    whole (the end of each trained turn); None: after any token past ``keep`` characters (a QA answer is cut,
    its question kept). ``bos`` / ``eos``: add the tokenizer's bos before the text / its eos after it (trained).
    """

    text: str
    trained: list[tuple[int, int]]
    turn_ends: list[int] | None = None
    keep: int = 0
    bos: bool = True
    eos: bool = True


def renderer_of(tokenizer) -> ChatRenderer | None:
    """The renderer of the tokenizer's chat template, or None when it has none."""
    template = chat_template_of(tokenizer)
    return chat_renderer(tokenizer, template) if template is not None else None


def render_record(record: dict[str, Any], renderer: ChatRenderer | None) -> Rendered:
    """The :class:`Rendered` form of a dataset record. Raises :class:`moetune.data.chat_render.ConversationError`
    for a conversation the template cannot render, and UserError for one met with no template or a preference record."""
    if is_preference(record):
        raise UserError(f"{record_location(record)}: a preference record is not one sample; it trains with "
                        "training.objective dpo, orpo or kto, which encode each of its sides.")
    if "messages" in record and (renderer is not None or "prompt" not in record):
        if renderer is None:
            require_chat_template(None, f"{record_location(record)}: a conversation")
        rendered = renderer.render(record["messages"], record.get("tools"), bool(record.get("train_reasoning")))
        if record.get("truncate_completion") and rendered.trained:
            keep = rendered.trained[0][0]
            return Rendered(rendered.text, rendered.trained, None, keep=keep, bos=False, eos=False)
        return Rendered(rendered.text, rendered.trained, rendered.turn_ends, bos=False, eos=False)
    if "text" in record:
        return Rendered(record["text"], [(0, len(record["text"]))])
    prompt, completion = record["prompt"], record["completion"]
    return Rendered(prompt + completion, [(len(prompt), len(prompt) + len(completion))], keep=len(prompt))


def answer_prompt(record: dict[str, Any], renderer: ChatRenderer | None) -> tuple[str, bool, str] | None:
    """(prompt text, whether bos goes before it, the reference answer) of a record whose answer evaluation
    generates: a prompt/completion record's prompt, or a conversation up to its final assistant turn with the
    generation prompt after it. None when the record has no answer to generate."""
    if "messages" in record and renderer is not None:
        messages = record["messages"]
        last = len(messages) - 1
        if last < 1 or messages[last].get("role") != "assistant" or not messages[last].get("content") \
                or messages[last].get("tool_calls"):
            return None
        return renderer.render_prompt(messages[:last], record.get("tools")), False, messages[last]["content"]
    if "prompt" in record and "completion" in record:
        return record["prompt"], True, record["completion"]
    return None


def record_location(record: dict[str, Any]) -> str:
    """Where a record came from, for messages about it: file:line, file:row (as its kind recorded it), or its source."""
    place = record.get("line", record.get("row"))
    return str(record.get("file", record.get("source", "a record"))) + (f":{place}" if place is not None else "")
