"""Training throughput: moetune's trainer vs a naive padded loop vs TRL's SFTTrainer with packing.

    python scripts/bench_train.py [--samples 600] [--hidden 128] [--layers 2] [--experts 4] [--seq 512] [--batch 4]
    python scripts/bench_train.py --preset mixtral-8x7b --layers 2 --experts-kernels     # on a GPU
    python scripts/bench_train.py --compile --steps 30                                   # advanced.torch_compile

The second form trains moetune alone on Mixtral-8x7B layer shapes (a few layers, random weights, bf16)
once per experts kernel (eager, grouped_mm) and reports steady-state tokens/s (from the first logged
step to the last, so CUDA start-up and kernel selection are left out) and MFU: model FLOPs per token x
tokens/s / the GPU's dense bf16 peak. Model FLOPs per token are 4 x active parameters (the weights are
frozen under LoRA, so the backward pass computes activation gradients only: 2 FLOPs per weight forward,
2 backward, not the 6 of full training) + 12 x layers x hidden x seq for the attention scores;
recomputation by gradient checkpointing is not counted, as MFU is defined.

All three train the same tiny Mixtral-shaped model (random init, LoRA on q/k/v/o, same seed), on the
same Rust-like samples with the same tokenizer, batch size, learning rate and one epoch, in this one
process. Each reports useful tokens per second: tokens that carry a loss (no padding), counted once
per epoch, divided by the wall time of its training loop (model building and tokenisation excluded).
Needs TRL for the third line (`pip install -e ".[bench]"`); it is skipped with a note when missing.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from moetune.config import load_config
from moetune.data.tokenizer import load_or_train_tokenizer
from moetune.models.factory import build_model
from moetune.train.loop import train

WORDS = ("payment amount currency refund capture authorize merchant customer connector webhook mandate "
         "router status error result option vec string self match let mut fn impl struct enum").split()


def make_dataset(path: Path, samples: int, seq: int, seed: int = 0) -> list[str]:
    """Code-like samples whose lengths spread from a few lines to about a full sequence (as real files do)."""
    rng = random.Random(seed)
    texts = []
    with path.open("w") as f:
        for i in range(samples):
            lines = max(2, int(rng.lognormvariate(2.3, 0.9)))
            lines = min(lines, seq // 9)
            body = "\n".join(f"    let {rng.choice(WORDS)}_{j} = {rng.choice(WORDS)}.{rng.choice(WORDS)}({j})?;"
                             for j in range(lines))
            text = f"// src/{rng.choice(WORDS)}_{i % 50}.rs\nfn {rng.choice(WORDS)}_{i}() -> Result<()> {{\n{body}\n}}\n"
            texts.append(text)
            f.write(json.dumps({"text": text, "source": "rust_repo", "kind": "function", "repo": "bench",
                                "path": f"src/f{i}.rs"}) + "\n")
    return texts


PRESETS = {"mixtral-8x7b": {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "experts": 8,
                            "vocab": 32000, "seq": 4096, "batch": 1, "bf16": True}}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, SXM


def config_yaml(data: Path, out: Path, args, experts_kernel: str | None = None) -> str:
    precision = "bfloat16" if args.bf16 else "float32"
    kernel = f"\n  experts_implementation: {experts_kernel}" if experts_kernel else ""
    return f"""
model:
  name: bench-mixtral
  architecture: mixtral
  random_init: true
  torch_dtype: {precision}
  attn_implementation: sdpa
  max_seq_length: {args.seq}
  tokenizer_vocab_size: {args.vocab}{kernel}
  config_overrides: {{num_hidden_layers: {args.layers}, hidden_size: {args.hidden}, intermediate_size: {args.intermediate},
                     num_attention_heads: {args.heads}, num_key_value_heads: {args.kv_heads}, num_local_experts: {args.experts},
                     num_experts_per_tok: 2, max_position_embeddings: {args.seq * 2}}}
lora: {{r: 16, lora_alpha: 32, lora_dropout: 0.0}}
moe: {{use_auxiliary_loss: true, auxiliary_loss_weight: 0.001, log_expert_metrics: false}}
data: {{output_path: {data}}}
validation: {{validation_split: 0}}
training:
  output_dir: {out}
  num_train_epochs: 1
  per_device_train_batch_size: {args.batch}
  bf16: {str(args.bf16).lower()}
  gradient_checkpointing: {str(args.bf16).lower()}
  learning_rate: 1.0e-4
  logging_steps: 5
  save_steps: 100000
  seed: 0
