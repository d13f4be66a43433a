"""A data row -> one preference record: a prompt with a chosen and a rejected completion, or one labelled completion.

The row shapes are TRL's preference dataset formats:

- paired, standard: ``prompt``, ``chosen``, ``rejected`` strings;
- paired, conversational: ``prompt`` a list of messages, ``chosen`` and ``rejected`` lists of messages (the
  completions, opening with an assistant turn); or no ``prompt`` and ``chosen`` / ``rejected`` whole
  conversations sharing their opening messages (TRL's implicit prompt): the prompt is the longest shared
  message prefix, and both sides must go on from it with an assistant turn;
- unpaired (KTO): ``prompt``, ``completion`` (strings, or messages) and ``label`` (true: a desirable completion).

Messages are read as the chat kind reads them (:mod:`moetune.data.conversations`: OpenAI roles and keys,
tool calls, reasoning). A row that is none of these raises :class:`BadPreference` saying why.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from moetune.data.conversations import BadConversation, ConversationFormat, read_conversation, read_tools, with_system


class BadPreference(ValueError):
    """A row that is not a preference record moetune can train on; the message says why."""


@dataclass(frozen=True)
class PreferenceFields:
    """Which of a row's fields hold which part (the source config's ``field_*`` options)."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    completion: str = "completion"
    label: str = "label"
    expert_label: str = "expert_label"
    system: str = "system"
    tools: str = "tools"


def read_preference(row: Mapping[str, Any], fields: PreferenceFields) -> dict[str, Any]:
    """The preference record of ``row``, without its place: ``kind`` (``pair`` or ``unpaired``), ``prompt`` and
    ``chosen`` + ``rejected`` or ``completion`` + ``desirable``, ``tools`` when given, ``expert_label`` (None when
    absent), and ``implicit_prompt`` (True when the prompt was the sides' shared opening)."""
    paired = _present(row, fields.chosen) or _present(row, fields.rejected)
    if not paired and not _present(row, fields.completion):
        raise BadPreference(f"needs `{fields.chosen}` and `{fields.rejected}` (a pair) or `{fields.completion}` and "
                            f"`{fields.label}` (an unpaired completion); keys: {_keys(row)}")
    parts = (fields.chosen, fields.rejected) if paired else (fields.completion,)
    for name in parts:
        if not _present(row, name):
            raise BadPreference(f"missing `{name}`")
    try:
        record = _paired(row, fields) if paired else _unpaired(row, fields)
        tools = read_tools(row.get(fields.tools))
    except BadConversation as err:
        raise BadPreference(str(err)) from None
    if tools:
        if isinstance(record["prompt"], str):
            raise BadPreference(f"`{fields.tools}` go with conversations; this record's parts are strings")
        record["tools"] = tools
    record["expert_label"] = _expert_label(row.get(fields.expert_label), fields.expert_label)
    return record


def _paired(row: Mapping[str, Any], fields: PreferenceFields) -> dict[str, Any]:
    chosen, rejected = row[fields.chosen], row[fields.rejected]
    if not _present(row, fields.prompt):
        prompt, chosen, rejected = _implicit_prompt(_messages(row, fields.chosen), _messages(row, fields.rejected), fields)
        prompt = with_system(prompt, row.get(fields.system))
        implicit = True
    else:
        prompt, implicit = row[fields.prompt], False
        if isinstance(prompt, str):
            _all_strings(row, (fields.prompt, fields.chosen, fields.rejected))
            prompt = _with_system_text(_text(row, fields.prompt), row.get(fields.system), fields.system)
            chosen, rejected = _text(row, fields.chosen), _text(row, fields.rejected)
        else:
            prompt = with_system(_messages(row, fields.prompt), row.get(fields.system))
            chosen, rejected = (_completion_messages(row, name) for name in (fields.chosen, fields.rejected))
    if chosen == rejected:
        raise BadPreference(f"`{fields.chosen}` is identical to `{fields.rejected}`: the pair prefers nothing")
    return {"kind": "pair", "prompt": prompt, "chosen": chosen, "rejected": rejected, "implicit_prompt": implicit}


