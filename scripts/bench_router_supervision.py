"""Label-guided routing on the sample QA data: an upcycled tiny MPT (4 experts, top-1) trained 60 steps
with and without moe.router_supervision.weight, then the routing report of each on the validation split.

    PYTHONPATH=src python scripts/bench_router_supervision.py [--weight 0.5] [--steps 60] [--out DIR]

Prints one JSON object: per run, the specialisation score (mutual information between label and
expert / entropy of the label, mean over layers), the eval loss, and the last logged loss parts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from moetune.run_dir import METRICS_FILE

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """
model:
  name: tiny-mpt
  architecture: mpt
  random_init: true
  torch_dtype: float32
  max_seq_length: 128
  tokenizer_vocab_size: 512
  config_overrides: {{d_model: 64, n_heads: 4, n_layers: 2, expansion_ratio: 2, max_seq_len: 256}}
lora: {{r: 8, lora_alpha: 16, lora_dropout: 0.0, target_modules: [Wqkv, out_proj], modules_to_save: [wte]}}
moe:
  upcycling: {{enabled: true, num_experts: 4, top_k: 1, expert_noise_std: 0.0}}
  expert_training: full
  use_auxiliary_loss: true
  auxiliary_loss_weight: 0.01
  router_supervision: {{weight: {weight}, label_to_expert: auto}}
data:
  output_path: {data}
  sources: [{{type: qa_jsonl, path: {qa}}}]
validation: {{validation_split: 0.2}}
training:
  output_dir: {out}
  max_steps: {steps}
  per_device_train_batch_size: 8
  per_device_eval_batch_size: 16
  learning_rate: 3.0e-3
  warmup_steps: 5
  logging_steps: 10
  eval_steps: {steps}
  save_steps: 1000
  seed: 7
logging: {{tensorboard: false}}
"""


def run(root: Path, name: str, weight: float, steps: int) -> dict:
    """Train one run and score its routing on the validation split."""
    from moetune.cli import main
    from moetune.config import load_config
    from moetune.data.split import load_splits
    from moetune.eval.load import load_eval_tokenizer, load_tuned, resolve_tuned_model
    from moetune.eval.routing_report import build_routing_report
    from moetune.eval.scoring import score_records

    config_path = root / f"{name}.yaml"
    config_path.write_text(textwrap.dedent(CONFIG.format(weight=weight, steps=steps, data=root / "qa.jsonl",
                                                         qa=ROOT / "data" / "sample_qa.jsonl", out=root / name)))
    if not (root / "qa.jsonl").is_file():
        assert main(["data", "--config", str(config_path)]) == 0
    started = time.perf_counter()
    assert main(["train", "--config", str(config_path)]) == 0
    seconds = time.perf_counter() - started
    config = load_config(root / name / "config.yaml")
    validation = load_splits(config)[1]
    tuned = resolve_tuned_model(config, None)
    tokenizer = load_eval_tokenizer(config, tuned)
    model = load_tuned(config, tuned, tokenizer)
    score = score_records(model, tokenizer, validation, config.model.max_seq_length, 16)
    report = build_routing_report(score.routing_counts, score.top_k)
    metrics = [json.loads(line) for line in (root / name / METRICS_FILE).read_text().splitlines()]
    train = [r for r in metrics if "lm_loss" in r]
    return {"specialisation": report.specialisation, "eval_loss": score.loss, "train_seconds": round(seconds, 1),
            "first_logged": {k: train[0].get(k) for k in ("lm_loss", "aux_loss", "router_supervision_loss")},
            "last_logged": {k: train[-1].get(k) for k in ("lm_loss", "aux_loss", "router_supervision_loss")},
            "mutual_information_bits": report.mutual_information_bits}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weight", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        results = {"unsupervised": run(root, "unsupervised", 0.0, args.steps),
                   "supervised": run(root, "supervised", args.weight, args.steps)}
    plain, guided = results["unsupervised"], results["supervised"]
    results["specialisation_ratio"] = guided["specialisation"] / max(plain["specialisation"], 1e-9)
    results["eval_loss_change_percent"] = (guided["eval_loss"] - plain["eval_loss"]) / plain["eval_loss"] * 100
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
