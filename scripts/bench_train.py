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
same Rust-like samples with the same tokenizer, batch size, learning rate and one epoch. Each reports
useful tokens per second: tokens that carry a loss (no padding, not the first token of a sample),
counted once per epoch, divided by the wall time of its training loop (model building and tokenisation
excluded). Each trainer runs ``--repeats`` times (3), interleaved, each run in a fresh process; the
table gives every run, the medians and the range of the per-round ratios.

TRL's SFTConfig defaults differ from this run (gradient checkpointing and bf16 on, fused AdamW), so
every option that changes the work is set explicitly to what moetune's run does (``trl_config``):
precision, checkpointing, optimizer, schedule, clipping, best-fit-decreasing packing, the loss on the
same tokens, the router aux loss weight; the model, with its attention (sdpa) and experts kernels, is
built by moetune for all three. What still differs is each trainer's own design: TRL's padding-free
packing flattens the whole batch into one row with a block-diagonal mask (moetune keeps batch rows of
``--seq`` tokens), and TRL computes entropy and token accuracy every step. Needs TRL for the third line
(`pip install -e ".[bench]"`); it is left out with a note when missing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moetune.config import load_config
from moetune.data.tokenizer import load_or_train_tokenizer
from moetune.models.load.factory import build_model
from moetune.run_dir import METRICS_FILE, TOKENIZER_DIR
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


PRESETS = {
    "mixtral-8x7b": {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "head_dim": None, "experts": 8,
                     "top_k": 2, "vocab": 32000, "seq": 4096, "batch": 1, "bf16": True},
    # Qwen3-30B-A3B's layer shapes (many narrow experts, where the experts kernel matters most), built
    # as a Mixtral-family model: the same routed-experts computation, softmax top-k routing.
    "qwen3-30b-a3b": {"hidden": 2048, "intermediate": 768, "heads": 32, "kv_heads": 4, "head_dim": 128, "experts": 128,
                      "top_k": 8, "vocab": 32000, "seq": 4096, "batch": 1, "bf16": True},
    # gpt-oss-20b as itself (the gpt_oss family: router bias, expert biases, attention sinks, eager attention).
    "gpt-oss-20b": {"architecture": "gpt_oss", "hidden": 2880, "intermediate": 2880, "heads": 64, "kv_heads": 8,
                    "head_dim": 64, "experts": 32, "top_k": 4, "vocab": 32000, "seq": 4096, "batch": 1, "bf16": True},
}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, SXM


def config_yaml(data: Path, out: Path, args, experts_kernel: str | None = None, logging_steps: int = 5) -> str:
    precision = "bfloat16" if args.bf16 else "float32"
    kernel = f"\n  experts_implementation: {experts_kernel}" if experts_kernel else ""
    head_dim = f", head_dim: {args.head_dim}" if args.head_dim else ""
    architecture = getattr(args, "architecture", "mixtral")  # presets other than Mixtral-shaped ones name theirs
    return f"""
model:
  name: bench-{architecture}
  architecture: {architecture}
  random_init: true
  torch_dtype: {precision}
  attn_implementation: sdpa
  max_seq_length: {args.seq}
  tokenizer_vocab_size: {args.vocab}{kernel}
  config_overrides: {{num_hidden_layers: {args.layers}, hidden_size: {args.hidden}, intermediate_size: {args.intermediate},
                     num_attention_heads: {args.heads}, num_key_value_heads: {args.kv_heads}, num_local_experts: {args.experts},
                     num_experts_per_tok: {args.top_k}, max_position_embeddings: {args.seq * 2}{head_dim}}}
lora: {{r: 16, lora_alpha: 32, lora_dropout: 0.0}}
moe: {{use_auxiliary_loss: true, auxiliary_loss_weight: 0.001, monitor: {{log_metrics: false}}}}
data: {{output_path: {data}}}
validation: {{validation_split: 0}}
training:
  output_dir: {out}
  num_train_epochs: 1
  per_device_train_batch_size: {args.batch}
  bf16: {str(args.bf16).lower()}
  gradient_checkpointing: {str(args.bf16).lower()}
  learning_rate: 1.0e-4
  logging_steps: {logging_steps}
  save_steps: 100000
  seed: 0
logging: {{tensorboard: false}}
"""


