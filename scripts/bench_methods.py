"""Five ways to fine-tune one MoE, side by side: what each trains, costs and reaches.

    python scripts/bench_methods.py [--steps 60] [--experts 16] [--hidden 64] [--plans attention-lora,...]

One tiny Qwen3-MoE shape (random init, 2 layers, ``--experts`` experts, top-2, a BPE trained on the
data), the quickstart's task (the sample Rust crate and QA file in data/, built once with
``moetune data``), the same steps, learning rate and seed, five plans:

* ``attention-lora``: LoRA on q/k/v/o, experts frozen (the default for pretrained models);
* ``expert-lora``: LoRA on the routed experts' fused weights as well (``moe.expert_training: lora``);
* ``esft-gate`` / ``esft-token``: ``moetune experts`` selects experts by average gate score or by
  token selection ratio, then only those train (``moe.expert_training: esft``, no LoRA);
* ``full-experts``: attention LoRA plus every routed expert in full (``moe.expert_training: full``).

A random model routes at random and its embeddings know nothing of the tokenizer trained here, so
first a base is made the way a pretrained one would be: the random model trains ``--base-steps``
steps (attention LoRA, router, embeddings and lm_head) and is merged. Every plan then starts from
that base with the embeddings frozen, as it would from a hub model. Each plan trains in a fresh
process; for each the table gives the final eval
loss, trainable parameters (moetune's own count), the size of the run's final artefact on disk
(adapter or selected experts), useful tokens/s (loss-bearing tokens per second between the first and
the last logged step) and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from moetune.run_dir import ADAPTER_WEIGHTS, ESFT_FILES, MERGED_DIR, METRICS_FILE

ROOT = Path(__file__).resolve().parents[1]
PLANS = ("attention-lora", "expert-lora", "esft-gate", "esft-token", "full-experts")
ARTEFACTS = (ADAPTER_WEIGHTS[0], ESFT_FILES[1], "model.safetensors")  # each plan's final weights file


def common_overrides(root: Path, out: Path, steps: int) -> list[str]:
    return ["model.architecture=qwen_moe", f"data.output_path={root / 'data.jsonl'}", f"training.output_dir={out}",
            f"training.max_steps={steps}", "training.eval_steps=1000000", "training.save_steps=1000000",
            "training.logging_steps=5", "training.warmup_ratio=0.1", "training.seed=0", "logging.tensorboard=false"]


def base_model_overrides(root: Path, args) -> list[str]:
    """The random model trained into a base: quickstart's plan (embeddings, router, attention LoRA), merged."""
    shape = (f"{{num_hidden_layers: 2, hidden_size: {args.hidden}, intermediate_size: {2 * args.hidden}, "
             f"moe_intermediate_size: {args.hidden}, num_attention_heads: 4, num_key_value_heads: 2, "
             f"num_experts: {args.experts}, num_experts_per_tok: 2, max_position_embeddings: 512}}")
    return [*common_overrides(root, root / "base", args.base_steps), f"model.config_overrides={shape}",
            "post_training.merge_and_save=true"]


def plan_base_overrides(root: Path, out: Path, args) -> list[str]:
    """Every plan starts from the merged base, as from a pretrained model: embeddings and router frozen."""
    merged = root / "base" / MERGED_DIR
    return [*common_overrides(root, out, args.steps), f"model.name={merged}", "model.random_init=false",
            f"model.tokenizer={merged}", "model.config_overrides={}", "lora.modules_to_save=[]",
            "moe.freeze_router=true"]


def plan_overrides(plan: str, experts_json: Path) -> list[str]:
    if plan == "attention-lora":
        return []
    if plan == "expert-lora":
        return ["moe.expert_training=lora"]
    if plan == "full-experts":
        return ["moe.expert_training=full"]
    return ["lora.enabled=false", "moe.expert_training=esft", f"moe.esft.experts={experts_json}"]


