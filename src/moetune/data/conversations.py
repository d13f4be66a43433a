"""A dataset row -> one conversation in the dataset's ``messages`` shape, with the turns that train marked.

Rows come in the shapes people fine-tune on:

- OpenAI ``messages``: ``role``/``content``, ``tool_calls`` (arguments as a JSON object or JSON text),
  ``tool_call_id``, ``name``, reasoning as ``reasoning_content``, ``thinking`` or ``reasoning`` (or a
  ``<think>...</think>`` block opening the content);
- ShareGPT ``conversations``: ``from``/``value`` with human, gpt, system, tool/observation and
  function_call (a JSON ``{"name", "arguments"}`` call) turns;
- any other field and keys, mapped (``field_messages``, ``role_key``, ``content_key``, ``roles``).

Every message comes out as ``{"role", "content"}`` plus, when present, ``reasoning_content``, ``tool_calls``
(``[{"type": "function", "id"?, "function": {"name", "arguments": {...}}}]``), ``tool_call_id``, ``name``,
and ``train`` (true on the turns that carry loss). Anything that cannot be read as a conversation raises
:class:`BadConversation` with the reason.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

ROLES = ("system", "developer", "user", "assistant", "tool")
# ShareGPT's and other datasets' role names -> moetune's.
DEFAULT_ROLE_NAMES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant",
                      "observation": "tool", "function_response": "tool", "ipython": "tool", "function": "tool"}
_THINK = re.compile(r"\A\s*<think>(.*?)</think>\s*", re.DOTALL)
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class BadConversation(ValueError):
    """A row that is not a conversation moetune can train on; the message says why."""


@dataclass(frozen=True)
class ConversationFormat:
    """How a file's rows hold their conversation: detected from the first row, or mapped in the source config."""

    field: str
    role_key: str
    content_key: str
    shape: Literal["openai", "sharegpt", "mapped"]


def detect_format(row: Mapping[str, Any], field: str | None, role_key: str | None, content_key: str | None) -> ConversationFormat:
    """The format of a file from its first row (``messages`` -> OpenAI, ``conversations`` -> ShareGPT), or the mapping."""
    if field is not None:
        return ConversationFormat(field, role_key or "role", content_key or "content", "mapped")
    if "messages" in row:
        return ConversationFormat("messages", role_key or "role", content_key or "content", "openai")
    if "conversations" in row:
        return ConversationFormat("conversations", role_key or "from", content_key or "value", "sharegpt")
    raise BadConversation(f"no `messages` (OpenAI) or `conversations` (ShareGPT) field (keys: {_keys(row)}); name the "
                          "field holding the conversation with field_messages")


def read_conversation(row: Mapping[str, Any], fmt: ConversationFormat, roles: Mapping[str, str]) -> list[dict]:
    """The row's messages in moetune's shape (``train`` not set yet)."""
    if fmt.field not in row:
        other = "conversations" if fmt.field == "messages" else "messages" if fmt.field == "conversations" else None
        if other is not None and other in row and fmt.shape != "mapped":
            raise BadConversation(f"mixed shapes: this file's first row holds `{fmt.field}`, this one `{other}`")
        raise BadConversation(f"no `{fmt.field}` field (keys: {_keys(row)})")
    raw = row[fmt.field]
    if isinstance(raw, str):
        raw = _json(raw, f"`{fmt.field}` is text that is not JSON")
    if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)) or not raw:
        raise BadConversation(f"`{fmt.field}` must be a non-empty list of messages, got {_type(raw)}")
    names = {**DEFAULT_ROLE_NAMES, **roles}
    return [_message(item, n, fmt, names) for n, item in enumerate(raw)]


def mark_trained(messages: list[dict], roles_to_train: Sequence[str], train_on_turns: Literal["all", "last"]) -> list[dict]:
    """``messages`` with ``train`` set: the turns of ``roles_to_train`` (all, or the last one), unless a message
    says itself (``train: true|false`` in the data). A conversation with no trained turn is bad."""
    chosen = [n for n, m in enumerate(messages) if m["role"] in roles_to_train and m.get("train") is not False]
    if train_on_turns == "last":
        chosen = chosen[-1:]
    out = []
    for n, message in enumerate(messages):
        explicit = message.get("train")
        out.append({**message, "train": bool(explicit) if explicit is not None else n in chosen})
    if not any(m["train"] for m in out):
        raise BadConversation(f"no trainable turn (no {' or '.join(roles_to_train)} message, or every one has train: false)")
    return out


