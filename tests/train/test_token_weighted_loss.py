"""An optimizer step is a per-token mean over all its micro-batches and processes.

QA samples carry a loss only on their answers, whose lengths differ tenfold here, so a mean of
per-micro-batch means would weigh a 2-word answer like a 30-word one and the runs below would differ.
"""

import json
import random
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from moetune.cli import main
from moetune.data.encode import IGNORE_INDEX
from moetune.models.loss.objective import LossParts, step_token_counts

from ..conftest import free_port
from .conftest import WORDS, read_metrics

CONFIG = """
model:
  name: tiny-mixtral
  architecture: mixtral
  random_init: true
  torch_dtype: float32
  max_seq_length: 96
  tokenizer_vocab_size: 384
  config_overrides: {{num_hidden_layers: 2, hidden_size: 64, intermediate_size: 128, num_attention_heads: 4,
                     num_key_value_heads: 2, num_local_experts: 4, num_experts_per_tok: 2, max_position_embeddings: 256}}
lora: {{r: 4, lora_alpha: 8, lora_dropout: 0.0}}
moe: {{use_auxiliary_loss: false, freeze_router: true}}
data: {{output_path: {data}, packing: false}}
validation: {{validation_split: 0.0}}
training:
  output_dir: {out}
  max_steps: 3
  optim: sgd
  adam_beta1: 0.0
  learning_rate: 0.5
  lr_scheduler_type: constant
  warmup_steps: 0
  max_grad_norm: 0
  logging_steps: 1
  save_steps: 100
  seed: 11
logging: {{tensorboard: false}}
"""


def write_qa_data(path, samples=24):
    rng = random.Random(3)
    with path.open("w") as f:
        for i in range(samples):
            answer = " ".join(rng.choices(WORDS, k=2 if i % 2 else 30))  # 2-word and 30-word answers
            f.write(json.dumps({"prompt": f"Question {i}: what does {rng.choice(WORDS)} do?\nAnswer:",
                                "completion": " " + answer, "source": "qa_jsonl", "kind": "qa",
                                "file": "qa.jsonl", "line": i + 1}) + "\n")


@pytest.fixture(scope="module")
def qa_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("token_weighted")
    write_qa_data(root / "qa.jsonl")
    return root


def _config(root, name):
    path = root / f"{name}.yaml"
    path.write_text(textwrap.dedent(CONFIG.format(data=root / "qa.jsonl", out=root / name)))
    return path, root / name


def _lora_updates(out):
    """lora_B starts at zero, so after training it holds exactly what the optimizer steps added."""
    weights = load_file(out / "adapter_model.safetensors")
    updates = {k: v for k, v in weights.items() if "lora_B" in k}
    assert updates and all(v.abs().max() > 0 for v in updates.values())
    return updates


def _relative_difference(a, b):
    diff = torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a))
    return (diff / torch.sqrt(sum((a[k] ** 2).sum() for k in a))).item()


@pytest.fixture(scope="module")
def batch_of_two(qa_setup):
    config, out = _config(qa_setup, "batch2")
    assert main(["train", "--config", str(config), "training.per_device_train_batch_size=2",
                 "training.gradient_accumulation_steps=1"]) == 0
    return out


def test_accumulating_two_micro_batches_equals_one_batch_of_two(qa_setup, batch_of_two):
    config, out = _config(qa_setup, "accumulated")
    assert main(["train", "--config", str(config), "training.per_device_train_batch_size=1",
                 "training.gradient_accumulation_steps=2"]) == 0
    assert _relative_difference(_lora_updates(batch_of_two), _lora_updates(out)) < 1e-5
    # The logged loss is the per-token mean of the step either way.
    for a, b in zip(read_metrics(batch_of_two), read_metrics(out), strict=True):
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=1e-5)
        assert a["tokens_seen"] == b["tokens_seen"]


def test_two_processes_of_one_equal_one_process_of_two(qa_setup, batch_of_two):
    config, out = _config(qa_setup, "two_processes")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               "-m", "moetune", "train", "--config", str(config), "training.per_device_train_batch_size=1",
               "training.gradient_accumulation_steps=1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _relative_difference(_lora_updates(batch_of_two), _lora_updates(out)) < 1e-5
    for a, b in zip(read_metrics(batch_of_two), read_metrics(out), strict=True):
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=1e-5)


def test_micro_batch_shares_sum_to_the_token_mean_of_the_step():
    # Two micro-batches with 3 and 1 label tokens (after the next-token shift): their objectives add up to
    # the mean over all 4 tokens, not to the mean of the two means.
    first = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "labels": torch.tensor([[5, 6, 7, 8]])}
    second = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "labels": torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 8]])}
    counts = [step_token_counts(b) for b in (first, second)]
    assert [c.tolist() for c in counts] == [[3.0, 4.0, 0.0], [1.0, 4.0, 0.0]]  # no pairs: not a preference batch
    sums = (torch.tensor(6.0), torch.tensor(4.0))  # summed cross-entropy of each
    parts = [LossParts(lm_loss_sum=s, loss_tokens=c[0], aux_loss=torch.tensor(2.0), z_loss=torch.tensor(0.0),
                       routed_tokens=c[1], router_logits=(), aux_weight=0.1) for s, c in zip(sums, counts, strict=True)]
    step_tokens = counts[0] + counts[1]
    total = sum(p.objective(step_tokens) for p in parts)
    assert total.item() == pytest.approx(10.0 / 4 + 0.1 * 2.0)
    assert parts[1].lm_loss.item() == pytest.approx(4.0)  # its own mean, for a single micro-batch