def bench_moetune(config) -> dict:
    train(config)
    records = [json.loads(line) for line in (Path(config.training.output_dir) / METRICS_FILE).read_text().splitlines()]
    last = records[-1]  # cumulative loss-bearing tokens and seconds since the loop started
    return {"useful_tokens": last["tokens_seen"], "seconds": last["elapsed_seconds"]}


def bench_padded(config, tokenizer, texts: list[str]) -> dict:
    """The common approach: every sample padded to max_length, plain HF-style loop (clipped like the others)."""
    torch.manual_seed(0)
    model = build_model(config, tokenizer, seed=config.training.seed,
                        gradient_checkpointing=config.training.gradient_checkpointing)
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
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.training.bf16):
            out = model(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx], labels=labels[idx])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.training.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        useful += int(enc["attention_mask"][idx].sum()) - len(idx)  # the first token of a row predicts nothing
    return {"useful_tokens": useful, "seconds": time.perf_counter() - start}


def trl_training_arguments(config, out: Path) -> dict:
    """The TrainingArguments every TRL trainer of these benches takes as moetune's run has them: one epoch, the
    batch, the precision, unfused AdamW with moetune's cosine schedule and no warmup, clip, the loader's workers;
    no compile, logging, saving or evaluation."""
    t = config.training
    return dict(
        output_dir=str(out), seed=t.seed, data_seed=t.seed, num_train_epochs=1, max_steps=-1,
        per_device_train_batch_size=t.per_device_train_batch_size, gradient_accumulation_steps=1,
        bf16=t.bf16, fp16=False, use_cpu=not torch.cuda.is_available(),
        optim="adamw_torch", learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler_type, warmup_steps=0,
        weight_decay=t.weight_decay, adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_epsilon=t.adam_epsilon,
        max_grad_norm=t.max_grad_norm, dataloader_num_workers=t.dataloader_num_workers, torch_compile=False,
        logging_steps=10**6, save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
    )


def trl_config(config, out: Path):
    """SFTConfig with every option that changes the work set as moetune's run has it (TRL's defaults differ:
    gradient checkpointing and bf16 on, fused AdamW, no aux loss coefficient of moetune's)."""
    from trl import SFTConfig

    return SFTConfig(
        **trl_training_arguments(config, out),
        # recomputation: moetune's bench run uses bf16 autocast and checkpointing together (--bf16)
        gradient_checkpointing=config.training.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        # data: best-fit-decreasing packing into max_seq_length, loss on every token but each sample's first
        # (TRL's padding-free collator masks position 0 as moetune's encoder does), router aux loss weighted alike
        max_length=config.model.max_seq_length, packing=True, packing_strategy="bfd", padding_free=True,
        completion_only_loss=False, dataset_text_field="text", pad_to_multiple_of=None,
        router_aux_loss_coef=config.moe.auxiliary_loss_weight, loss_type="nll",
    )


def bench_trl(config, tokenizer, texts: list[str], out: Path) -> dict:
    from datasets import Dataset
    from trl import SFTTrainer

    torch.manual_seed(0)
    # The same model, attention kernel (sdpa) and experts kernel as moetune's.
    model = build_model(config, tokenizer, seed=config.training.seed,
                        gradient_checkpointing=config.training.gradient_checkpointing)
    trainer = SFTTrainer(model=model, args=trl_config(config, out), train_dataset=Dataset.from_dict({"text": texts}),
                         processing_class=tokenizer)
    rows = trainer.train_dataset
    samples = sum(len(lengths) for lengths in rows["seq_lengths"]) if "seq_lengths" in rows.column_names else len(texts)
    useful = sum(len(ids) for ids in rows["input_ids"]) - samples  # each sample's first token carries no loss
    result = trainer.train()
    return {"useful_tokens": useful, "seconds": result.metrics["train_runtime"]}


def steady_rate(output_dir: Path) -> float:
    """Tokens/s between the first and the last logged step of a moetune run (warm-up left out)."""
    records = [json.loads(line) for line in (output_dir / METRICS_FILE).read_text().splitlines()]
    logged = [r for r in records if "tokens_seen" in r]
    if len(logged) < 2:
        raise SystemExit(f"{output_dir}: fewer than two logged steps; raise --steps (steps are logged every 5).")
    first, last = logged[0], logged[-1]
    return (last["tokens_seen"] - first["tokens_seen"]) / (last["elapsed_seconds"] - first["elapsed_seconds"])


