"""A conversation rendered once by its chat template, and the character spans of the turns that carry loss.

The conversation is rendered as it is, once. To find each message in that text the template also renders
a *skeleton* of the same conversation, every message's content and reasoning replaced by a placeholder no
template writes itself: the skeleton's text between placeholders is the template's own markup, which the
real rendering must hold in the same order. Aligning the two gives every rendered piece's exact span,
whatever the template did to it (stripped it, escaped it as JSON) and wherever it went (a system prompt
moved into a user turn); a piece the template dropped (earlier turns' reasoning) has no span. Nothing is
rendered message by message, so templates that rewrite earlier turns are rendered exactly as they are.

A trained turn's span (see :mod:`moetune.data.template_anatomy` for the facts it uses):

- begins at its content; at its tool call's opening markup when the call comes first (``<tool_call>``,
  `` to=functions.``); or, when its reasoning is trained, right after the assistant header;
- ends after the first end-of-turn token that follows its last piece (``<|im_end|>``, ``<|return|>``,
  ``<|call|>``, ``</s>``, GLM's next-role token). The role header is never trained; nor is reasoning,
  unless ``train_reasoning``. A template that writes no end-of-turn token after the final turn gets the
  tokenizer's eos token appended, so the model learns to stop.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from moetune.data.template_anatomy import TemplateAnatomy, TemplateRaised, render, template_anatomy

# Placeholders: private-use characters around the message index and the piece (c: content, r: reasoning).
_PLACEHOLDER = re.compile("\ue000(\\d+)([cr])\ue001")
# Message fields a template reads; `train` and any dataset extras stay out of the template's sight.
_TEMPLATE_FIELDS = ("role", "content", "reasoning_content", "tool_calls", "tool_call_id", "name")


class ConversationError(ValueError):
    """A conversation that cannot become a sample; the message says why (names the message by its index)."""


@dataclass
class RenderedConversation:
    """The rendering and where its trained turns are.

    ``trained``: (start, end) character spans with loss, in order. ``turn_ends``: the end of each trained
    turn, where a too-long sample may be cut and stay whole.
    """

    text: str
    trained: list[tuple[int, int]] = field(default_factory=list)
    turn_ends: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class ChatRenderer:
    """Renders conversations with one template as one tokenizer sees it (see :func:`chat_renderer`)."""

    template: str
    special_tokens: tuple[tuple[str, str], ...]
    anatomy: TemplateAnatomy
    eos_token: str | None

    def render(self, messages: list[dict], tools: list | None = None, train_reasoning: bool = False) -> RenderedConversation:
        """The conversation rendered once, with the spans of the messages whose ``train`` is true."""
        real = [self._template_message(m) for m in messages]
        skeleton = [dict(m) for m in real]
        pieces: dict[tuple[int, str], str] = {}
        for i, message in enumerate(skeleton):
            for key, field_name in (("c", "content"), ("r", "reasoning_content")):
                if message.get(field_name):
                    pieces[(i, key)] = message[field_name]
                    message[field_name] = f"\ue000{i}{key}\ue001"
        try:
            text, skeleton_text = render(self.template, self.special_tokens, [real, skeleton], tools=tools)
        except TemplateRaised as err:
            raise ConversationError(f"the chat template raised: {err}") from None
        spans = _align(text, skeleton_text, pieces)
        return self._trained_turns(text, messages, spans, train_reasoning)

    def render_prompt(self, messages: list[dict], tools: list | None = None) -> str:
        """``messages`` followed by the generation prompt: what the model continues with the next assistant turn."""
        try:
            [text] = render(self.template, self.special_tokens, [[self._template_message(m) for m in messages]],
                            tools=tools, add_generation_prompt=True)
        except TemplateRaised as err:
            raise ConversationError(f"the chat template raised: {err}") from None
        return text

    def _template_message(self, message: dict) -> dict:
        out = {key: message[key] for key in _TEMPLATE_FIELDS if message.get(key) is not None}
        out.setdefault("content", "")
        if self.anatomy.tool_arguments_as_text and out.get("tool_calls"):
            out["tool_calls"] = [_with_text_arguments(call) for call in out["tool_calls"]]
        return out

    def _trained_turns(self, text: str, messages: list[dict], spans: dict, train_reasoning: bool) -> RenderedConversation:
        rendered = RenderedConversation(text)
        located = sorted((span, i) for (i, _), span in spans.items())
        for i, message in enumerate(messages):
            if not message.get("train"):
                continue
            own = [spans[key] for key in ((i, "r"), (i, "c")) if key in spans]
            previous_end = max((end for (start, end), j in located if j < i), default=0)
            next_start = min((start for (start, end), j in located if j > i), default=len(text))
            start, last_end = self._turn_start(text, message, spans.get((i, "c")), spans.get((i, "r")), own,
                                               previous_end, next_start, train_reasoning, i)
            end = self._turn_end(rendered, last_end, next_start, i)
            rendered.trained.append((start, end))
            rendered.turn_ends.append(end)
        if rendered.trained and any(b[0] < a[1] for a, b in zip(rendered.trained, rendered.trained[1:], strict=False)):
            raise ConversationError("the chat template renders its turns out of order; their spans overlap")
        return rendered

    def _turn_start(self, text: str, message: dict, content, reasoning, own, previous_end: int, next_start: int,
                    train_reasoning: bool, index: int) -> tuple[int, int]:
        """(where the turn's trained span begins, where its last piece ends)."""
        calls = message.get("tool_calls") or []
        cursor = max([previous_end] + [end for _, end in own])
        call_start = None
        for n, call in enumerate(calls):
            name = call["function"]["name"]
            opening = self.anatomy.tool_open or ""
            at = text.find(opening + name, cursor, next_start) if opening else -1
            at = at + len(opening) if at >= 0 else text.find(name, cursor, next_start)
            if at < 0:
                raise ConversationError(f"message {index}: the chat template did not render its tool call {name!r}"
                                        + ("" if self.anatomy.tool_open is not None else
                                           " (this template renders no tool calls)"))
            if n == 0:
                call_start = at - len(opening) if opening and text.startswith(opening, at - len(opening)) else at
            cursor = at + len(name)
        last_end = cursor
        if train_reasoning and reasoning is not None:
            header = self.anatomy.header
            at = text.rfind(header, previous_end, reasoning[0]) if header else -1
            return (at + len(header) if at >= 0 else reasoning[0]), last_end
        starts = [s for s in (content[0] if content else None, call_start) if s is not None]
        if not starts:
            raise ConversationError(f"message {index} ({message.get('role')}) is trained but the chat template rendered "
                                    "nothing of it to train on (no content, no tool call)")
        return min(starts), last_end

    def _turn_end(self, rendered: RenderedConversation, last_end: int, next_start: int, index: int) -> int:
        text = rendered.text
        found = [(at, -len(token), token) for token in self.anatomy.end_of_turn
                 if 0 <= (at := text.find(token, last_end, next_start))]
        if found:
            at, _, token = min(found)
            return at + len(token)
        if next_start == len(text) and self.eos_token:
            # Nothing after the final turn ends it (GLM): append eos so the model learns to stop here.
            rendered.text = text + self.eos_token
            return len(rendered.text)
        raise ConversationError(f"message {index}: no end-of-turn token ({', '.join(self.anatomy.end_of_turn) or 'none known'}) "
                                "follows it in the chat template's rendering, so moetune cannot tell where the turn ends")


def chat_renderer(tokenizer, template: str) -> ChatRenderer:
    """A renderer for ``template`` with ``tokenizer``'s special tokens (the anatomy is cached per template)."""
    special_tokens = tuple(sorted((k, v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)))
    added = tuple(sorted({token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
                         | set(tokenizer.all_special_tokens)))
    return ChatRenderer(template, special_tokens, template_anatomy(template, special_tokens, added), tokenizer.eos_token)


def _with_text_arguments(call: dict) -> dict:
    function = call.get("function", call)
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        return call
    function = {**function, "arguments": json.dumps(arguments, ensure_ascii=False)}
    return {**call, "function": function} if "function" in call else function


def _align(text: str, skeleton: str, pieces: dict[tuple[int, str], str]) -> dict[tuple[int, str], tuple[int, int]]:
    """Each placeholder's span in ``text``: the skeleton's markup between placeholders is matched in order."""
    parts = _PLACEHOLDER.split(skeleton)
    segments, keys = parts[0::3], list(zip(map(int, parts[1::3]), parts[2::3], strict=True))
    if not text.startswith(segments[0]):
        raise ConversationError(_MISMATCH)
    position, spans = len(segments[0]), {}
    for n, key in enumerate(keys):
        after, piece = segments[n + 1], pieces[key]
        if not after and n + 1 == len(keys):
            end = len(text)
        elif text.startswith(piece + after, position):
            end = position + len(piece)  # rendered as written: the common case, and exact
        elif after:
            end = text.find(after, position)
        else:
            end = -1  # two pieces with no markup between them, and the first was changed: cannot be told apart
        if end < 0:
            raise ConversationError(_MISMATCH)
        spans.setdefault(key, (position, end))
        position = end + len(after)
    if position != len(text):
        raise ConversationError(_MISMATCH)
    return spans


_MISMATCH = ("the chat template renders this conversation's markup differently when its text changes (it branches on "
             "the content), so moetune cannot locate the turns in it")
