"""moetune on one CUDA GPU, checked in one command: every stage ok / FAILED / skipped, with figures.

    python scripts/gpu_check.py --out DIR                 # on an H100/H200: about 8 minutes at most
    python scripts/gpu_check.py --cpu --out DIR           # every stage at tiny shapes on CPU (CUDA-only ones skipped)
    python scripts/gpu_check.py --out DIR --stages 4,5    # rerun some stages
    python scripts/gpu_check.py --download-wheels .whl    # on a machine with a package index: what travels (below)

Stages: 1 environment (GPU, versions, which optional packages import, a bf16 matmul's TFLOP/s);
2 the shipped quickstart in bf16 with fused AdamW (the loss falls, tokens/s, peak memory); 3 packed rows
are exact (each packed sample's per-token losses equal those of the sample alone; sdpa, and
flash_attention_2 when flash-attn imports); 4 experts kernels (eager, grouped_mm, batched_mm, and the
others transformers registers) at Mixtral-8x7B, Qwen3-30B-A3B and gpt-oss-20b layer shapes, 2 layers, seq 4096,
batch 1, bf16, gradient checkpointing, attention LoRA: loss difference to eager, steady-state tokens/s,
MFU (scripts/bench_train.py's 4 x N FLOP count), peak memory; 5 QLoRA 4-bit against bf16 LoRA on the
2-layer full-width Mixtral (peak memory, loss after 10 steps); 6 DeepSpeed ZeRO-2 through
``NUM_GPUS=1 bash train.sh`` for 10 steps; 7 expert LoRA and ESFT tokens/s beside attention LoRA at the Mixtral shape.

Run it as a script (a fresh interpreter): each stage runs in a process forked from one that has run no
torch op, so no OpenMP or CUDA state crosses a fork. Each stage runs in a forked process of its own with a share of ``--budget`` (470 s), so a crash, a hang
or an out-of-memory in one never stops the next. ``gpu_report.json`` and ``gpu_report.md`` are rewritten
in ``--out`` before and after every stage, and every stage's output is appended to ``gpu_check.log``
there, so a run cut short still leaves what it measured. A stage is FAILED with the first lines of its
error; variants within a stage (one kernel, one attention kernel) fail on their own.

What travels to the GPU machine (its image: Python 3.12, torch 2.11+cu130, transformers 5.17, peft,
accelerate 1.15, tokenizers, safetensors, pyarrow, pandas, fsspec, xxhash, filelock, pyyaml, psutil,
matplotlib, tensorboard; no network). moetune itself is not installed there: the working tree travels
and ``src`` goes on PYTHONPATH. Wheels, 64 MiB a call in all with the tree (about 25 MiB), fetched here
by ``--download-wheels``, which pins the versions installed in this environment:

* transformers and peft: the versions moetune's tests run against (the image's transformers 5.17 is older);
* datasets, dill, multiprocess: the tokenized-data cache every training stage builds;
* tree-sitter, tree-sitter-rust, google-re2, pathspec: ``moetune data`` on the quickstart's Rust crate;
* regex: the version transformers checks for at import;
* deepspeed (built here as a pure-Python wheel; its CUDA ops are JIT-built and ZeRO-2 with moetune's own
  AdamW needs none), hjson, pydantic, pydantic-core, annotated-types, typing-inspection: stage 6;
* bitsandbytes, with only its CPU and CUDA 13 libraries kept (43 MiB as published): stage 5.

flash-attn is not carried: it has no wheel and building it takes longer than the machine is lent; stage 3
reports it as absent. With a GPU machine lent through this workplace's device tool, from the repository
root, once here: ``echo /.whl/ >> .git/info/exclude; python scripts/gpu_check.py --download-wheels .whl``;
then one call, run(carry=[".whl"], timeout_s=560, command=

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    && export PYTHONPATH=/tmp/site:$PWD/src || exit; PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --out $OUT

) (one line, joined by a space). The report's files come back from $OUT; rerun failed stages with ``--stages``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # bench_train's presets, data and FLOP count
MOETUNE_KERNELS = ("eager", "grouped_mm", "batched_mm")  # what model.experts_implementation accepts
OPTIONAL_MODULES = {"flash-attn": "flash_attn", "bitsandbytes": "bitsandbytes", "deepspeed": "deepspeed",
                    "datasets": "datasets", "tree-sitter": "tree_sitter", "tree-sitter-rust": "tree_sitter_rust",
                    "google-re2": "re2", "pathspec": "pathspec", "filelock": "filelock", "matplotlib": "matplotlib"}


class Skip(Exception):
    """The stage (or variant) cannot run here; the message says why."""


class CheckFailed(Exception):
    """The stage ran but a measured value is wrong."""


@dataclasses.dataclass
class Context:
    """What a stage sees: the mode, a scratch folder, its deadline, and the results it records."""

    cpu: bool
    work: Path
    deadline: float
    result_path: Path
    results: dict = dataclasses.field(default_factory=dict)
    summary: str = ""
    failures: list = dataclasses.field(default_factory=list)

    @property
    def device(self) -> str:
        return "cpu" if self.cpu else "cuda"

    def put(self, key: str, value) -> None:
        self.results[key] = value
        self.save()

    def save(self, **extra) -> None:
        tmp = self.result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"results": self.results, "summary": self.summary, "failures": self.failures,
                                   **extra}, default=str))
        tmp.replace(self.result_path)

    @contextlib.contextmanager
    def variant(self, group: str, name: str):
        """One measurement within a stage: its failure is recorded and the stage goes on with the next."""
        entry = self.results.setdefault(group, {}).setdefault(name, {})
        try:
            yield entry
            entry.setdefault("status", "ok")
        except Skip as skip:
            entry.update(status="skipped", reason=str(skip))
        except Exception as err:  # noqa: BLE001 - every failure is reported, none stops the stage
            from moetune.errors import OutOfMemory

            traceback.print_exc()
            if isinstance(err, OutOfMemory) or type(err).__name__ == "OutOfMemoryError":
                entry.update(status="out of memory", error=error_lines(err, 2))
            else:
                entry.update(status="FAILED", error=error_lines(err))
                self.failures.append(f"{group}: {name}")
        finally:
            _free_memory()
            self.save()


def error_lines(err: BaseException, limit: int = 8) -> str:
    """The error's first lines and where it was raised."""
    lines = "".join(traceback.format_exception_only(type(err), err)).strip().splitlines()[:limit]
    frames = traceback.extract_tb(err.__traceback__)
    if frames:
        lines.append(f"  at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}")
    return "\n".join(lines)


