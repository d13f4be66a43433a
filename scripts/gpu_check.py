"""moetune on one CUDA GPU, checked in one command: every stage ok / FAILED / skipped, with figures.

From the repository root, with moetune importable (installed, or ``PYTHONPATH=src``):

    python scripts/gpu_check.py --out DIR                 # on an H100/H200: about 8 minutes at most
    python scripts/gpu_check.py --cpu --out DIR           # every stage at tiny shapes on CPU (CUDA-only ones skipped)
    python scripts/gpu_check.py --out DIR --stages 4,5    # rerun some stages
    python scripts/gpu_check.py --download-wheels .whl    # the wheels a GPU machine without a package index needs

Stages: 1 environment (GPU, versions, which optional packages import, a bf16 matmul's TFLOP/s);
2 the shipped quickstart in bf16 with fused AdamW (the loss falls, tokens/s, peak memory); 3 packed rows
are exact (each packed sample's per-token losses equal those of the sample alone; sdpa, and
flash_attention_2 when flash-attn imports); 4 experts kernels (those model.experts_implementation
accepts; the others transformers registers are listed with why they are not measured) at Mixtral-8x7B,
Qwen3-30B-A3B and gpt-oss-20b layer shapes, 2 layers, seq 4096, batch 1, bf16, gradient checkpointing,
attention LoRA: loss difference to eager, steady-state tokens/s, MFU (scripts/bench_train.py's 4 x N
FLOP count), peak memory; 5 QLoRA 4-bit against bf16 LoRA on the 2-layer full-width Mixtral (peak
memory, loss after 10 steps); 6 DeepSpeed ZeRO-2 through ``NUM_GPUS=1 bash train.sh`` for 10 steps;
7 expert LoRA and ESFT tokens/s beside attention LoRA at the Mixtral shape.
8 `moetune plan`'s memory beside torch.cuda.max_memory_allocated at Mixtral-8x7B layer shapes, micro-batches 1, 2, 4.

Run it as a script (a fresh interpreter): each stage runs in a process of its own, forked from one that
has run no torch op, so no OpenMP or CUDA state crosses a fork, with a share of ``--budget`` (470 s),
so a crash, a hang or an out-of-memory in one never stops the next. ``gpu_report.json`` and
``gpu_report.md`` are rewritten in ``--out`` before and after every stage, and every stage's output is
appended to ``gpu_check.log`` there, so a run cut short still leaves what it measured. A stage is
FAILED with the first lines of its error; variants within a stage (one kernel, one attention kernel)
fail on their own.

On a GPU machine with no package index: here, ``python scripts/gpu_check.py --download-wheels .whl``
(scripts/gpu_check_wheels.py lists what it fetches and why); copy the repository with ``.whl`` there,
and from its root run

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --out DIR

then bring DIR back, and rerun failed stages with ``--stages``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# The modules beside this script, found as Python finds a script's neighbours (its folder leads sys.path).
from gpu_check_harness import Stage, run_stages
from gpu_check_kernels import stage_experts_kernels, stage_packed_rows
from gpu_check_plan import stage_plan_memory
from gpu_check_report import markdown
from gpu_check_stages import stage_deepspeed, stage_environment, stage_expert_training, stage_qlora, stage_quickstart
from gpu_check_wheels import download_wheels

STAGES = [
    Stage(1, "environment", stage_environment, 45),
    Stage(2, "quickstart on CUDA, bf16", stage_quickstart, 75),
    Stage(3, "packed rows are exact", stage_packed_rows, 45),
    Stage(4, "experts kernels at real shapes", stage_experts_kernels, 220),
    Stage(5, "QLoRA 4-bit vs bf16 LoRA", stage_qlora, 110),
    Stage(6, "DeepSpeed ZeRO-2 through train.sh", stage_deepspeed, 100),
    Stage(7, "expert LoRA and ESFT tokens/s", stage_expert_training, 30),
    Stage(8, "plan vs max_memory_allocated", stage_plan_memory, 60),
]
"""The check, in order; the last number is a stage's cap on CUDA in seconds (its share of --budget at most)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for gpu_report.json, gpu_report.md and gpu_check.log")
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on CPU; CUDA-only stages are skipped")
    parser.add_argument("--stages", help="comma-separated stage numbers (default: all)")
    parser.add_argument("--budget", type=float, default=470, help="seconds for all stages together (default 470)")
    parser.add_argument("--download-wheels", type=Path, metavar="DIR", help="fetch the wheels a GPU machine needs, then exit")
    args = parser.parse_args(argv)
    if args.download_wheels:
        download_wheels(args.download_wheels)
        return 0
    if args.out is None:
        parser.error("--out DIR is required")
    chosen = {int(n) for n in args.stages.split(",")} if args.stages else {s.number for s in STAGES}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers' threads do not survive a fork
    if args.cpu:
        # Forked stages start from what is already imported: on CPU, import it once here. On CUDA nothing
        # is imported first, so no CUDA state exists before a fork.
        import peft  # noqa: F401
        import transformers.models.mixtral.modeling_mixtral  # noqa: F401

        import moetune.cli  # noqa: F401
        import moetune.train.loop  # noqa: F401
    command = " ".join(["python", "scripts/gpu_check.py", *(argv if argv is not None else sys.argv[1:])])
    report = run_stages([s for s in STAGES if s.number in chosen], args.out, args.cpu, args.budget, command)
    print("\n" + markdown(report).split("\n## ")[0])
    return 1 if any(s["status"] == "FAILED" for s in report["stages"]) else 0


if __name__ == "__main__":
    sys.exit(main())