logging: {{tensorboard: false}}
"""


def bench_moetune(config) -> float:
    train(config)
    records = [json.loads(line) for line in (Path(config.training.output_dir) / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]  # cumulative loss-bearing tokens and seconds since the loop started
    return last["tokens_seen"] / last["elapsed_seconds"]


def bench_padded(config, tokenizer, texts: list[str]) -> float:
    """The common approach: every sample padded to max_length, plain HF-style loop."""
    torch.manual_seed(0)
    model = build_model(config, tokenizer)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=config.model.max_seq_length,
                    return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0))
    batch = config.training.per_device_train_batch_size
    useful = 0
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        idx = order[i:i + batch]
        out = model(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx], labels=labels[idx])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        useful += int(enc["attention_mask"][idx].sum())
    return useful / (time.perf_counter() - start)


def bench_trl(config, tokenizer, texts: list[str], out: Path) -> float | None:
    try:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer
    except ImportError:
        return None
    torch.manual_seed(0)
    model = build_model(config, tokenizer)
    args = SFTConfig(output_dir=str(out), max_length=config.model.max_seq_length, packing=True,
                     per_device_train_batch_size=config.training.per_device_train_batch_size, learning_rate=1e-4,
                     num_train_epochs=1, logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=True,
                     dataset_text_field="text", seed=0, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                         processing_class=tokenizer)
    useful = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    result = trainer.train()
    return useful / result.metrics["train_runtime"]


def steady_rate(output_dir: Path) -> float:
    """Tokens/s between the first and the last logged step of a moetune run (warm-up left out)."""
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "tokens_seen" in r]
    if len(logged) < 2:
        raise SystemExit(f"{output_dir}: fewer than two logged steps; raise --steps (steps are logged every 5).")
    first, last = logged[0], logged[-1]
    return (last["tokens_seen"] - first["tokens_seen"]) / (last["elapsed_seconds"] - first["elapsed_seconds"])


def flops_per_token(args, vocab: int) -> float:
    """Model FLOPs per token of LoRA training on frozen weights: 4 x active parameters (top-2 of the
    experts; forward 2, activation gradients 2) + attention scores (forward and backward)."""
    head_dim = args.hidden // args.heads
    attention = 2 * args.hidden * args.heads * head_dim + 2 * args.hidden * args.kv_heads * head_dim
    experts = 2 * 3 * args.hidden * args.intermediate  # top-2 experts, gate/up/down each
    active = args.layers * (attention + args.hidden * args.experts + experts) + args.hidden * vocab
    return 4 * active + 12 * args.layers * args.hidden * args.seq


def bench_variants(args, root: Path, variants: dict[str, tuple[str | None, list[str]]]) -> None:
    """moetune alone on the given shapes once per variant (experts kernel, config overrides): steady-state
    tokens/s, MFU on a known GPU, the seconds to the first logged step (start-up and compilation) and the
    last logged LM loss (the variants train the same model on the same data, so it should agree)."""
    make_dataset(root / "data.jsonl", args.samples, args.seq)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = next((flops for gpu, flops in PEAK_BF16_FLOPS.items() if gpu in name), None)
    print(f"\n{name}: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, {args.experts} "
          f"experts (top-2), seq {args.seq}, batch {args.batch}, {'bf16' if args.bf16 else 'fp32'}")
    for label, (kernel, overrides) in variants.items():
        folder = label.replace(" ", "-")
        (root / f"{folder}.yaml").write_text(config_yaml(root / "data.jsonl", root / folder, args, kernel))
        config = load_config(root / f"{folder}.yaml",
                             ["training.num_train_epochs=1", f"training.max_steps={args.steps}", *overrides])
        train(config)
        rate = steady_rate(root / folder)
        logged = [json.loads(line) for line in (root / folder / "metrics.jsonl").read_text().splitlines()]
        vocab = len(load_or_train_tokenizer(config, None, save_dir=root / folder / "tokenizer"))
        mfu = f"{rate * flops_per_token(args, vocab) / peak:6.1%}" if peak else "n/a (no known GPU peak)"
        print(f"  {label:22s} {rate:10,.0f} tokens/s   MFU {mfu}   first logged step after "
              f"{logged[0]['elapsed_seconds']:6.1f} s   last lm_loss {logged[-1]['lm_loss']:.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--intermediate", type=int, help="expert FFN width (default: 2 x hidden)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=2048, help="entries of the BPE trained on the data")
    parser.add_argument("--bf16", action="store_true", help="bf16 weights and autocast, gradient checkpointing")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="real layer shapes (sets every size but --layers)")
    parser.add_argument("--experts-kernels", action="store_true", help="moetune only, eager vs grouped_mm experts")
    parser.add_argument("--compile", action="store_true", help="moetune only, with and without advanced.torch_compile")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per variant with --experts-kernels/--compile")
    args = parser.parse_args()
    for key, value in PRESETS.get(args.preset, {}).items():
        setattr(args, key, value)
    args.intermediate = args.intermediate or 2 * args.hidden
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.experts_kernels:
            bench_variants(args, root, {f"experts {kernel}": (kernel, []) for kernel in ("eager", "grouped_mm")})
            return
        if args.compile:
            bench_variants(args, root, {"layers uncompiled": (None, []),
                                        "layers compiled": (None, ["advanced.torch_compile=true"])})
            return
        texts = make_dataset(root / "data.jsonl", args.samples, args.seq)
        (root / "bench.yaml").write_text(config_yaml(root / "data.jsonl", root / "moetune", args))
        config = load_config(root / "bench.yaml")
        results = {"moetune (packed, padding-free)": bench_moetune(config)}
        tokenizer = load_or_train_tokenizer(config, None, save_dir=root / "moetune" / "tokenizer")
        results["naive (pad to max_length)"] = bench_padded(config, tokenizer, texts)
        trl = bench_trl(config, tokenizer, texts, root / "trl")
        if trl is not None:
            results["TRL SFTTrainer (packing)"] = trl
    base = results["moetune (packed, padding-free)"]
    print(f"\nuseful tokens/s, {args.samples} samples, seq {args.seq}, batch {args.batch}, hidden {args.hidden}, "
          f"{args.layers} layers, {args.experts} experts, {torch.get_num_threads()} threads")
    for name, rate in results.items():
        print(f"  {name:34s} {rate:10,.0f}   moetune / this = {base / rate:5.2f}x")
    if trl is None:
        print("  TRL SFTTrainer: not installed (pip install trl)")


if __name__ == "__main__":
    main()