def _free_memory() -> None:
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak() -> None:
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
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def import_status(module: str) -> str:
    try:
        imported = importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - a broken install is reported like a missing one
        return "missing: " + error_lines(err, 1).splitlines()[0]
    return f"ok {getattr(imported, '__version__', '')}".strip()


# ---------------------------------------------------------------------------- the stages


def stage_environment(ctx: Context) -> None:
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


def stage_packed_rows(ctx: Context) -> None:
    import torch
    import torch.nn.functional as F
    from transformers import MixtralConfig, MixtralForCausalLM

    from moetune.data.packing import PackedCollator, PackedDataset, plan_packed_rows
    from moetune.models.load.kernels import flash_attention_available

    vocab, hidden, row = (101, 64, 24) if ctx.cpu else (1000, 256, 1024)
    generator = torch.Generator().manual_seed(1)
    lengths = (11, 7, 5, 9, 3, 12) if ctx.cpu else torch.randint(40, 400, (10,), generator=generator).tolist()
    samples = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]
    rows = plan_packed_rows([len(s) for s in samples], row)
    # A wider initialisation than the default makes attention peaked, so a sample that saw another would show.
    config = MixtralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=2 * row, initializer_range=0.1)

    class Encoded:  # the slice of the datasets.Dataset interface PackedDataset uses
        column_names = ["input_ids", "labels"]

        def __getitem__(self, indices):
            return {"input_ids": [samples[i] for i in indices], "labels": [samples[i] for i in indices]}

    packed_rows = [PackedDataset(Encoded(), rows)[i] for i in range(len(rows))]

    def token_losses(logits, ids) -> torch.Tensor:
        return F.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:], device=logits.device), reduction="none")

    def run(model, flatten: bool):
        batch = PackedCollator(pad_token_id=0, flatten=flatten)(packed_rows)
        with torch.no_grad():
            # use_cache=False: with a cache object transformers skips the packed-sequence mask.
            packed = model(input_ids=batch["input_ids"].to(ctx.device), position_ids=batch["position_ids"].to(ctx.device),
                           use_cache=False).logits
            alone = [token_losses(model(input_ids=torch.tensor([s], device=ctx.device), use_cache=False).logits[0], s)
                     for s in samples]
            first, second = samples[rows[0][0]], samples[rows[0][1]]  # the control: no restart between two samples
            joined = model(input_ids=torch.tensor([first + second], device=ctx.device), use_cache=False).logits[0]
        got, offset = [], 0
        for b, members in enumerate(rows):
            start = 0
            for index in members:
                n = len(samples[index])
                logits = packed.reshape(-1, vocab)[offset + start:offset + start + n] if flatten else packed[b, start:start + n]
                got.append((index, token_losses(logits, samples[index])))
                start += n
            offset += start
        diff = max(float((losses - alone[i]).abs().max()) for i, losses in got)
        control = float((token_losses(joined[len(first):], second) - alone[rows[0][1]]).abs().max())
        return diff, control, alone

    torch.manual_seed(0)
    reference = MixtralForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32).to(ctx.device).eval()
    _, _, reference_alone = run(reference, flatten=False)
    ctx.put("shape", {"hidden": hidden, "vocab": vocab, "samples": len(samples), "rows": len(rows), "row_tokens": row})
    variants = [("sdpa", torch.float32, False), ("sdpa", torch.bfloat16, False), ("flash_attention_2", torch.bfloat16, True)]
    for attn, dtype, flatten in variants:
        with ctx.variant("checks", f"{attn} {str(dtype).removeprefix('torch.')}") as entry:
            if attn == "flash_attention_2" and (ctx.cpu or not flash_attention_available()):
                raise Skip("flash-attn does not import here" if not ctx.cpu else "flash-attn has no CPU kernel")
            model = MixtralForCausalLM._from_config(config, attn_implementation=attn, dtype=dtype).to(ctx.device).eval()
            model.load_state_dict(reference.state_dict())
            diff, control, alone = run(model, flatten)
            # bf16 rounding alone moves the losses: the tolerance is a few times what it moves them when
            # each sample runs alone, far below what attending across samples does (the control).
            rounding = max(float((a - r).abs().max()) for a, r in zip(alone, reference_alone, strict=True))
            tolerance = 1e-4 if dtype == torch.float32 else max(4 * rounding, 1e-3)
            entry.update(max_abs_loss_diff=diff, tolerance=tolerance, rounding=rounding, control_without_restart=control,
                         control_discriminates=control > tolerance)
            if diff > tolerance:
                raise CheckFailed(f"packed per-token losses differ from each sample alone by {diff:.2e} "
                                  f"(tolerance {tolerance:.1e}; samples that see each other: {control:.2e})")
    checks = ctx.results["checks"]
    ctx.summary = "; ".join(f"{name}: {c['status']}" + (f" (max diff {c['max_abs_loss_diff']:.1e})" if "max_abs_loss_diff" in c else "")
                            for name, c in checks.items())


