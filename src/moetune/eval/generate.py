"""`moetune generate`: the fine-tuned model (and, on request, its base) on your own prompts.

One prompt (``--prompt``) or prompts read from stdin (``--interactive``) are streamed to the
terminal token by token; a prompts file (``--prompts``, one prompt per line, blank lines skipped)
is generated in batches and written as JSON lines. The model is loaded as `moetune eval` loads it
(:mod:`moetune.eval.load`) and generates with the ``inference`` settings. With ``--compare-base``
the base model answers every prompt too: for an adapter that is the same model with the adapter
switched off, so only one model is in memory.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from moetune.config.schema import Config
from moetune.errors import UserError
from moetune.eval.generation import Completion, generate_completions, prompt_token_budget
from moetune.eval.load import load_base, load_eval_tokenizer, load_tuned, resolve_tuned_model


@dataclass
class _Models:
    """The fine-tuned model and how to run its base: ``base()`` is a context that yields the base model."""

    tuned: object
    base: Callable[[], contextlib.AbstractContextManager]


def generate_from_prompts(config: Config, adapter_path: str | None = None, prompt: str | None = None,
                          prompts_file: str | None = None, interactive: bool = False, output: str | None = None,
                          compare_base: bool = False) -> int:
    """Generate for ``prompt``, each line of ``prompts_file``, or each line read from stdin (``interactive``);
    exactly one of the three. Returns the exit code (0).

    ``adapter_path``: a PEFT adapter folder (default: the final adapter in training.output_dir) or a
    merged model folder. ``output``: a JSONL file for the records (a prompts file's records go to
    stdout without it). Each record has ``prompt``, ``completion``, ``prompt_tokens``,
    ``completion_tokens`` and ``seconds``; with ``compare_base`` also ``base_completion``,
    ``base_completion_tokens`` and ``base_seconds``.
    """
    if sum((prompt is not None, prompts_file is not None, interactive)) != 1:
        raise UserError("Give exactly one of --prompt TEXT, --prompts FILE or --interactive.")
    prompts = read_prompts(prompts_file) if prompts_file is not None else None
    if prompts == []:
        raise UserError(f"--prompts {prompts_file} holds no prompt (only blank lines).")
    if output is not None and prompts_file is not None and Path(output).resolve() == Path(prompts_file).resolve():
        raise UserError(f"--output {output} is the prompts file itself; writing there would destroy the prompts.")
    tuned_path = resolve_tuned_model(config, adapter_path)
    tokenizer = load_eval_tokenizer(config, tuned_path)
    chat_template = _use_chat_template(config, tokenizer)
    _say(f"generate: fine-tuned {tuned_path.kind}: {tuned_path.path}")
    models = _load_models(config, tuned_path, tokenizer, compare_base)
    with _open_output(output, default_stdout=prompts is not None) as sink:
        if prompts is not None:
            _generate_file(config, models, tokenizer, prompts, chat_template, compare_base, sink)
        else:
            lines = [prompt] if prompt is not None else _stdin_prompts()
            for text in lines:
                record = _generate_streamed(config, models, tokenizer, text, chat_template, compare_base)
                _write(sink, record)
    return 0


def read_prompts(path: str) -> list[str]:
    """The prompts of a prompts file: one per line, blank lines skipped, line ends removed."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--prompts {path}: no such file.") from None
    except IsADirectoryError:
        raise UserError(f"--prompts {path} is a directory; pass a text file with one prompt per line.") from None
    except UnicodeDecodeError as err:
        raise UserError(f"--prompts {path} is not UTF-8 text (byte {err.start}); save it as UTF-8.") from None
    except OSError as err:
        raise UserError(f"--prompts {path} cannot be read ({err.strerror}).") from None
    return [line for line in text.splitlines() if line.strip()]


