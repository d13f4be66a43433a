"""Batched generation with the ``inference`` settings, and the prompts evaluation generates from.

Prompts are left-padded so every row's last prompt token sits at the end of the batch and the
new tokens line up; the KV cache is on. Router logits are switched off while generating:
transformers' generation breaks when the model returns them.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from moetune.config.schema import InferenceConfig
from moetune.data.tokenizer import pad_token_id
from moetune.models.families import family_of

# Items whose body sits between braces after a `keyword name` signature.
_BODY_KEYWORDS = {"function": "fn", "struct": "struct", "enum": "enum", "trait": "trait", "module": "mod"}


def rust_generation_prompt(record: dict) -> tuple[str, str] | None:
    """(prompt, reference body) of a Rust item record, or None when it has no braced body.

    The prompt is the record's text up to and including the item's opening brace: the file header,
    doc comment, attributes, any ``impl`` header around a method, and the signature. The reference
    is what lies between that brace and its matching closing brace.
    """
    keyword = _BODY_KEYWORDS.get(record.get("kind", ""))
    text, name = record.get("text"), record.get("name")
    if keyword is None or not text or not name:
        return None
    signature = re.search(rf"\b{keyword}\s+{re.escape(name)}\b", text)
    if signature is None:
        return None
    open_brace = text.find("{", signature.end())
    close_brace = _matching_brace(text, open_brace) if open_brace >= 0 else -1
    if close_brace < 0:
        return None
    return text[:open_brace + 1], text[open_brace + 1:close_brace]


def _matching_brace(text: str, open_index: int) -> int:
    # Counting braces is wrong only for unbalanced braces inside string or char literals; such an
    # item then gets a longer or shorter reference body, which is only shown, never scored.
    depth = 0
    for i in range(open_index, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def prompt_token_budget(config) -> int:
    """Most prompt tokens kept: room for the answer inside the context the model was trained on
    (``model.max_seq_length``), but never less than half of it."""
    max_len = config.model.max_seq_length
    return max(max_len // 2, max_len - config.inference.max_new_tokens)


def stop_token_ids(tokenizer) -> list[int]:
    """The tokens that end a generation: eos, and the token the tokenizer's chat template ends a final reply with
    (``<|im_end|>``, ``<|return|>``), which a model trained on conversations writes instead of eos."""
    from moetune.data.rendering import renderer_of

    renderer = renderer_of(tokenizer)
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for token in renderer.anatomy.stop if renderer is not None else ():
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id not in stops and token_id != tokenizer.unk_token_id:
            stops.append(token_id)
    return stops


def generation_kwargs(inference: InferenceConfig, tokenizer) -> dict:
    """``model.generate`` keyword arguments for the inference section (sampling knobs only when sampling)."""
    stops = stop_token_ids(tokenizer)
    kwargs = {"max_new_tokens": inference.max_new_tokens, "do_sample": inference.do_sample,
              "repetition_penalty": inference.repetition_penalty, "use_cache": True,
              "pad_token_id": pad_token_id(tokenizer),
              "eos_token_id": stops if len(stops) > 1 else tokenizer.eos_token_id}
    if inference.do_sample:
        kwargs.update(temperature=inference.temperature, top_k=inference.top_k, top_p=inference.top_p)
    return kwargs


@dataclass(frozen=True)
class Completion:
    """One prompt's continuation: its text (special tokens removed), the tokens the model was given
    (bos included, after truncation), the tokens it generated (up to and including eos), and the
    wall time of the ``generate`` call that produced it (the whole batch's)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float


def generate_texts(model, tokenizer, prompts: list[str], inference: InferenceConfig, batch_size: int,
                   max_prompt_tokens: int, seed: int, desc: str = "generate") -> list[str]:
    """The continuation of each prompt (special tokens removed), in prompt order; see :func:`generate_completions`."""
    return [c.text for c in generate_completions(model, tokenizer, prompts, inference, batch_size, max_prompt_tokens,
                                                 seed, desc=desc)]


def generate_completions(model, tokenizer, prompts: list[str], inference: InferenceConfig, batch_size: int,
                         max_prompt_tokens: int, seed: int, desc: str | None = "generate", chat_template: bool = False,
                         streamer=None) -> list[Completion]:
    """The :class:`Completion` of each prompt, in prompt order.

    Each prompt is encoded as in training (bos + tokens, no eos), or, with ``chat_template``, as one
    user message in the tokenizer's chat template (which places its own special tokens); then as
    :func:`generate_from_ids`.
    """
    if not prompts:
        return []
    return generate_from_ids(model, tokenizer, encode_prompts(tokenizer, prompts, chat_template), inference, batch_size,
                             max_prompt_tokens, seed, desc=desc, streamer=streamer)


@torch.no_grad()
def generate_from_ids(model, tokenizer, prompt_ids: list[list[int]], inference: InferenceConfig, batch_size: int,
                      max_prompt_tokens: int, seed: int, desc: str | None = "generate", streamer=None) -> list[Completion]:
    """The :class:`Completion` of each prompt (its token ids), in prompt order.

    A prompt keeps its last ``max_prompt_tokens`` tokens. Prompt and continuation together stay within the model's
    context (the length its family's context key gives): a model with learned or ALiBi positions fails past it.
    A generation ends at eos or at the chat template's end of a reply (:func:`stop_token_ids`).
    Sampling is seeded with ``seed``, so the base and the tuned model draw from the same random
    stream. ``streamer`` (a transformers ``TextStreamer``) receives the tokens as they come; it
    takes one prompt at a time. ``desc`` None shows no progress bar.
    """
    if not prompt_ids:
        return []
    if streamer is not None and len(prompt_ids) != 1:
        raise ValueError("a streamer takes exactly one prompt")
    model.eval()
    device = next(model.parameters()).device
    kwargs = generation_kwargs(inference, tokenizer)
    if streamer is not None:
        kwargs["streamer"] = streamer
    context = family_of(model).context_length(model.config)
    if context is not None:
        max_prompt_tokens = min(max_prompt_tokens, context - 1)
    encoded = [ids[-max_prompt_tokens:] for ids in prompt_ids]
    stops = set(stop_token_ids(tokenizer))
    # Similar lengths together waste less padding; results go back in prompt order.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs: list[Completion | None] = [None] * len(encoded)
    torch.manual_seed(seed)
    with _router_logits_off(model):
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", dynamic_ncols=True,
                          disable=desc is None):
            rows = order[start:start + batch_size]
            input_ids, attention_mask = _left_pad([encoded[i] for i in rows], kwargs["pad_token_id"])
            if context is not None:
                kwargs["max_new_tokens"] = min(inference.max_new_tokens, context - input_ids.shape[1])
            started = time.perf_counter()
            generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs)
            seconds = time.perf_counter() - started
            for i, new_tokens in zip(rows, generated[:, input_ids.shape[1]:].tolist(), strict=True):
                new_tokens = new_tokens[:_completion_length(new_tokens, stops)]
                outputs[i] = Completion(tokenizer.decode(new_tokens, skip_special_tokens=True), len(encoded[i]),
                                        len(new_tokens), seconds)
    return outputs


def encode_prompts(tokenizer, prompts: list[str], chat_template: bool = False) -> list[list[int]]:
    """Token ids of each prompt: bos + its tokens as in training, or its chat-template rendering as one user message."""
    if chat_template:
        return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=True, add_generation_prompt=True,
                                              return_dict=False) for p in prompts]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [bos + ids for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]


def _completion_length(new_tokens: list[int], stops: set[int]) -> int:
    # A row that ended early is filled up to the batch's length with padding, which may be eos itself.
    return next((i + 1 for i, token in enumerate(new_tokens) if token in stops), len(new_tokens))


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


@contextlib.contextmanager
def _router_logits_off(model) -> Iterator[None]:
    config = getattr(model, "config", None)
    previous = getattr(config, "output_router_logits", None)
    if previous:
        config.output_router_logits = False
    try:
        yield
    finally:
        if previous:
            config.output_router_logits = previous