KERNEL_SHAPES_CPU = {
    "mixtral-8x7b (tiny)": {"hidden": 32, "intermediate": 64, "heads": 4, "kv_heads": 2, "head_dim": None, "experts": 4,
                            "top_k": 2, "vocab": 256, "seq": 64, "batch": 1, "bf16": False},
    "qwen3-30b-a3b (tiny)": {"hidden": 32, "intermediate": 16, "heads": 4, "kv_heads": 2, "head_dim": 16, "experts": 16,
                             "top_k": 4, "vocab": 256, "seq": 64, "batch": 1, "bf16": False},
    "gpt-oss-20b (tiny)": {"architecture": "gpt_oss", "hidden": 32, "intermediate": 32, "heads": 4, "kv_heads": 2,
                           "head_dim": 8, "experts": 8, "top_k": 4, "vocab": 256, "seq": 64, "batch": 1, "bf16": False},
}


def other_kernels() -> dict[str, str]:
    """Experts kernels transformers registers beyond moetune's, with why each is not measured."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    reasons = {}
    for name in ALL_EXPERTS_FUNCTIONS.keys():
        if name in MOETUNE_KERNELS:
            continue
        check = getattr(importlib.import_module(f"transformers.integrations.{name}"), f"is_{name}_loadable", None)
        why = "not accepted by model.experts_implementation"
        if check is not None:
            try:
                check(raise_error=True)
            except Exception as err:  # noqa: BLE001 - the reason is the report
                why = f"cannot load here ({error_lines(err, 1).splitlines()[0]}); also {why}"
        reasons[name] = why
    return reasons


def stage_experts_kernels(ctx: Context) -> None:
    from bench_train import PRESETS, bench_variants

    shapes = KERNEL_SHAPES_CPU if ctx.cpu else {name: PRESETS[name] for name in ("mixtral-8x7b", "qwen3-30b-a3b",
                                                                                 "gpt-oss-20b")}
    steps, samples = (2, 16) if ctx.cpu else (12, 600)
    optimizer = [] if ctx.cpu else ["training.optim=adamw_torch_fused"]
    ctx.put("setup", {"layers": 2, "steps": steps, "logging_steps": 1, "lora": "q/k/v/o r 16",
                      "gradient_checkpointing": not ctx.cpu, "precision": "fp32" if ctx.cpu else "bf16"})
    ctx.put("not_measured", other_kernels())
    lines = []
    for shape, sizes in shapes.items():
        args = SimpleNamespace(layers=2, samples=samples, steps=steps, **sizes)
        args.intermediate = args.intermediate or 2 * args.hidden
        tokenizer: list[str] = []
        for kernel in MOETUNE_KERNELS:
            with ctx.variant(shape, kernel) as entry:
                root = ctx.work / "kernels" / shape.replace(" ", "_").replace("(", "").replace(")", "") / kernel
                root.mkdir(parents=True)
                [result] = bench_variants(args, root, {kernel: (kernel, [*tokenizer, *optimizer])}, logging_steps=1)
                tokenizer = tokenizer or [f"model.tokenizer={root / kernel / 'tokenizer'}"]
                entry.update(result)
        measured = {k: v for k, v in ctx.results[shape].items() if v.get("status") == "ok"}
        eager = measured.get("eager", {}).get("lm_losses")
        tolerance = 1e-3 if ctx.cpu else 5e-2  # bf16 sums in another order move the loss by ~1e-2
        for kernel, entry in measured.items():
            if eager and kernel != "eager":
                common = min(len(eager), len(entry["lm_losses"]))
                entry["loss_diff_vs_eager"] = {"step_1": abs(entry["lm_losses"][0] - eager[0]),
                                               "max": max(abs(a - b) for a, b in zip(entry["lm_losses"][:common], eager[:common], strict=True))}
                if entry["loss_diff_vs_eager"]["step_1"] > tolerance:
                    entry["status"] = "FAILED"
                    entry["error"] = (f"step-1 loss differs from eager by {entry['loss_diff_vs_eager']['step_1']:.2e} "
                                      f"(tolerance {tolerance:.0e}): the kernel computes something else")
                    ctx.failures.append(f"{shape}: {kernel}")
        ctx.save()
        lines.append(f"{shape}: " + ", ".join(
            f"{k} {v['tokens_per_second']:,.0f} tok/s" + (f" MFU {v['mfu']:.1%}" if v.get("mfu") else "")
            if "tokens_per_second" in v else f"{k} {v['status']}" for k, v in ctx.results[shape].items()))
    ctx.summary = "; ".join(lines)


def stage_qlora(ctx: Context) -> None:
    import torch

    from bench_train import PRESETS, config_yaml, make_dataset
    from moetune.config import load_config
    from moetune.data.tokenizer import load_or_train_tokenizer
    from moetune.models.load.factory import build_base_model

    status = import_status("bitsandbytes")
    if status.startswith("missing"):
        raise Skip(f"bitsandbytes does not import ({status.removeprefix('missing: ')}); carry its wheel (see the docstring)")
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
    _free_memory()
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
        raise Skip(f"deepspeed does not import ({status.removeprefix('missing: ')}); carry its wheel (see the docstring)")
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


@dataclasses.dataclass(frozen=True)
class Stage:
    number: int
    name: str
    run: Callable[[Context], None]
    cap_seconds: float  # on CUDA; the share of --budget it may take at most


STAGES = [
    Stage(1, "environment", stage_environment, 45),
    Stage(2, "quickstart on CUDA, bf16", stage_quickstart, 75),
    Stage(3, "packed rows are exact", stage_packed_rows, 45),
    Stage(4, "experts kernels at real shapes", stage_experts_kernels, 220),
    Stage(5, "QLoRA 4-bit vs bf16 LoRA", stage_qlora, 110),
    Stage(6, "DeepSpeed ZeRO-2 through train.sh", stage_deepspeed, 100),
    Stage(7, "expert LoRA and ESFT tokens/s", stage_expert_training, 30),
]


# ---------------------------------------------------------------------------- running and reporting


def _child(stage: Stage, ctx: Context, log_path: Path) -> None:
    os.setpgrp()  # the parent can end this stage and everything it started (train.sh) at once
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as this process
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    status, extra = "ok", {}
    try:
        stage.run(ctx)
        if ctx.failures:
            status, extra = "FAILED", {"error": "failed: " + ", ".join(ctx.failures)}
    except Skip as skip:
        status, extra = "skipped", {"reason": str(skip)}
    except BaseException as err:  # noqa: BLE001 - reported, never raised into the parent
        traceback.print_exc()
        status, extra = "FAILED", {"error": error_lines(err)}
    ctx.save(status=status, **extra)
    log.flush()
    os._exit(0)


def run_stage(stage: Stage, args, work: Path, log_path: Path, timeout: float) -> dict:
    """The stage in a forked process with ``timeout`` seconds; its record for the report."""
    result_path = work / f"stage-{stage.number}.json"
    ctx = Context(cpu=args.cpu, work=work / f"stage-{stage.number}", deadline=time.time() + timeout, result_path=result_path)
    ctx.work.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"\n===== stage {stage.number}: {stage.name} (timeout {timeout:.0f} s)\n")
    start = time.perf_counter()
    process = multiprocessing.get_context("fork").Process(target=_child, args=(stage, ctx, log_path))
    process.start()
    process.join(timeout)
    timed_out = process.is_alive()
    if timed_out:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            process.join(wait)
            if not process.is_alive():
                break
    record = {"number": stage.number, "name": stage.name, "seconds": round(time.perf_counter() - start, 1)}
    data = json.loads(result_path.read_text()) if result_path.is_file() else {}
    record.update(results=data.get("results", {}), summary=data.get("summary", ""))
    if timed_out:
        record.update(status="FAILED", error=f"timed out after {timeout:.0f} s (its share of --budget); the results "
                                             f"above are what it measured by then. Last lines of its log:\n{_log_tail(log_path)}")
    elif "status" not in data:
        record.update(status="FAILED", error=f"its process ended with exit code {process.exitcode} before reporting "
                                             f"(a crash in native code?). Last lines of its log:\n{_log_tail(log_path)}")
    else:
        record.update({k: data[k] for k in ("status", "error", "reason") if k in data})
    return record


def _log_tail(log_path: Path, lines: int = 8) -> str:
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])


def write_report(out: Path, report: dict) -> None:
    for name, text in (("gpu_report.json", json.dumps(report, indent=1, default=str)), ("gpu_report.md", markdown(report))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)


def markdown(report: dict) -> str:
    lines = [f"# moetune GPU check ({report['mode']})", "", f"`{report['command']}`, started {report['started']}, "
             f"{report.get('seconds', 0):.0f} s so far.", "", "| # | stage | status | seconds | summary |", "|---|---|---|---|---|"]
    for s in report["stages"]:
        lines.append(f"| {s['number']} | {s['name']} | {s['status']} | {s.get('seconds', '')} | "
                     f"{(s.get('summary') or s.get('reason') or s.get('error', '').splitlines()[0] if s.get('error') else s.get('summary') or s.get('reason') or '').replace('|', '/')} |")
    for s in report["stages"]:
        lines += ["", f"## {s['number']}. {s['name']}: {s['status']}"]
        for key in ("reason", "error"):
            if s.get(key):
                lines += ["", "```", s[key], "```"]
        if s.get("results"):
            lines += ["", "```json", json.dumps(s["results"], indent=1, default=str), "```"]
    return "\n".join(lines) + "\n"


def download_wheels(folder: Path) -> None:
    """The wheels the GPU machine lacks, at the versions installed here, for CPython 3.12 on x86-64 Linux."""
    import zipfile
    from importlib.metadata import version

    folder.mkdir(parents=True, exist_ok=True)
    binary = ["transformers", "peft", "datasets", "dill", "multiprocess", "tree-sitter", "tree-sitter-rust", "google-re2",
              "pathspec", "regex", "hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "bitsandbytes"]
    platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28)] + ["--platform=manylinux2014_x86_64",
                                                                                    "--platform=manylinux1_x86_64"]
    pins = [f"{name}=={version(name)}" for name in binary]
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version=3.12", "--implementation=cp",
                    *platforms, "-d", str(folder), *pins], check=True)
    # DeepSpeed publishes only a source archive; its wheel is pure Python (ops are JIT-built where needed).
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(folder), f"deepspeed=={version('deepspeed')}"],
                   check=True, env={**os.environ, "DS_BUILD_OPS": "0"})
    for wheel in folder.glob("bitsandbytes-*.whl"):  # keep the CPU and CUDA 13 libraries: 43 MiB -> a few
        slim = wheel.with_suffix(".slim")
        with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
            def kept(name: str) -> bool:
                return not name.endswith(".so") or "_cpu" in name or "_cuda13" in name
            for item in src.infolist():
                if not kept(item.filename):
                    continue
                data = src.read(item)
                if item.filename.endswith("RECORD"):
                    data = "".join(line for line in data.decode().splitlines(keepends=True)
                                   if kept(line.split(",")[0])).encode()
                dst.writestr(item, data)
        slim.replace(wheel)
    total = sum(p.stat().st_size for p in folder.glob("*.whl"))
    print(f"{len(list(folder.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {folder} (the tree and the wheels "
          "travel within 64 MiB a call)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for gpu_report.json, gpu_report.md and gpu_check.log")
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on CPU; CUDA-only stages are skipped")
    parser.add_argument("--stages", help="comma-separated stage numbers (default: all)")
    parser.add_argument("--budget", type=float, default=470, help="seconds for all stages together (default 470)")
    parser.add_argument("--download-wheels", type=Path, metavar="DIR", help="fetch the wheels that travel, then exit")
    args = parser.parse_args(argv)
    if args.download_wheels:
        download_wheels(args.download_wheels)
        return 0
    if args.out is None:
        parser.error("--out DIR is required")
    chosen = {int(n) for n in args.stages.split(",")} if args.stages else {s.number for s in STAGES}
    stages = [s for s in STAGES if s.number in chosen]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers' threads do not survive a fork
    if args.cpu:
        # Forked stages start from what is already imported. On CUDA nothing is imported first, so
        # no CUDA state exists before a fork.
        import peft  # noqa: F401
        import transformers.models.mixtral.modeling_mixtral  # noqa: F401

        import moetune.cli  # noqa: F401
        import moetune.train.loop  # noqa: F401
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "gpu_check.log"
    log_path.write_text("")
    import tempfile

    report = {"mode": "cpu (tiny shapes)" if args.cpu else "cuda", "command": " ".join(["python", "scripts/gpu_check.py",
              *(argv if argv is not None else sys.argv[1:])]), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "stages": []}
    began = time.time()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for index, stage in enumerate(stages):
            left = args.budget - (time.time() - began)
            floor = 15 * (len(stages) - index - 1)  # a little for each later stage, so a slow one cannot starve them
            timeout = min(stage.cap_seconds if not args.cpu else args.budget, max(10.0, left - floor))
            report["stages"].append({"number": stage.number, "name": stage.name, "status": "running"})
            write_report(args.out, report)
            record = run_stage(stage, args, Path(tmp), log_path, timeout)
            report["stages"][-1] = record
            report["seconds"] = time.time() - began
            write_report(args.out, report)
            print(f"{stage.number}. {stage.name}: {record['status']} ({record['seconds']} s) "
                  f"{record.get('summary') or record.get('reason') or record.get('error', '')}", flush=True)
    print("\n" + markdown(report).split("\n## ")[0])
    return 1 if any(s["status"] == "FAILED" for s in report["stages"]) else 0


if __name__ == "__main__":
    sys.exit(main())
