"""What ``moetune plan`` prints: the plan as a report (text) or as JSON, and the verb itself (:func:`run_plan`)."""

from __future__ import annotations

import json
import sys

from moetune.plan.gpus import GIB, resolve_gpu
from moetune.plan.launch import read_launch
from moetune.plan.report import ALLOWANCE_SHARE, Plan, make_plan

CONVENTIONS = {
    "active": "every parameter a token touches, the input embedding included (Mistral's and Qwen's convention)",
    "active_without_input_embedding": "without the input embedding matrix (OpenAI's and DeepSeek's convention)",
}


def run_plan(config, *, model_config: str | None = None, accelerate_config: str | None = None,
             deepspeed_config: str | None = None, gpus: int | None = None, gpu: str | None = None,
             gpu_memory: float | None = None, mfu: float | None = None, as_json: bool = False) -> int:
    """``moetune plan``: print the plan of ``config``; exit code 0 (it fits, or no GPU was named) or 1 (it
    does not fit the named GPU)."""
    if gpus is not None and gpus < 1:
        from moetune.errors import UserError

        raise UserError(f"--gpus must be at least 1, got {gpus}.")
    target = resolve_gpu(gpu, gpu_memory)
    launch = read_launch(accelerate_config, deepspeed_config, gpus, config.advanced.use_cpu_offload)
    plan = make_plan(config, model_config=model_config, launch=launch, gpu=target, mfu=mfu)
    sys.stdout.write(json.dumps(plan_as_dict(plan), indent=2) + "\n" if as_json else format_plan(plan))
    return 1 if plan.fits is False else 0


def format_plan(plan: Plan) -> str:
    """The report, one section per question: parameters, memory per GPU, verdict, compute."""
    c = plan.counts
    lines = [f"moetune plan: {plan.model_name} ({plan.family}, {plan.dtype} weights)",
             f"launch: {plan.launch.summary()}",
             f"GPU: {plan.gpu.name} ({plan.gpu.memory / GIB:.1f} GiB)" if plan.gpu else
             "GPU: none named (--gpu or --gpu-memory gives a verdict)", "", "Parameters"]
    lines.append(f"  total                      {_count(c.total)}")
    lines.append(f"  active per token           {_count(c.active)}  {CONVENTIONS['active']}")
    lines.append(f"                             {_count(c.active_without_input_embedding)}  "
                 f"{CONVENTIONS['active_without_input_embedding']}")
    parts = " | ".join(f"{part} {_count(n)}" for part, n in c.trainable.items())
    lines.append(f"  trainable                  {_count(c.trainable_total)}  ({parts})")
    checkpointing = "on" if plan.checkpointing else "off"
    pairs = " pairs (x 2 rows)" if plan.rows_per_sample == 2 else ""
    lines += ["", f"Memory per GPU at micro-batch {plan.batch}{pairs} x {plan.seq_len:,} tokens, gradient checkpointing "
                  f"{checkpointing}"]
    s = plan.states
    rows = [("weights", s.weights, ""), ("  of which trainable", s.trainable, ""),
            ("gradients", s.gradients, ""), ("optimizer states", s.optimizer, "")]
    if s.gathered:
        rows.append(("layers gathered (ZeRO-3)", s.gathered, ""))
    if plan.reference:
        rows.append(("reference copy", plan.reference, "frozen weights: no adapter to switch off"))
    batch_rows = plan.batch * plan.rows_per_sample
    other = plan.activations.at(batch_rows, not plan.checkpointing)
    rows.append(("activations", plan.activations.at(batch_rows, plan.checkpointing),
                 f"{_gib(other)} with checkpointing {'off' if plan.checkpointing else 'on'}"))
    rows.append((f"LM loss ({'chunked' if plan.loss.chunked else 'full logits'})", plan.loss.at(batch_rows), ""))
    buckets = f" + DeepSpeed buckets {_gib(plan.buckets)}" if plan.buckets else ""
    rows.append(("allowance", plan.allowance(), f"1 GiB CUDA context and workspaces{buckets} + "
                                                f"{ALLOWANCE_SHARE:.0%} fragmentation"))
    rows.append(("total", plan.total(), ""))
    lines += [f"  {name:<27}{_gib(value):>11}  {note}".rstrip() for name, value, note in rows]
    if s.cpu:
        lines.append(f"  {'in CPU memory (offloaded)':<27}{_gib(s.cpu):>11}")
    lines.append("")
    if plan.gpu is not None:
        largest = plan.largest_batch()
        if plan.fits:
            lines.append(f"Verdict: fits, {_gib(plan.gpu.memory - plan.total())} to spare; the largest micro-batch that "
                         f"fits is {largest}.")
        else:
            lines.append(f"Verdict: does NOT fit: {_gib(plan.total())} planned, {_gib(plan.gpu.memory)} on the GPU. "
                         + (f"The largest micro-batch that fits is {largest}." if largest else
                            "Not even micro-batch 1 fits. What would:"))
            lines += [f"  - {remedy}" for remedy in plan.remedies]
        lines.append("")
    f = plan.flops
    lines.append("Compute")
    reference = f"; reference forwards {f.reference_per_token / 1e9:,.1f}" if f.reference_per_token else ""
    lines.append(f"  model FLOPs per token      {f.per_token / 1e9:,.1f} GFLOP (weights {f.weights_per_token / 1e9:,.1f}: "
                 f"4 per frozen and 6 per trained parameter a token uses; token mixing (attention, linear "
                 f"attention, SSM scans) {f.attention_per_token / 1e9:,.1f}{reference})")
    per_hour = plan.steps_per_hour()
    if per_hour is not None:
        lines.append(f"  at {plan.mfu:.0%} MFU ({plan.mfu_source}): {per_hour:,.0f} optimizer steps/hour, "
                     f"{per_hour * plan.tokens_per_step / 1e6:,.0f}M tokens/hour "
                     f"({plan.tokens_per_step:,} tokens per step)")
    else:
        lines.append("  steps per hour: name a GPU with --gpu (its peak FLOP/s is needed)")
    return "\n".join(lines) + "\n"