def _unpaired(row: Mapping[str, Any], fields: PreferenceFields) -> dict[str, Any]:
    if not _present(row, fields.prompt):
        raise BadPreference(f"missing `{fields.prompt}` (an unpaired completion needs its prompt)")
    if fields.label not in row or row[fields.label] is None:
        raise BadPreference(f"missing `{fields.label}` (true for a desirable completion, false for an undesirable one)")
    label = row[fields.label]
    if not isinstance(label, bool):
        raise BadPreference(f"`{fields.label}` must be true or false, got {label!r}")
    if isinstance(row[fields.prompt], str):
        _all_strings(row, (fields.prompt, fields.completion))
        prompt = _with_system_text(_text(row, fields.prompt), row.get(fields.system), fields.system)
        completion: str | list[dict] = _text(row, fields.completion)
    else:
        prompt = with_system(_messages(row, fields.prompt), row.get(fields.system))
        completion = _completion_messages(row, fields.completion)
    return {"kind": "unpaired", "prompt": prompt, "completion": completion, "desirable": label, "implicit_prompt": False}


def _implicit_prompt(chosen: list[dict], rejected: list[dict], fields: PreferenceFields):
    """(prompt, chosen completion, rejected completion): the longest shared opening and what follows it."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise BadPreference(f"no `{fields.prompt}`, and `{fields.chosen}` and `{fields.rejected}` share no opening "
                            "message to take as the prompt")
    if shared == len(chosen) == len(rejected):
        raise BadPreference(f"`{fields.chosen}` is identical to `{fields.rejected}`: the pair prefers nothing")
    for name, side in ((fields.chosen, chosen), (fields.rejected, rejected)):
        if shared == len(side):
            raise BadPreference(f"empty `{name}`: it ends where the shared prompt does (message {shared})")
        if side[shared]["role"] != "assistant":
            raise BadPreference(f"no shared prompt: `{fields.chosen}` and `{fields.rejected}` first differ at message "
                                f"{shared}, a {side[shared]['role']} turn in `{name}`; the prompt must end before an "
                                "assistant turn")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _messages(row: Mapping[str, Any], name: str) -> list[dict]:
    """The messages of field ``name``, read as the chat kind reads an OpenAI conversation."""
    if isinstance(row[name], str):
        raise BadPreference(f"`{name}` is a string but this record's other parts are lists of messages: use strings for "
                            "all parts, or messages for all")
    try:
        return read_conversation(row, ConversationFormat(name, "role", "content", "mapped"), {})
    except BadConversation as err:
        said = str(err)
        raise BadPreference(said if said.startswith(f"`{name}`") else f"`{name}`: {said}") from None


def _completion_messages(row: Mapping[str, Any], name: str) -> list[dict]:
    messages = _messages(row, name)
    if messages[0]["role"] != "assistant":
        raise BadPreference(f"`{name}` must open with an assistant message, got a {messages[0]['role']} message")
    return messages


def _all_strings(row: Mapping[str, Any], names: tuple[str, ...]) -> None:
    for name in names:
        if not isinstance(row[name], str):
            kind = "a list" if isinstance(row[name], list) else _type(row[name])
            raise BadPreference(f"`{name}` must be a string like `{names[0]}`, got {kind} (use strings for all parts, "
                                "or messages for all)")


def _text(row: Mapping[str, Any], name: str) -> str:
    if not row[name].strip():
        raise BadPreference(f"empty `{name}`")
    return row[name]


def _with_system_text(prompt: str, system: Any, field: str) -> str:
    """A string prompt with a system prompt before it, a blank line between (as the instruction kind writes it)."""
    if system is None or system == "":
        return prompt
    if not isinstance(system, str):
        raise BadPreference(f"`{field}` must be a string, got {_type(system)}")
    return system + "\n\n" + prompt


def _expert_label(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadPreference(f"`{field}` must be a string or null, got {_type(value)}")
    return value.strip() or None


def _present(row: Mapping[str, Any], name: str) -> bool:
    return row.get(name) is not None


def _keys(row: Mapping[str, Any]) -> str:
    return ", ".join(f"`{key}`" for key in list(row)[:8]) or "none"


def _type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