def with_system(messages: list[dict], system: Any) -> list[dict]:
    """A record-level ``system`` prompt as the first message (unless the conversation opens with one)."""
    if system is None or system == "":
        return messages
    if not isinstance(system, str):
        raise BadConversation(f"`system` must be a string, got {_type(system)}")
    if messages and messages[0]["role"] in ("system", "developer"):
        return messages
    return [{"role": "system", "content": system}, *messages]


def read_tools(value: Any) -> list[dict] | None:
    """A record's ``tools``: a list of JSON schemas (or JSON text of one); None when absent."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        value = _json(value, "`tools` is text that is not JSON")
    if not isinstance(value, list) or not all(isinstance(tool, Mapping) for tool in value):
        raise BadConversation(f"`tools` must be a list of JSON schema objects, got {_type(value)}")
    return [dict(tool) for tool in value]


def _message(item: Any, n: int, fmt: ConversationFormat, names: Mapping[str, str]) -> dict:
    if not isinstance(item, Mapping):
        raise BadConversation(f"message {n} must be an object, got {_type(item)}")
    raw_role = item.get(fmt.role_key)
    if not isinstance(raw_role, str):
        raise BadConversation(f"message {n} has no `{fmt.role_key}` (keys: {_keys(item)})")
    role = names.get(raw_role, raw_role)
    if raw_role == "function_call":
        return _sharegpt_call(item.get(fmt.content_key), n)
    if role not in ROLES:
        raise BadConversation(f"message {n}: unknown role {raw_role!r} (known: {', '.join(ROLES)}, "
                              f"{', '.join(sorted(DEFAULT_ROLE_NAMES))}; map others with roles: {{{raw_role}: ...}})")
    message: dict[str, Any] = {"role": role, "content": _content(item.get(fmt.content_key), n)}
    reasoning = next((item[key] for key in REASONING_KEYS if isinstance(item.get(key), str) and item[key]), None)
    think = _THINK.match(message["content"]) if role == "assistant" else None
    if think is not None:
        reasoning = reasoning or think.group(1).strip("\n")
        message["content"] = message["content"][think.end():]
    if reasoning:
        message["reasoning_content"] = reasoning
    calls = item.get("tool_calls")
    if calls:
        if role != "assistant":
            raise BadConversation(f"message {n}: only assistant messages make tool calls, this one is {role}")
        message["tool_calls"] = [_tool_call(call, n) for call in (calls if isinstance(calls, list) else [calls])]
    for key in ("tool_call_id", "name"):
        if isinstance(item.get(key), str) and item[key]:
            message[key] = item[key]
    if "train" in item and item["train"] is not None:
        if not isinstance(item["train"], bool):
            raise BadConversation(f"message {n}: `train` must be true or false, got {item['train']!r}")
        message["train"] = item["train"]
    if not message["content"].strip() and not message.get("tool_calls"):
        raise BadConversation(f"message {n} ({role}) has no content")
    return message


def _content(value: Any, n: int) -> str:
    """A message's text: a string, or the text parts of a list of content parts; "" when absent."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = [part.get("text") if isinstance(part, Mapping) else part for part in value]
        if all(isinstance(text, str) for text in texts):
            return "".join(texts)
    raise BadConversation(f"message {n}: content must be text or a list of text parts, got {_type(value)}")


def _tool_call(call: Any, n: int) -> dict:
    if not isinstance(call, Mapping):
        raise BadConversation(f"message {n}: a tool call must be an object, got {_type(call)}")
    function = call.get("function", call)
    name, arguments = (function.get("name"), function.get("arguments")) if isinstance(function, Mapping) else (None, None)
    if not isinstance(name, str) or not name:
        raise BadConversation(f"message {n}: a tool call has no function name")
    if isinstance(arguments, str):
        arguments = _json(arguments, f"message {n}: the arguments of tool call {name!r} are not JSON")
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, Mapping):
        raise BadConversation(f"message {n}: the arguments of tool call {name!r} must be a JSON object, got {_type(arguments)}")
    out: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": dict(arguments)}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _sharegpt_call(value: Any, n: int) -> dict:
    """A ShareGPT ``function_call`` turn: its value is the JSON call ``{"name", "arguments"}``."""
    call = _json(value, f"message {n}: the function_call is not JSON") if isinstance(value, str) else value
    return {"role": "assistant", "content": "", "tool_calls": [_tool_call(call, n)]}


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError) as err:
        raise BadConversation(f"{what} ({getattr(err, 'msg', err)})") from None


def _keys(row: Mapping[str, Any]) -> str:
    return ", ".join(f"`{key}`" for key in list(row)[:8]) or "none"


def _type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