def plan_as_dict(plan: Plan) -> dict:
    """The plan as JSON-ready values (bytes, counts, FLOPs)."""
    c, s = plan.counts, plan.states
    return {
        "model": plan.model_name, "family": plan.family, "dtype": plan.dtype,
        "launch": {"processes": plan.launch.processes, "engine": plan.launch.engine, "zero_stage": plan.launch.zero_stage,
                   "offload_optimizer": plan.launch.offload_optimizer, "offload_params": plan.launch.offload_params,
                   "source": plan.launch.described},
        "gpu": None if plan.gpu is None else {"name": plan.gpu.name, "memory_bytes": plan.gpu.memory,
                                              "peak_flops": plan.gpu.peak_flops},
        "parameters": {"total": c.total, "active": c.active,
                       "active_without_input_embedding": c.active_without_input_embedding,
                       "conventions": CONVENTIONS, "trainable": c.trainable_total, "trainable_by_part": c.trainable},
        "memory_bytes_per_gpu": {
            "micro_batch": plan.batch, "seq_len": plan.seq_len, "gradient_checkpointing": plan.checkpointing,
            "weights": s.weights, "trainable_weights": s.trainable, "gradients": s.gradients, "optimizer": s.optimizer,
            "rows_per_sample": plan.rows_per_sample, "reference_copy": plan.reference,
            "gathered_layers": s.gathered,
            "activations": plan.activations.at(plan.batch * plan.rows_per_sample, plan.checkpointing),
            "activations_other_checkpointing": plan.activations.at(plan.batch * plan.rows_per_sample, not plan.checkpointing),
            "loss": plan.loss.at(plan.batch * plan.rows_per_sample), "loss_path": "chunked" if plan.loss.chunked else "full logits",
            "allowance": plan.allowance(), "allocated": plan.allocated(), "total": plan.total(), "cpu_offloaded": s.cpu},
        "fits": plan.fits, "largest_micro_batch": plan.largest_batch() if plan.gpu else None, "remedies": plan.remedies,
        "compute": {"flops_per_token": plan.flops.per_token, "weight_flops_per_token": plan.flops.weights_per_token,
                    "attention_flops_per_token": plan.flops.attention_per_token,
                    "reference_flops_per_token": plan.flops.reference_per_token,
                    "flops_per_micro_batch": plan.flops.per_micro_batch, "mfu": plan.mfu, "mfu_source": plan.mfu_source,
                    "tokens_per_step": plan.tokens_per_step, "steps_per_hour": plan.steps_per_hour()},
    }


def _count(value: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= size:
            return f"{value / size:,.2f} {unit}"
    return f"{value:,}"


def _gib(value: int) -> str:
    return f"{value / GIB:,.2f} GiB"


