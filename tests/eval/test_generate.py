"""`moetune generate`: prompts file -> JSONL, streamed prompts, --compare-base, and bad paths."""

import io
import json
import shutil
import sys

import pytest
import torch

from moetune.cli import main
from moetune.config import load_config
from moetune.eval.generation import encode_prompts
from moetune.eval.load import load_base, load_eval_tokenizer, load_tuned, resolve_tuned_model

from .conftest import EVAL_OVERRIDES

PROMPTS = ["fn f1() {", "    let v0 = payment(0);", "Question: what does refund do? Answer:"]  # one line each
MAX_NEW_TOKENS = 8  # EVAL_OVERRIDES: greedy, 8 new tokens, no repetition penalty


def _read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _direct(model, tokenizer, prompt: str) -> tuple[int, list[int]]:
    """(prompt tokens, new tokens) of plain greedy ``model.generate`` on one prompt encoded as in training."""
    ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    model.config.output_router_logits = False
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    return len(ids), out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def direct(trained_run):
    """Per prompt, what model.generate gives directly: {"tuned": [(prompt tokens, new tokens)], "base": [...]}."""
    config_path, _, _ = trained_run
    config = load_config(config_path, EVAL_OVERRIDES)
    tuned_path = resolve_tuned_model(config, None)
    tokenizer = load_eval_tokenizer(config, tuned_path)
    tuned = load_tuned(config, tuned_path, tokenizer)
    base = load_base(config, tokenizer)
    return tokenizer, {name: [_direct(model, tokenizer, p) for p in PROMPTS] for name, model in (("tuned", tuned), ("base", base))}


def test_prompts_file_gives_one_record_per_prompt_equal_to_model_generate(trained_run, direct, tmp_path):
    config_path, run_dir, _ = trained_run
    tokenizer, expected = direct
    prompts = tmp_path / "test_prompts.txt"
    prompts.write_text("\n\n".join(PROMPTS) + "\n   \n")
    out = tmp_path / "out" / "generations.jsonl"
    assert main(["generate", "--config", str(config_path), "--adapter-path", str(run_dir), "--prompts", str(prompts),
                 "--output", str(out), *EVAL_OVERRIDES]) == 0
    records = _read(out)
    assert [r["prompt"] for r in records] == PROMPTS
    for record, (prompt_tokens, new_tokens) in zip(records, expected["tuned"], strict=True):
        assert set(record) == {"prompt", "completion", "prompt_tokens", "completion_tokens", "seconds"}
        assert record["prompt_tokens"] == prompt_tokens
        assert record["completion_tokens"] == len(new_tokens) and 1 <= len(new_tokens) <= MAX_NEW_TOKENS
        assert record["completion"] == tokenizer.decode(new_tokens, skip_special_tokens=True)
        assert record["seconds"] >= 0


def test_compare_base_records_both_completions_as_each_model_generates_them(trained_run, direct, tmp_path, capsys):
    config_path, _, _ = trained_run
    tokenizer, expected = direct
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS[0] + "\n")
    assert main(["generate", "--config", str(config_path), "--prompts", str(prompts), "--compare-base", *EVAL_OVERRIDES]) == 0
    [record] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]  # stdout without --output
    (_, tuned_tokens), (_, base_tokens) = expected["tuned"][0], expected["base"][0]
    assert record["completion"] == tokenizer.decode(tuned_tokens, skip_special_tokens=True)
    assert record["base_completion"] == tokenizer.decode(base_tokens, skip_special_tokens=True)
    assert record["base_completion_tokens"] == len(base_tokens) and record["base_seconds"] >= 0
    assert tuned_tokens != base_tokens  # the adapter was switched off for the base, and back on


def test_one_prompt_is_streamed_to_the_terminal(trained_run, direct, tmp_path, capsys):
    config_path, _, _ = trained_run
    tokenizer, expected = direct
    out = tmp_path / "one.jsonl"
    assert main(["generate", "--config", str(config_path), "--prompt", PROMPTS[1], "--output", str(out), *EVAL_OVERRIDES]) == 0
    [record] = _read(out)
    prompt_tokens, new_tokens = expected["tuned"][1]
    assert (record["prompt"], record["prompt_tokens"], record["completion_tokens"]) == (PROMPTS[1], prompt_tokens, len(new_tokens))
    assert capsys.readouterr().out == tokenizer.decode(new_tokens, skip_special_tokens=True) + "\n"