def run_plan(plan: str, args) -> dict:
    """Train one plan in this process; what the table needs, as a dict."""
    from moetune.config import load_config
    from moetune.train.loop import train

    logging.basicConfig(level=logging.INFO, format="moetune: %(message)s")  # the trainable-parameters line
    root = Path(args.root)
    if plan == "base":
        train(load_config(ROOT / "configs/quickstart.yaml", base_model_overrides(root, args)))
        return {}
    out = root / plan
    common = plan_base_overrides(root, out, args)
    if plan.startswith("esft"):
        method = plan.split("-")[1]
        experts_json = Path(args.root) / f"experts-{method}.json"
        select = subprocess.run([sys.executable, "-m", "moetune", "experts", "--config", str(ROOT / "configs/quickstart.yaml"),
                                 "--method", method, "--output", str(experts_json), *common], capture_output=True, text=True)
        if select.returncode != 0:
            raise SystemExit(f"{plan}: moetune experts failed:\n{select.stderr[-2000:]}")
    else:
        experts_json = Path()
    config = load_config(ROOT / "configs/quickstart.yaml", [*common, *plan_overrides(plan, experts_json)])
    train(config)
    records = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    logged = [r for r in records if "tokens_seen" in r]
    evals = [r for r in records if "eval_loss" in r]
    first, last = logged[0], logged[-1]
    return {"eval_loss": evals[-1]["eval_loss"],
            "tokens_per_second": (last["tokens_seen"] - first["tokens_seen"]) / (last["elapsed_seconds"] - first["elapsed_seconds"]),
            "artefact_bytes": sum((out / name).stat().st_size for name in ARTEFACTS if (out / name).is_file()),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--plans", default=",".join(PLANS), help=f"comma-separated subset of {', '.join(PLANS)}")
    parser.add_argument("--base-steps", type=int, default=150, help="steps that train the random model into the base")
    parser.add_argument("--child", choices=("base", *PLANS), help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_plan(args.child, args)))
        return

    plans = [p for p in args.plans.split(",") if p]
    with tempfile.TemporaryDirectory() as root:
        data = Path(root) / "data.jsonl"
        subprocess.run([sys.executable, "-m", "moetune", "data", "--config", str(ROOT / "configs/quickstart.yaml"),
                        f"data.output_path={data}"], check=True, capture_output=True, cwd=ROOT)
        results = {}
        for plan in ("base", *plans):
            child = subprocess.run([sys.executable, __file__, "--child", plan, "--root", root, "--steps", str(args.steps),
                                    "--base-steps", str(args.base_steps), "--experts", str(args.experts),
                                    "--hidden", str(args.hidden)], capture_output=True, text=True, cwd=ROOT)
            if plan == "base" and child.returncode != 0:
                raise SystemExit(f"training the base model failed:\n{child.stderr[-2000:]}")
            if plan == "base":
                continue
            if child.returncode != 0:
                print(f"  {plan}: failed\n{child.stderr[-2000:]}", file=sys.stderr)
                continue
            result = json.loads(child.stdout.split("RESULT ", 1)[1])
            counts = re.search(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+)", child.stderr)
            result["trainable"] = int(counts[1].replace(",", "")) if counts else None
            results[plan] = result
    print(f"\nQwen3-MoE shape, hidden {args.hidden}, 2 layers, {args.experts} experts (top-2), base trained "
          f"{args.base_steps} steps, then {args.steps} steps per plan, quickstart data (sample crate + QA)")
    print(f"  {'plan':15s} {'eval loss':>9s} {'trainable':>11s} {'artefact':>10s} {'tokens/s':>9s} {'peak RSS':>9s}")
    for plan, r in results.items():
        trainable = f"{r['trainable']:,}" if r["trainable"] is not None else "?"
        print(f"  {plan:15s} {r['eval_loss']:9.4f} {trainable:>11s} {r['artefact_bytes'] / 2**20:8.2f} MB "
              f"{r['tokens_per_second']:9,.0f} {r['peak_rss_mib']:7,.0f} MB")


if __name__ == "__main__":
    main()
