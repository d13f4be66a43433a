"""scripts/gpu_check.py's stages that run moetune as a user does: 1 the environment, 2 the quickstart,
5 QLoRA 4-bit against bf16 LoRA, 6 DeepSpeed ZeRO-2 through train.sh, 7 expert LoRA and ESFT tokens/s.

The training stages build their models and data with scripts/bench_train.py (presets, synthetic
Rust-like samples, the config it writes), imported inside each stage: bench_train imports torch, and
on CUDA the parent process that forks the stages imports none.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from gpu_check_harness import CheckFailed, Context, Skip, error_lines, free_memory
from gpu_check_kernels import KERNEL_SHAPES_CPU

ROOT = Path(__file__).resolve().parents[1]
# Stage 1 reports which of these import (package name -> module): what the other stages may need.
OPTIONAL_MODULES = {"flash-attn": "flash_attn", "bitsandbytes": "bitsandbytes", "deepspeed": "deepspeed",
                    "datasets": "datasets", "tree-sitter": "tree_sitter", "tree-sitter-rust": "tree_sitter_rust",
                    "google-re2": "re2", "pathspec": "pathspec", "filelock": "filelock", "matplotlib": "matplotlib"}


def reset_peak() -> None:
    """Start peak_gib's count afresh."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current resident set


def peak_gib(ctx: Context) -> float | None:
    """Peak GPU memory allocated since reset_peak (CUDA), else the process's resident-set high-water mark."""
    import torch

    if not ctx.cpu and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return None