def test_interactive_reads_prompts_from_stdin_until_eof(trained_run, direct, tmp_path, capsys, monkeypatch):
    config_path, _, _ = trained_run
    tokenizer, expected = direct
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{PROMPTS[0]}\n\n   \n{PROMPTS[0]}\n"))
    out = tmp_path / "session.jsonl"
    assert main(["generate", "--config", str(config_path), "--interactive", "--compare-base", "--output", str(out),
                 "inference.use_chat_template=true", *EVAL_OVERRIDES]) == 0
    records = _read(out)
    tuned = tokenizer.decode(expected["tuned"][0][1], skip_special_tokens=True)
    base = tokenizer.decode(expected["base"][0][1], skip_special_tokens=True)
    assert [(r["prompt"], r["completion"], r["base_completion"]) for r in records] == [(PROMPTS[0], tuned, base)] * 2
    captured = capsys.readouterr()
    assert captured.out == f"[tuned] {tuned}\n[base] {base}\n" * 2
    assert "the tokenizer has no chat template; prompts are used as written" in captured.err


def test_chat_template_encodes_each_prompt_as_one_user_message(trained_run):
    config_path, _, _ = trained_run
    config = load_config(config_path)
    tokenizer = load_eval_tokenizer(config, resolve_tuned_model(config, None))
    tokenizer.chat_template = ("{% for m in messages %}<user>{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}<bot>{% endif %}")
    [ids] = encode_prompts(tokenizer, ["fn refund() {"], chat_template=True)
    assert ids == tokenizer("<user>fn refund() {<bot>", add_special_tokens=False)["input_ids"]
    [plain] = encode_prompts(tokenizer, ["fn refund() {"])
    assert plain == [tokenizer.bos_token_id] + tokenizer("fn refund() {", add_special_tokens=False)["input_ids"]


def test_bad_paths_exit_2_naming_the_path(trained_run, tmp_path, capsys):
    config_path, run_dir, _ = trained_run
    base_args = ["generate", "--config", str(config_path)]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("fn f1() {\n")

    def fails(*args: str) -> str:
        assert main([*base_args, *args]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err

    missing = tmp_path / "no-such-adapter"
    assert f"--adapter-path {missing} is not a directory" in fails("--adapter-path", str(missing), "--prompts", str(prompts))
    assert f"--prompts {tmp_path / 'nope.txt'}: no such file" in fails("--prompts", str(tmp_path / "nope.txt"))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"fn caf\xe9() {\n")
    assert f"--prompts {latin1} is not UTF-8 text" in fails("--prompts", str(latin1))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    assert f"--prompts {blank} holds no prompt" in fails("--prompts", str(blank))
    assert f"--output {prompts} is the prompts file itself" in fails("--prompts", str(prompts), "--output", str(prompts))
    assert prompts.read_text() == "fn f1() {\n"
    corrupt = tmp_path / "corrupt"
    shutil.copytree(run_dir, corrupt, ignore=shutil.ignore_patterns("checkpoint-*", "runs", "eval"))
    (corrupt / "adapter_config.json").write_text("{not json")
    assert f"{corrupt / 'adapter_config.json'} is corrupt" in fails("--adapter-path", str(corrupt), "--prompt", "fn f1() {")
    (corrupt / "adapter_config.json").write_text((run_dir / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    assert f"The adapter in {corrupt} cannot be loaded" in fails("--adapter-path", str(corrupt), "--prompt", "fn f1() {")


def test_a_merged_model_compares_with_a_base_built_beside_it(trained_run, direct, tmp_path):
    config_path, _, _ = trained_run
    tokenizer, expected = direct
    config = load_config(config_path, EVAL_OVERRIDES)
    merged = tmp_path / "merged"
    load_tuned(config, resolve_tuned_model(config, None), tokenizer).merge_and_unload().save_pretrained(merged)
    tokenizer.save_pretrained(merged)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS[0] + "\n")
    out = tmp_path / "merged.jsonl"
    assert main(["generate", "--config", str(config_path), "--adapter-path", str(merged), "--prompts", str(prompts),
                 "--compare-base", "--output", str(out), *EVAL_OVERRIDES]) == 0
    [record] = _read(out)
    assert record["completion"] == tokenizer.decode(expected["tuned"][0][1], skip_special_tokens=True)
    assert record["base_completion"] == tokenizer.decode(expected["base"][0][1], skip_special_tokens=True)
