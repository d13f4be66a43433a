"""Prompts for Rust bodies, and batched left-padded generation with the inference settings."""

import pytest

from moetune.config import InferenceConfig, load_config
from moetune.eval.generation import generate_texts, generation_kwargs, rust_generation_prompt
from moetune.eval.load import load_base, load_eval_tokenizer, resolve_tuned_model


def test_rust_prompt_is_the_signature_and_doc_and_the_reference_is_the_body():
    record = {"source": "rust_repo", "kind": "function", "name": "refund",
              "text": "// crate: pay | file: src/lib.rs\n/// Refund a payment.\npub fn refund(p: &Payment) -> Result<()> {\n"
                      "    if p.ok { return Ok(()) }\n    Err(e)\n}"}
    prompt, reference = rust_generation_prompt(record)
    assert prompt == "// crate: pay | file: src/lib.rs\n/// Refund a payment.\npub fn refund(p: &Payment) -> Result<()> {"
    assert reference == "\n    if p.ok { return Ok(()) }\n    Err(e)\n"


def test_a_method_keeps_its_impl_header_and_its_body_ends_at_its_own_brace():
    record = {"source": "rust_repo", "kind": "function", "name": "amount",
              "text": "impl Payment {\n    /// The amount.\n    fn amount(&self) -> u64 {\n        self.amount\n    }\n}"}
    prompt, reference = rust_generation_prompt(record)
    assert prompt.endswith("fn amount(&self) -> u64 {") and prompt.startswith("impl Payment {")
    assert reference == "\n        self.amount\n    "


@pytest.mark.parametrize("record", [
    {"source": "rust_repo", "kind": "struct", "name": "Unit", "text": "pub struct Unit;"},
    {"source": "rust_repo", "kind": "file", "name": "lib.rs", "text": "fn a() {}"},
    {"source": "qa_jsonl", "kind": "qa", "prompt": "Q", "completion": " A"},
    {"source": "rust_repo", "kind": "function", "name": "cut", "text": "fn cut() {\n    let x = 1;"},
])
def test_items_without_a_complete_braced_body_give_no_prompt(record):
    assert rust_generation_prompt(record) is None


def test_sampling_knobs_are_passed_only_when_sampling():
    greedy = generation_kwargs(InferenceConfig(do_sample=False, max_new_tokens=5), _Tok())
    assert greedy == {"max_new_tokens": 5, "do_sample": False, "repetition_penalty": 1.1, "use_cache": True,
                      "pad_token_id": 0, "eos_token_id": 2}
    sampled = generation_kwargs(InferenceConfig(temperature=0.7, top_k=10, top_p=0.9), _Tok())
    assert (sampled["temperature"], sampled["top_k"], sampled["top_p"]) == (0.7, 10, 0.9)


class _Tok:
    pad_token_id, eos_token_id = 0, 2


def test_left_padded_batches_generate_what_single_prompts_do(trained_run):
    config_path, _, _ = trained_run
    config = load_config(config_path)
    tokenizer = load_eval_tokenizer(config, resolve_tuned_model(config, None))
    model = load_base(config, tokenizer)
    model.config.output_router_logits = True  # as training leaves it; generation must switch it off
    greedy = InferenceConfig(do_sample=False, max_new_tokens=6, repetition_penalty=1.0)
    prompts = ["fn f1() {", "// crate demo: src/m3.rs\nfn f3() {\n    let v0 = payment(0);", "Question: what does fn do?\nAnswer:"]
    batched = generate_texts(model, tokenizer, prompts, greedy, batch_size=3, max_prompt_tokens=100, seed=1)
    single = [generate_texts(model, tokenizer, [p], greedy, batch_size=1, max_prompt_tokens=100, seed=1)[0] for p in prompts]
    assert batched == single
    assert all(len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= 1 for text in batched)
    assert model.config.output_router_logits is True  # restored
    sampled = InferenceConfig(do_sample=True, temperature=1.0, max_new_tokens=6)
    first = generate_texts(model, tokenizer, prompts, sampled, batch_size=3, max_prompt_tokens=100, seed=5)
    assert generate_texts(model, tokenizer, prompts, sampled, batch_size=3, max_prompt_tokens=100, seed=5) == first


def test_prompt_and_continuation_stay_within_the_model_context(trained_run):
    # MPT's ALiBi bias is built for max_seq_len positions; generating past it fails inside the model.
    import torch
    from transformers import MptConfig, MptForCausalLM

    torch.manual_seed(0)
    config_path, _, _ = trained_run
    config = load_config(config_path)
    tokenizer = load_eval_tokenizer(config, resolve_tuned_model(config, None))
    model = MptForCausalLM(MptConfig(d_model=32, n_heads=4, n_layers=1, vocab_size=len(tokenizer), max_seq_len=24))
    greedy = InferenceConfig(do_sample=False, max_new_tokens=50, repetition_penalty=1.0)
    prompts = ["fn f1() {", "// crate demo: src/m3.rs\n" * 10 + "fn f3() {"]
    texts = generate_texts(model, tokenizer, prompts, greedy, batch_size=2, max_prompt_tokens=100, seed=1)
    longest_prompt = min(23, 1 + len(tokenizer(prompts[1], add_special_tokens=False)["input_ids"]))
    assert max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts) <= 24 - longest_prompt
    assert len(tokenizer(texts[0], add_special_tokens=False)["input_ids"]) >= 1