def flops_per_token(args, vocab: int) -> float:
    """Model FLOPs per token of LoRA training on frozen weights: 4 x active parameters (the top-k of the
    experts; forward 2, activation gradients 2) + attention scores (forward and backward)."""
    head_dim = args.head_dim or args.hidden // args.heads
    attention = 2 * args.hidden * args.heads * head_dim + 2 * args.hidden * args.kv_heads * head_dim
    experts = args.top_k * 3 * args.hidden * args.intermediate  # top-k experts, gate/up/down each
    active = args.layers * (attention + args.hidden * args.experts + experts) + args.hidden * vocab
    return 4 * active + 12 * args.layers * args.heads * head_dim * args.seq


def gpu_peak_flops() -> tuple[str, float | None]:
    """The GPU's name and its dense bf16 peak (None when unknown or on CPU)."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return name, next((flops for gpu, flops in PEAK_BF16_FLOPS.items() if gpu in name), None)


def bench_variants(args, root: Path, variants: dict[str, tuple[str | None, list[str]]], logging_steps: int = 5,
                   on_result=None) -> list[dict]:
    """moetune alone on the given shapes once per variant (experts kernel, config overrides): steady-state
    tokens/s, MFU on a known GPU, peak GPU memory, the seconds to the first logged step (start-up and
    compilation) and the logged LM losses (the variants train the same model on the same data, so they
    should agree). Returns one dict per variant; ``on_result`` is called with each as it is measured."""
    make_dataset(root / "data.jsonl", args.samples, args.seq)
    name, peak = gpu_peak_flops()
    print(f"\n{name}: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, {args.experts} "
          f"experts (top-{args.top_k}), seq {args.seq}, batch {args.batch}, {'bf16' if args.bf16 else 'fp32'}")
    results, tokenizer_dir = [], None
    for label, (kernel, overrides) in variants.items():
        folder = label.replace(" ", "-")
        (root / f"{folder}.yaml").write_text(config_yaml(root / "data.jsonl", root / folder, args, kernel, logging_steps))
        shared = [f"model.tokenizer={tokenizer_dir}"] if tokenizer_dir else []  # trained once, on the first variant
        config = load_config(root / f"{folder}.yaml",
                             ["training.num_train_epochs=1", f"training.max_steps={args.steps}", *shared, *overrides])
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        train(config)
        tokenizer_dir = tokenizer_dir or root / folder / TOKENIZER_DIR
        rate = steady_rate(root / folder)
        logged = [json.loads(line) for line in (root / folder / METRICS_FILE).read_text().splitlines()]
        vocab = len(load_or_train_tokenizer(config, None, save_dir=tokenizer_dir))
        mfu = rate * flops_per_token(args, vocab) / peak if peak else None
        result = {"variant": label, "tokens_per_second": rate, "mfu": mfu, "vocab": vocab,
                  "first_logged_step_seconds": logged[0]["elapsed_seconds"],
                  "lm_losses": [r["lm_loss"] for r in logged],
                  "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}
        results.append(result)
        if on_result:
            on_result(result)
        print(f"  {label:22s} {rate:10,.0f} tokens/s   MFU {f'{mfu:6.1%}' if mfu else 'n/a (no known GPU peak)'}   "
              f"first logged step after {result['first_logged_step_seconds']:6.1f} s   last lm_loss {logged[-1]['lm_loss']:.5f}")
    return results


TRAINERS = {"moetune": "moetune (packed, padding-free)", "padded": "naive (pad to max_length)",
            "trl": "TRL SFTTrainer (packing, padding-free)"}


def run_trainer(trainer: str, root: Path, rep: int) -> dict:
    """One timed run of one trainer, in this (fresh) process, on the data and tokenizer the parent prepared."""
    config = load_config(root / "bench.yaml", [f"model.tokenizer={root / 'tokenizer'}",
                                               f"training.output_dir={root / f'{trainer}-{rep}'}"])
    if trainer == "moetune":
        return bench_moetune(config)
    tokenizer = load_or_train_tokenizer(config, None)
    texts = [json.loads(line)["text"] for line in Path(config.data.output_path).read_text().splitlines()]
    if trainer == "padded":
        return bench_padded(config, tokenizer, texts)
    return bench_trl(config, tokenizer, texts, root / f"trl-{rep}")


def peer_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "transformers", "peft", "accelerate", "datasets", "trl"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def run_in_fresh_process(script: str, flags: list[str], trainer: str, root: Path, rep: int) -> dict:
    """``script --child trainer``'s run in a process of its own (no allocator or thread-pool state inherited from
    another run): the JSON object its last output line holds."""
    out = subprocess.run([sys.executable, script, *flags, "--child", trainer, "--root", str(root), "--rep", str(rep)],
                         check=True, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare_trainers(args, root: Path) -> None:
    """Each trainer ``--repeats`` times, interleaved (moetune, padded, TRL, moetune, ...), each run in a fresh
    process so no run inherits another's allocator or thread-pool state; medians and the range of ratios."""
    texts = make_dataset(root / "data.jsonl", args.samples, args.seq)
    (root / "bench.yaml").write_text(config_yaml(root / "data.jsonl", root / "moetune", args))
    load_or_train_tokenizer(load_config(root / "bench.yaml"), iter(texts), save_dir=root / TOKENIZER_DIR)
    versions = peer_versions()
    trainers = [t for t in TRAINERS if t != "trl" or versions["trl"] != "not installed"]
    flags = [a for a in sys.argv[1:] if a != "--child"]
    rates: dict[str, list[float]] = {t: [] for t in trainers}
    for rep in range(args.repeats):
        for trainer in trainers:
            run = run_in_fresh_process(__file__, flags, trainer, root, rep)
            rates[trainer].append(run["useful_tokens"] / run["seconds"])
            print(f"  run {rep + 1}: {TRAINERS[trainer]:40s} {rates[trainer][-1]:10,.0f} useful tokens/s", flush=True)
    print(f"\nversions: {', '.join(f'{k} {v}' for k, v in versions.items())}; {torch.get_num_threads()} threads")
    print(f"useful tokens/s, {args.samples} samples, seq {args.seq}, batch {args.batch}, hidden {args.hidden}, "
          f"{args.layers} layers, {args.experts} experts, {'bf16 + checkpointing' if args.bf16 else 'fp32'}, "
          f"{args.repeats} interleaved runs each")
    base = rates["moetune"]
    for trainer in trainers:
        runs = rates[trainer]
        ratios = [b / r for b, r in zip(base, runs, strict=True)]
        print(f"  {TRAINERS[trainer]:40s} median {statistics.median(runs):10,.0f}   runs "
              f"{', '.join(f'{r:,.0f}' for r in runs)}   moetune / this: median {statistics.median(ratios):.2f}x, "
              f"range {min(ratios):.2f}-{max(ratios):.2f}x")
    if "trl" not in trainers:
        print("  TRL SFTTrainer: not installed (pip install trl)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2, help="experts per token")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--intermediate", type=int, help="expert FFN width (default: 2 x hidden)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, help="attention head width (default: hidden / heads)")
    parser.add_argument("--vocab", type=int, default=2048, help="entries of the BPE trained on the data")
    parser.add_argument("--bf16", action="store_true", help="bf16 weights and autocast, gradient checkpointing")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="real layer shapes (sets every size but --layers)")
    parser.add_argument("--experts-kernels", action="store_true", help="moetune only, eager vs grouped_mm experts")
    parser.add_argument("--compile", action="store_true", help="moetune only, with and without advanced.torch_compile")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per variant with --experts-kernels/--compile")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each trainer in the comparison")
    parser.add_argument("--child", choices=sorted(TRAINERS), help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rep", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for key, value in PRESETS.get(args.preset, {}).items():
        setattr(args, key, value)
    args.intermediate = args.intermediate or 2 * args.hidden
    if args.child:
        print(json.dumps(run_trainer(args.child, args.root, args.rep)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.experts_kernels:
            bench_variants(args, root, {f"experts {kernel}": (kernel, []) for kernel in ("eager", "grouped_mm")})
        elif args.compile:
            bench_variants(args, root, {"layers uncompiled": (None, []),
                                        "layers compiled": (None, ["advanced.torch_compile=true"])})
        else:
            compare_trainers(args, root)


if __name__ == "__main__":
    main()
