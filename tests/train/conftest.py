"""Tiny training runs: a Mixtral-shaped model (2 layers, hidden 64, 4 experts) on a small synthetic dataset."""

import json
import random
import textwrap
from pathlib import Path

import pytest

WORDS = ("fn let mut struct impl trait enum match payment amount currency refund capture authorize "
         "merchant customer connector webhook mandate").split()


def write_dataset(path: Path, samples: int = 160, seed: int = 0) -> Path:
    """A built-dataset JSONL (the format `moetune data` writes): Rust-like text and QA samples."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(samples):
            if i % 4 == 0:
                record = {"prompt": f"Question: what does {rng.choice(WORDS)} do?\nAnswer:",
                          "completion": " " + " ".join(rng.choices(WORDS, k=6)), "source": "qa_jsonl", "kind": "qa",
                          "expert_label": rng.choice(["payments", "refunds"]), "file": "qa.jsonl", "line": i + 1}
            else:
                body = "\n".join(f"    let v{j} = {rng.choice(WORDS)}({j});" for j in range(rng.randint(2, 9)))
                record = {"text": f"// crate demo: src/m{i % 40}.rs\nfn f{i}() {{\n{body}\n}}\n", "source": "rust_repo",
                          "kind": "function", "repo": "demo", "crate": "demo", "path": f"src/m{i % 40}.rs",
                          "name": f"f{i}", "module": "demo", "start_line": 1, "end_line": 4}
            f.write(json.dumps(record) + "\n")
    return path


TINY_MODEL = {"name": "tiny-mixtral", "architecture": "mixtral", "random_init": True, "torch_dtype": "float32",
              "max_seq_length": 128, "tokenizer_vocab_size": 512,
              "config_overrides": {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                                   "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
                                   "num_experts_per_tok": 2, "max_position_embeddings": 256}}
"""The model section of TINY_CONFIG, for tests that write their own config with :func:`write_config`."""


def write_config(path: Path, **sections) -> Path:
    """A config file of ``sections`` (``model`` defaults to TINY_MODEL, updated by a ``model`` given)."""
    import yaml

    sections["model"] = {**TINY_MODEL, **sections.get("model", {})}
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


TINY_CONFIG = """
model:
  name: tiny-mixtral
  architecture: mixtral
  random_init: true
  torch_dtype: float32
  max_seq_length: 128
  tokenizer_vocab_size: 512
  config_overrides: {{num_hidden_layers: 2, hidden_size: 64, intermediate_size: 128, num_attention_heads: 4,
                     num_key_value_heads: 2, num_local_experts: 4, num_experts_per_tok: 2, max_position_embeddings: 256}}
lora: {{r: 8, lora_alpha: 16, lora_dropout: 0.1, modules_to_save: [embed_tokens, lm_head]}}
moe: {{use_auxiliary_loss: true, auxiliary_loss_weight: 0.01, freeze_router: false}}
data: {{output_path: {data}}}
validation: {{validation_split: 0.2}}
training:
  output_dir: {out}
  max_steps: 12
  per_device_train_batch_size: 4
  per_device_eval_batch_size: 8
  gradient_accumulation_steps: 2
  learning_rate: 3.0e-3
  warmup_steps: 2
  logging_steps: 1
  eval_steps: 6
  save_steps: 4
  seed: 7
logging: {{tensorboard: true}}
"""


def write_tiny_run(root: Path, out_name: str = "run") -> tuple[Path, Path]:
    """Write the synthetic dataset and the tiny config under ``root``; return (config path, output dir)."""
    data = write_dataset(root / "data.jsonl")
    out = root / out_name
    config = root / "tiny.yaml"
    config.write_text(textwrap.dedent(TINY_CONFIG.format(data=data, out=out)))
    return config, out


@pytest.fixture
def tiny_run(tmp_path):
    """(config path, output dir) of a 12-step tiny training run."""
    return write_tiny_run(tmp_path)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
