"""A preference record -> its sides, each a record the SFT rendering understands (:mod:`moetune.data.rendering`).

A pair gives [chosen side, rejected side], an unpaired record its one side. A side of string parts is a
``prompt`` + ``completion`` record; a side of messages is a ``messages`` record: the prompt's messages untrained,
the completion's assistant turns trained (its tool results, if any, are context and untrained), with
``truncate_completion`` so a too-long side is cut inside its completion as a string completion is. So a side gets
exactly SFT's chat template, masks, bos/eos and long-sample handling, and both sides of a pair are rendered from
one prompt (:mod:`moetune.data.preference_encode` checks that they also tokenize it alike).
"""

from __future__ import annotations

from typing import Any

SIDE_NAMES = ("chosen", "rejected")
"""A pair's sides, in the order :func:`preference_sides` gives them (and the batches stack them)."""
# What a side keeps of its record besides its content: where it came from and its label.
_CARRIED = ("source", "expert_label", "file", "line", "row")


def preference_sides(record: dict[str, Any]) -> list[dict[str, Any]]:
    """[chosen side, rejected side] of a pair, [its side] of an unpaired record (see the module docstring)."""
    completions = [record[name] for name in SIDE_NAMES] if "chosen" in record else [record["completion"]]
    carried = {key: record[key] for key in _CARRIED if key in record}
    return [{**_side(record["prompt"], completion, record.get("tools")), **carried} for completion in completions]


def _side(prompt: str | list[dict], completion: str | list[dict], tools: list | None) -> dict[str, Any]:
    if isinstance(prompt, str):
        return {"prompt": prompt, "completion": completion}
    messages = [{**m, "train": False} for m in prompt] + [{**m, "train": m["role"] == "assistant"} for m in completion]
    return {"messages": messages, **({"tools": tools} if tools else {}), "truncate_completion": True}