def read_metrics(output_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    from moetune.run_dir import METRICS_FILE

    return [json.loads(line) for line in (Path(output_dir) / METRICS_FILE).read_text().splitlines()]


def import_status(module: str) -> str:
    """``ok <version>``, or ``missing: <the import error's first line>``."""
    try:
        imported = importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - a broken install is reported like a missing one
        return "missing: " + error_lines(err, 1).splitlines()[0]
    return f"ok {getattr(imported, '__version__', '')}".strip()


def stage_environment(ctx: Context) -> None:
    """Versions, optional packages, the GPU, and a large bf16 matmul's TFLOP/s (the ceiling MFU is read against)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    import moetune

    versions = {}
    for package in ("torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "safetensors"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    import transformers
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ctx.put("python", platform.python_version())
    ctx.put("versions", versions)
    ctx.put("transformers_path", str(Path(transformers.__file__).parent))
    ctx.put("moetune_path", str(Path(moetune.__file__).parent))
    ctx.put("torch_cuda", torch.version.cuda)
    ctx.put("imports", {name: import_status(module) for name, module in OPTIONAL_MODULES.items()})
    ctx.put("experts_kernels_offered", ["eager", *ALL_EXPERTS_FUNCTIONS.keys()])
    missing = [name for name, status in ctx.results["imports"].items() if status.startswith("missing")]
    if ctx.cpu:
        ctx.summary = f"CPU, torch {torch.__version__}, transformers {versions['transformers']}; missing: {missing or 'none'}"
        return
    if not torch.cuda.is_available():
        raise CheckFailed("torch sees no CUDA device (torch.cuda.is_available() is False); run with --cpu on a CPU machine")
    props = torch.cuda.get_device_properties(0)
    ctx.put("gpu", {"name": props.name, "memory_gib": props.total_memory / 2**30,
                    "capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count})
    # The machine's own ceiling, to read MFU against: a large bf16 matmul on random data.
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    tflops = 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1000) / 1e12
    ctx.put("bf16_matmul_tflops", tflops)
    ctx.summary = (f"{props.name} {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__} (CUDA {torch.version.cuda}), "
                   f"transformers {versions['transformers']}, bf16 matmul {tflops:.0f} TFLOP/s; missing: {missing or 'none'}")


def stage_quickstart(ctx: Context) -> None:
    """``moetune data`` and ``moetune train`` on configs/quickstart.yaml: the loss falls; tokens/s, peak memory."""
    from bench_train import steady_rate
    from moetune.cli import main as moetune

    os.chdir(ROOT)  # the quickstart names its sample data relative to the repository root
    folder = ctx.work / "quickstart"
    paths = [f"data.output_path={folder / 'all_data.jsonl'}", f"training.output_dir={folder / 'run'}"]
    # bf16 matmuls are slow on CPU: the CPU run trains in float32 (stage 5 trains in bf16 there).
    precision = [] if ctx.cpu else ["model.torch_dtype=bfloat16", "training.bf16=true", "training.optim=adamw_torch_fused"]
    short = ["training.max_steps=10", "training.logging_steps=5", "training.eval_steps=5", "training.save_steps=1000",
             "validation.max_eval_samples=16", "training.per_device_train_batch_size=4"] if ctx.cpu else []
    if moetune(["data", "--config", "configs/quickstart.yaml", *paths]) != 0:
        raise CheckFailed("moetune data on configs/quickstart.yaml failed (see gpu_check.log)")
    reset_peak()
    if moetune(["train", "--config", "configs/quickstart.yaml", *paths, *precision, *short]) != 0:
        raise CheckFailed("moetune train on configs/quickstart.yaml failed (see gpu_check.log)")
    records = read_metrics(folder / "run")
    train = [r for r in records if "lm_loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    peak = train[-1].get("gpu_memory_gb") if not ctx.cpu else peak_gib(ctx)
    ctx.results.update(steps=train[-1]["step"], first_lm_loss=train[0]["lm_loss"], last_lm_loss=train[-1]["lm_loss"],
                       eval_losses=evals, tokens_per_second=steady_rate(folder / "run"), peak_memory_gib=peak,
                       precision="float32" if ctx.cpu else "bf16 weights and autocast",
                       optimizer="adamw_torch" if ctx.cpu else "adamw_torch_fused")
    ctx.save()
    ctx.summary = (f"lm_loss {train[0]['lm_loss']:.3f} -> {train[-1]['lm_loss']:.3f} in {train[-1]['step']} steps, "
                   f"{ctx.results['tokens_per_second']:,.0f} tokens/s, peak {peak:.2f} GiB")
    if not train[-1]["lm_loss"] < train[0]["lm_loss"]:
        raise CheckFailed(f"the loss did not fall: {train[0]['lm_loss']:.4f} at the first log, {train[-1]['lm_loss']:.4f} at the last")


def stage_qlora(ctx: Context) -> None:
    """LoRA on one saved random 2-layer Mixtral loaded in bf16 and in 4-bit: peak memory and losses side by side."""
    import torch

    from bench_train import PRESETS, config_yaml, make_dataset
    from moetune.config import load_config
    from moetune.data.tokenizer import load_or_train_tokenizer
    from moetune.models.load.factory import build_base_model

    status = import_status("bitsandbytes")
    if status.startswith("missing"):
        raise Skip(f"bitsandbytes does not import ({status.removeprefix('missing: ')}); install its wheel (scripts/gpu_check_wheels.py)")
    sizes = KERNEL_SHAPES_CPU["mixtral-8x7b (tiny)"] if ctx.cpu else dict(PRESETS["mixtral-8x7b"])
    args = SimpleNamespace(layers=2, **{**sizes, "bf16": True})
    args.intermediate = args.intermediate or 2 * args.hidden
    folder = ctx.work / "qlora"
    folder.mkdir()
    texts = make_dataset(folder / "data.jsonl", 16 if ctx.cpu else 300, args.seq)
    (folder / "base.yaml").write_text(config_yaml(folder / "data.jsonl", folder / "base-run", args))
    # 4-bit weights are loaded, never built: save one random model, then train LoRA on it both ways.
    config = load_config(folder / "base.yaml")
    tokenizer = load_or_train_tokenizer(config, iter(texts), save_dir=folder / "base")
    model = build_base_model(config, tokenizer, seed=config.training.seed)
    model.save_pretrained(folder / "base")
    del model
    free_memory()
    steps = 3 if ctx.cpu else 10
    for label, extra in (("bf16 LoRA", []), ("QLoRA 4-bit", ["model.load_in_4bit=true"])):
        with ctx.variant("runs", label) as entry:
            out = folder / label.replace(" ", "-")
            run = load_config(folder / "base.yaml", [f"model.name={folder / 'base'}", "model.random_init=false",
                                                     f"training.output_dir={out}", f"training.max_steps={steps}",
                                                     "training.logging_steps=1", *extra])
            from moetune.train.loop import train

            reset_peak()
            if train(run) != 0:
                raise CheckFailed("training stopped early (see gpu_check.log)")
            records = read_metrics(out)
            entry.update(steps=records[-1]["step"], lm_loss_at_last_step=records[-1]["lm_loss"],
                         first_lm_loss=records[0]["lm_loss"], peak_memory_gib=peak_gib(ctx),
                         tokens_per_second=records[-1]["tokens_seen"] / records[-1]["elapsed_seconds"])
            if not all(torch.isfinite(torch.tensor(r["lm_loss"])) for r in records):
                raise CheckFailed("the loss is not finite")
    runs = ctx.results["runs"]
    if all(r.get("status") == "ok" for r in runs.values()):
        bf16, quant = runs["bf16 LoRA"], runs["QLoRA 4-bit"]
        ctx.put("peak_memory_ratio_4bit_to_bf16", quant["peak_memory_gib"] / bf16["peak_memory_gib"])
        ctx.summary = (f"peak {quant['peak_memory_gib']:.2f} GiB (4-bit) vs {bf16['peak_memory_gib']:.2f} GiB (bf16 LoRA); "
                       f"loss after {steps} steps {quant['lm_loss_at_last_step']:.3f} vs {bf16['lm_loss_at_last_step']:.3f}")


def stage_deepspeed(ctx: Context) -> None:
    """``NUM_GPUS=1 bash train.sh`` with DeepSpeed ZeRO-2 for 10 steps (on CPU only its launch command, dry)."""
    from bench_train import make_dataset

    folder = ctx.work / "deepspeed"
    folder.mkdir()
    make_dataset(folder / "data.jsonl", 200, 256)
    overrides = [f"data.output_path={folder / 'data.jsonl'}", f"training.output_dir={folder / 'run'}",
                 "training.max_steps=10", "training.logging_steps=1", "training.save_steps=1000",
                 "training.eval_steps=1000", "model.torch_dtype=bfloat16", "training.bf16=true"]
    env = {**os.environ, "NUM_GPUS": "1", "CONFIG": "configs/quickstart.yaml", "PYTHON": sys.executable,
           "TOKENIZERS_PARALLELISM": "false"}
    if ctx.cpu:
        dry = subprocess.run(["bash", "train.sh", *overrides], cwd=ROOT, env={**env, "DRY_RUN": "1"},
                             capture_output=True, text=True, timeout=120)
        ctx.put("dry_run_exit_code", dry.returncode)
        ctx.put("dry_run_command", dry.stdout.strip().splitlines()[-1] if dry.stdout.strip() else dry.stderr.strip())
        raise Skip("train.sh launches one process per CUDA GPU; this CPU run only checked its launch command (DRY_RUN=1)")
    status = import_status("deepspeed")
    if status.startswith("missing"):
        raise Skip(f"deepspeed does not import ({status.removeprefix('missing: ')}); install its wheel (scripts/gpu_check_wheels.py)")
    timeout = max(10.0, ctx.deadline - time.time() - 5)
    start = time.perf_counter()
    launch = subprocess.run(["bash", "train.sh", *overrides], cwd=ROOT, env=env, timeout=timeout)
    ctx.put("launch_seconds", time.perf_counter() - start)
    if launch.returncode != 0:
        raise CheckFailed(f"NUM_GPUS=1 bash train.sh exited {launch.returncode} (see gpu_check.log)")
    records = [r for r in read_metrics(folder / "run") if "lm_loss" in r]
    ctx.results.update(steps=records[-1]["step"], first_lm_loss=records[0]["lm_loss"], last_lm_loss=records[-1]["lm_loss"],
                       tokens_per_second=records[-1]["tokens_seen"] / records[-1]["elapsed_seconds"],
                       peak_memory_gib=records[-1].get("gpu_memory_gb"),
                       adapter_saved=(folder / "run" / "adapter_model.safetensors").is_file())
    ctx.save()
    ctx.summary = f"{records[-1]['step']} steps, lm_loss {records[0]['lm_loss']:.3f} -> {records[-1]['lm_loss']:.3f}"
    if records[-1]["step"] != 10 or not ctx.results["adapter_saved"]:
        raise CheckFailed(f"expected 10 steps and a saved adapter; got {records[-1]['step']} steps, "
                          f"adapter saved: {ctx.results['adapter_saved']}")


def stage_expert_training(ctx: Context) -> None:
    """Tokens/s and peak memory of the plans that train experts, beside attention LoRA, at the Mixtral shape."""
    from bench_train import PRESETS, bench_variants

    shape, sizes = (("mixtral-8x7b (tiny)", KERNEL_SHAPES_CPU["mixtral-8x7b (tiny)"]) if ctx.cpu
                    else ("mixtral-8x7b", PRESETS["mixtral-8x7b"]))
    steps, samples = (2, 16) if ctx.cpu else (12, 600)
    optimizer = [] if ctx.cpu else ["training.optim=adamw_torch_fused"]
    root = ctx.work / "expert_training"
    root.mkdir(parents=True)
    # ESFT's speed does not depend on which experts are chosen: two of the eight per layer, as a task might pick.
    selection = root / "experts.json"
    selection.write_text(json.dumps({"selected": [[0, 1], [0, 1]]}))
    plans = {"attention LoRA": (None, optimizer),
             "expert LoRA": (None, [*optimizer, "moe.expert_training=lora"]),
             "ESFT (2 experts per layer)": (None, [*optimizer, "lora.enabled=false", "moe.expert_training=esft",
                                                   f"moe.esft.experts={selection}"])}
    ctx.put("setup", {"shape": shape, "layers": 2, "steps": steps, "precision": "fp32" if ctx.cpu else "bf16"})
    args = SimpleNamespace(layers=2, samples=samples, steps=steps, **sizes)
    args.intermediate = args.intermediate or 2 * args.hidden
    for plan, variant in plans.items():
        with ctx.variant(shape, plan) as entry:
            folder = root / re.sub(r"\W+", "-", plan).strip("-").lower()
            folder.mkdir()
            [result] = bench_variants(args, folder, {plan: variant}, logging_steps=1)
            entry.update(result)
    ctx.save()
    ctx.summary = ", ".join(f"{k} {v['tokens_per_second']:,.0f} tok/s" if "tokens_per_second" in v else f"{k} {v['status']}"
                            for k, v in ctx.results[shape].items())