def _load_models(config: Config, tuned_path, tokenizer, compare_base: bool) -> _Models:
    if tuned_path.kind == "adapter":
        tuned = load_tuned(config, tuned_path, tokenizer, base=load_base(config, tokenizer))

        @contextlib.contextmanager
        def base() -> Iterator[object]:
            with tuned.disable_adapter():  # modules_to_save switch back too
                yield tuned

        return _Models(tuned, base)
    tuned = load_tuned(config, tuned_path, tokenizer)
    # A merged model holds no base weights of its own: the base is a second model, built only when asked for.
    base_model = load_base(config, tokenizer) if compare_base else None
    return _Models(tuned, lambda: contextlib.nullcontext(base_model))


def _use_chat_template(config: Config, tokenizer) -> bool:
    if not config.inference.use_chat_template:
        return False
    if getattr(tokenizer, "chat_template", None):
        return True
    _say("generate: inference.use_chat_template is true but the tokenizer has no chat template; "
         "prompts are used as written")
    return False


def _generate_file(config: Config, models: _Models, tokenizer, prompts: list[str], chat_template: bool,
                   compare_base: bool, sink: IO[str]) -> None:
    tuned = _run(config, models.tuned, tokenizer, prompts, chat_template, desc="tuned")
    base: list[Completion] = []
    if compare_base:
        with models.base() as base_model:
            base = _run(config, base_model, tokenizer, prompts, chat_template, desc="base")
    for index, (text, completion) in enumerate(zip(prompts, tuned, strict=True)):
        _write(sink, _record(text, completion, base[index] if base else None))


def _generate_streamed(config: Config, models: _Models, tokenizer, text: str, chat_template: bool,
                       compare_base: bool) -> dict:
    from transformers import TextStreamer

    if compare_base:
        print("[tuned] ", end="", flush=True)
    tuned = _run(config, models.tuned, tokenizer, [text], chat_template, streamer=TextStreamer(
        tokenizer, skip_prompt=True, skip_special_tokens=True))[0]
    base = None
    if compare_base:
        print("[base] ", end="", flush=True)
        with models.base() as base_model:
            base = _run(config, base_model, tokenizer, [text], chat_template, streamer=TextStreamer(
                tokenizer, skip_prompt=True, skip_special_tokens=True))[0]
    return _record(text, tuned, base)


def _run(config: Config, model, tokenizer, prompts: list[str], chat_template: bool, desc: str | None = None,
         streamer=None) -> list[Completion]:
    return generate_completions(model, tokenizer, prompts, config.inference, config.training.per_device_eval_batch_size,
                                prompt_token_budget(config), config.training.seed, desc=desc,
                                chat_template=chat_template, streamer=streamer)


def _record(prompt: str, tuned: Completion, base: Completion | None) -> dict:
    record = {"prompt": prompt, "completion": tuned.text, "prompt_tokens": tuned.prompt_tokens,
              "completion_tokens": tuned.completion_tokens, "seconds": round(tuned.seconds, 3)}
    if base is not None:
        record.update(base_completion=base.text, base_completion_tokens=base.completion_tokens,
                      base_seconds=round(base.seconds, 3))
    return record


def _stdin_prompts() -> Iterator[str]:
    """Lines typed (or piped) on stdin until EOF, blank ones skipped."""
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\n")


@contextlib.contextmanager
def _open_output(output: str | None, default_stdout: bool) -> Iterator[IO[str] | None]:
    if output is None:
        yield sys.stdout if default_stdout else None
        return
    path = Path(output)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sink = path.open("w", encoding="utf-8")
    except OSError as err:
        raise UserError(f"--output {output} cannot be written ({err.strerror}).") from None
    with sink:
        yield sink
    _say(f"generate: wrote {path}")


def _write(sink: IO[str] | None, record: dict) -> None:
    if sink is not None:
        sink.write(json.dumps(record, ensure_ascii=False) + "\n")
        sink.flush()


def _say(text: str) -> None:
    print(text, file=sys.stderr)
