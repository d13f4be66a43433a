"""train_mpt7b_moe_accelerate.py: the Accelerate MPT-7B-MoE trainer's flags, run on a tiny local MPT on CPU,
in one process and through `accelerate launch` with two."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from moetune.mpt_accelerate_cli import build_parser, load_trainer_config

from ..conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "train_mpt7b_moe_accelerate.py"
WORDS = "payment refund capture merchant customer webhook mandate currency amount authorize".split()
# A CPU run of the shipped config: float32 weights, no bf16, no fused optimizer, no recomputation.
ON_CPU = ["model.torch_dtype=float32", "training.bf16=false", "training.gradient_checkpointing=false",
          "training.optim=adamw_torch"]


@pytest.fixture(scope="module")
def tiny_mpt(tmp_path_factory) -> Path:
    """A folder with a tiny dense MPT (save_pretrained), its tokenizer, and a 40-line QA JSONL."""
    from transformers import MptConfig, MptForCausalLM

    from moetune.data.tokenizer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("mpt")
    rng = random.Random(0)
    lines = [{"question": f"what is {rng.choice(WORDS)} {i}?", "answer": " ".join(rng.choices(WORDS, k=5)),
              "expert_label": rng.choice(["payments", "refunds"])} for i in range(40)]
    (root / "qa.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    tokenizer = train_bpe_tokenizer((f"{q['question']} {q['answer']}" for q in lines), 300)
    torch.manual_seed(0)
    model = MptForCausalLM(MptConfig(d_model=64, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=256,
                                     vocab_size=len(tokenizer)))
    model.save_pretrained(root / "tiny-mpt")
    tokenizer.save_pretrained(root / "tiny-mpt")
    return root


def quick_flags(root: Path, out: str = "out") -> list[str]:
    return ["--model_id", str(root / "tiny-mpt"), "--data_file", str(root / "qa.jsonl"), "--output_dir", str(root / out),
            "--max_samples", "20", "--epochs", "2", "--save_steps", "2", "--per_device_batch_size", "2",
            "--gradient_accumulation_steps", "4", "--logging_steps", "1", "--warmup_steps", "1", "--max_seq_length", "64",
            "--seed", "3", *ON_CPU]


def run_script(args: list[str], cwd: Path, launch: list[str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, *(launch or []), str(SCRIPT), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**_env(), "PYTHONPATH": str(ROOT / "src")})


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}


def config_of(argv: list[str], deepspeed_json: Path | None = None):
    return load_trainer_config(build_parser().parse_intermixed_args(argv), deepspeed_json, ROOT / "configs" / "mpt7b_moe.yaml")


# ------------------------------------------------------------------------------------ flags -> config


def test_without_flags_the_trainer_defaults_apply_on_the_mpt_config():
    c = config_of([])
    assert (c.model.name, c.model.max_seq_length, c.data.max_target_length, c.data.max_samples) == \
        ("mosaicml/mpt-7b", 512, 128, None)
    assert [(s.type, s.path) for s in c.data.sources] == [("qa_jsonl", "nq_annotated_moe.jsonl")]
    t = c.training
    assert (t.num_train_epochs, t.learning_rate, t.per_device_train_batch_size, t.gradient_accumulation_steps,
            t.warmup_steps, t.warmup_ratio, t.max_grad_norm, t.output_dir, t.logging_steps, t.save_steps, t.seed) == \
        (1, 2e-5, 1, 8, 100, 0.0, 1.0, "./mpt7b_moe_finetune", 10, 500, 42)
    assert (t.save_strategy, t.checkpoint_naming, t.save_total_limit) == ("both", "kind", None)
    # Without --convert_to_moe the dense model trains in full.
    assert (c.moe.upcycling.enabled, c.lora.enabled) == (False, False)
    assert c.model.torch_dtype == "bfloat16"  # the rest is configs/mpt7b_moe.yaml's


def test_each_flag_reaches_its_config_key():
    c = config_of(["--model_id", "/models/mpt", "--data_file", "my qa.jsonl", "--max_samples", "100",
                   "--max_seq_length", "256", "--max_target_length", "32", "--epochs", "3", "--learning_rate", "1e-4",
                   "--per_device_batch_size", "2", "--gradient_accumulation_steps", "4", "--warmup_steps", "7",
                   "--max_grad_norm", "0.5", "--output_dir", "runs/a", "--logging_steps", "5", "--save_steps", "50",
                   "--seed", "9", "training.eval_steps=25"])
    t = c.training
    assert (c.model.name, c.data.sources[0].path, c.data.max_samples, c.model.max_seq_length, c.data.max_target_length) == \
        ("/models/mpt", "my qa.jsonl", 100, 256, 32)
    assert (t.num_train_epochs, t.learning_rate, t.per_device_train_batch_size, t.gradient_accumulation_steps,
            t.warmup_steps, t.max_grad_norm, t.output_dir, t.logging_steps, t.save_steps, t.seed, t.eval_steps) == \
        (3, 1e-4, 2, 4, 7, 0.5, "runs/a", 5, 50, 9, 25)


def test_convert_to_moe_takes_experts_from_the_deepspeed_moe_block(tmp_path):
    assert (lambda c: (c.moe.upcycling.enabled, c.moe.upcycling.num_experts, c.moe.upcycling.top_k,
                       c.moe.expert_training, c.lora.enabled))(
        config_of(["--convert_to_moe"])) == (True, 4, 1, "full", False)
    ds = tmp_path / "deepspeed_moe_config.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "moe": {"enabled": True, "num_experts": 8, "top_k": 2}}))
    c = config_of(["--convert_to_moe"], ds)
    assert (c.moe.upcycling.num_experts, c.moe.upcycling.top_k) == (8, 2)
    ds.write_text(json.dumps({"moe": {"num_experts": 8, "top_k": 3}}))
    with pytest.raises(Exception, match=r'--convert_to_moe: the "moe" block of .*deepspeed_moe_config.json:1: '
                       r'moe.upcycling.top_k must be 1 or 2'):
        config_of(["--convert_to_moe"], ds)


def test_with_config_only_the_flags_given_override_it():
    shipped = ROOT / "configs" / "mpt7b_moe.yaml"
    c = config_of(["--config", str(shipped), "--epochs", "4"])
    assert c.training.num_train_epochs == 4
    assert (c.training.learning_rate, c.lora.enabled, c.moe.upcycling.top_k, c.training.save_strategy) == \
        (1e-4, True, 2, "steps")
    assert c.data.sources[0].path == "data/nq_annotated_moe.jsonl"


@pytest.mark.parametrize("argv, says", [
    (["--epochs", "0"], "--epochs 0.0: training.num_train_epochs must be greater than 0"),
    (["--save_steps", "-5"], "--save_steps -5: training.save_steps must be a positive integer"),
    (["--max_samples", "0"], "--max_samples 0: data.max_samples must be a positive integer or null"),
    (["--save_steps", "ten"], "argument --save_steps: invalid int value: 'ten'"),
])
def test_a_bad_flag_value_exits_2_naming_the_flag(tmp_path, argv, says):
    result = run_script(argv, tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert says in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------- runs


def test_upcycled_run_saves_step_and_epoch_model_folders_that_load_and_resume_exactly(tiny_mpt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moetune  # noqa: F401  (registers mpt_moe with the Auto classes)

    result = run_script([*quick_flags(tiny_mpt), "--convert_to_moe"], tiny_mpt)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tiny_mpt / "out"
    # --max_samples 20: 20 of the 40 questions, split into training and validation.
    train_n, val_n = map(int, re.search(r"data: (\d+) training samples .*; (\d+) validation samples", result.stderr).groups())
    assert train_n + val_n == 20
    steps_per_epoch = math.ceil(math.ceil(train_n / 2) / 4)  # one sample a row (MPT is padded, not packed)
    total = 2 * steps_per_epoch
    expected = {f"checkpoint-step-{s}" for s in range(2, total + 1, 2)} | {"checkpoint-epoch-1", "checkpoint-epoch-2"}
    assert {p.name for p in out.iterdir() if p.name.startswith("checkpoint")} == expected
    assert json.loads((out / "checkpoint-epoch-1" / "trainer_state.json").read_text())["global_step"] == steps_per_epoch

    for name in ("checkpoint-step-2", "checkpoint-epoch-1"):
        folder = out / name
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert type(model).__name__ == "MptMoeForCausalLM"
        assert (model.config.num_local_experts, model.config.num_experts_per_tok) == (4, 1)
        saved = load_file(folder / "model.safetensors")
        params = dict(model.named_parameters())
        assert saved and all(torch.equal(params[k], v) for k, v in saved.items() if k in params)
        assert len(AutoTokenizer.from_pretrained(folder)) == len(AutoTokenizer.from_pretrained(tiny_mpt / "tiny-mpt"))

    # Resuming from the end of epoch 1 gives exactly the uninterrupted run's final weights.
    resumed = tiny_mpt / "resumed"
    shutil.copytree(out / "checkpoint-epoch-1", resumed / "checkpoint-epoch-1")
    again = run_script([*quick_flags(tiny_mpt, "resumed"), "--convert_to_moe",
                        f"training.resume_from_checkpoint={resumed / 'checkpoint-epoch-1'}"], tiny_mpt)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "is up to date with data.sources; not rebuilt" in again.stderr
    final, final_resumed = load_file(out / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert final.keys() == final_resumed.keys()
    assert all(torch.equal(final[k], final_resumed[k]) for k in final)


def test_two_processes_through_accelerate_launch_train_the_dense_model_in_full(tiny_mpt):
    from transformers import AutoModelForCausalLM, AutoTokenizer, MptForCausalLM

    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    flags = [*quick_flags(tiny_mpt, "ddp"), "--data_file", str(tiny_mpt / "qa-ddp.jsonl"), "--epochs", "1",
             "data.output_path=" + str(tiny_mpt / "built-ddp.jsonl")]
    shutil.copy(tiny_mpt / "qa.jsonl", tiny_mpt / "qa-ddp.jsonl")
    result = run_script(flags, tiny_mpt, launch)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tiny_mpt / "ddp"
    config = (out / "config.yaml").read_text()
    assert "max_samples: 20" in config and yaml.safe_load(config)["moe"]["upcycling"]["enabled"] is False
    stats = json.loads((tiny_mpt / "built-ddp.stats.json").read_text())
    assert stats["samples_total"] == 40  # the whole file is built; --max_samples limits what trains
    epoch = out / "checkpoint-epoch-1"
    model = AutoModelForCausalLM.from_pretrained(epoch)
    assert type(model) is MptForCausalLM
    dense = MptForCausalLM.from_pretrained(tiny_mpt / "tiny-mpt")
    # Every weight trained, the FFN and the embeddings too (no adapter).
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, dense.state_dict()[k])}
    assert any(".ffn." in k for k in changed) and any("wte" in k for k in changed)
    assert AutoTokenizer.from_pretrained(epoch).get_vocab() == AutoTokenizer.from_pretrained(tiny_mpt / "tiny-mpt").get_vocab()
