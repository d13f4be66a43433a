"""``make_plan``: the parameters, memory per GPU, verdict and compute of a run, and the report ``moetune plan``
prints (text or JSON). ``moetune train``'s pre-check (:mod:`moetune.train.plan_check`) asks the same plan.

Memory per GPU = model states (:mod:`moetune.plan.memory`) + activations at the micro-batch
(:mod:`moetune.plan.activations`) + the LM loss (:mod:`moetune.plan.loss`) + the allowance: 1 GiB for the
CUDA context and the cuBLAS / NCCL workspaces, DeepSpeed's gradient and parameter buckets, and 5% of the
rest for the caching allocator's fragmentation. Everything but the allowance is memory torch allocates, what
``torch.cuda.max_memory_allocated`` reports (scripts/gpu_check_plan.py compares the two).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moetune.plan.activations import ActivationPlan, plan_activations
from moetune.plan.compute import Flops, model_flops, steps_per_hour
from moetune.plan.gpus import GIB, Gpu
from moetune.plan.launch import Launch
from moetune.plan.loss import LossMemory, loss_memory
from moetune.plan.memory import ModelStates, model_states
from moetune.plan.model import PlannedModel, build_planned_model
from moetune.plan.params import ParameterCounts

ALLOWANCE_FIXED = 1 * GIB
ALLOWANCE_SHARE = 0.05
DEFAULT_MFU = 0.30
DEEPSPEED_ALLGATHER_DEFAULT = 500_000_000  # DeepSpeed's allgather_bucket_size default (elements)


@dataclass
class Plan:
    """Everything ``moetune plan`` reports. Bytes are per GPU."""

    model_name: str
    family: str
    dtype: str
    counts: ParameterCounts
    launch: Launch
    gpu: Gpu | None
    states: ModelStates
    activations: ActivationPlan
    loss: LossMemory
    buckets: int
    checkpointing: bool
    batch: int
    seq_len: int
    accumulation: int
    flops: Flops
    mfu: float
    mfu_source: str
    remedies: list[str] = field(default_factory=list)
    rows_per_sample: int = 1
    """Rows a sample of the micro-batch becomes: 2 for a pair (chosen and rejected in one forward), else 1."""
    reference: int = 0
    """Bytes of a frozen reference copy (DPO/KTO without an adapter and without precomputed log-probabilities)."""

    def allocated(self, batch: int | None = None, checkpointing: bool | None = None) -> int:
        """Bytes torch allocates at the peak: model states, a reference copy, activations and the loss at ``batch``
        samples (``batch x rows_per_sample`` rows)."""
        batch = self.batch if batch is None else batch
        checkpointing = self.checkpointing if checkpointing is None else checkpointing
        rows = batch * self.rows_per_sample
        return self.states.total + self.reference + self.activations.at(rows, checkpointing) + self.loss.at(rows)

    def allowance(self, batch: int | None = None) -> int:
        return ALLOWANCE_FIXED + self.buckets + math.ceil(ALLOWANCE_SHARE * self.allocated(batch))

    def total(self, batch: int | None = None, checkpointing: bool | None = None) -> int:
        batch = self.batch if batch is None else batch
        allocated = self.allocated(batch, checkpointing)
        return allocated + ALLOWANCE_FIXED + self.buckets + math.ceil(ALLOWANCE_SHARE * allocated)

    @property
    def fits(self) -> bool | None:
        return None if self.gpu is None else self.total() <= self.gpu.memory

    def largest_batch(self, checkpointing: bool | None = None) -> int:
        """The most rows per micro-batch whose total fits the GPU (0: not even one)."""
        if self.gpu is None:
            return 0
        batch = 0
        while batch < 4096 and self.total(batch + 1, checkpointing) <= self.gpu.memory:
            batch += 1
        return batch

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.rows_per_sample * self.seq_len * self.accumulation * self.launch.processes

    def steps_per_hour(self) -> float | None:
        if self.gpu is None or self.gpu.peak_flops is None:
            return None
        return steps_per_hour(self.flops, tokens_per_step=self.tokens_per_step, micro_batches_per_step=self.accumulation,
                              gpus=self.launch.processes, peak_flops=self.gpu.peak_flops, mfu=self.mfu)


def make_plan(config, *, model_config: str | Path | None = None, launch: Launch, gpu: Gpu | None,
              mfu: float | None = None, remedies: bool = True) -> Plan:
    """The plan of ``config`` under ``launch`` on ``gpu`` (None: no verdict). ``model_config``: a config.json
    to read instead of the model's own (``--model-config``)."""
    planned = build_planned_model(config, model_config)
    plan = _plan(config, planned, launch, gpu, mfu)
    if remedies and plan.fits is False:
        plan.remedies = what_would_fit(config, planned, plan, model_config)
    return plan


def _plan(config, planned: PlannedModel, launch: Launch, gpu: Gpu | None, mfu: float | None,
          seq_len: int | None = None) -> Plan:
    t = config.training
    precision = "bf16" if t.bf16 else "fp16" if t.fp16 else "no"
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    seq_len = seq_len or config.model.max_seq_length
    states = model_states(planned.model, launch, t.optim, quantized=planned.quantized, precision=precision)
    deepspeed = launch.engine == "deepspeed"
    if deepspeed and low is not None:  # the engine runs the whole model in the 16-bit dtype
        planned.model.to(low)
    blocks = planned.counts.blocks
    activations = plan_activations(planned.model, seq_len, num_experts=blocks[0].num_experts if blocks else 1,
                                   autocast_dtype=None if deepspeed else low,
                                   masked_sdpa=config.model.attn_implementation == "sdpa"
                                   and planned.attn_implementation == "sdpa")
    text = planned.hf_config.get_text_config()
    compute_bytes = low.itemsize if low is not None else planned.dtype.itemsize
    head = planned.base.get_output_embeddings()
    loss = loss_memory(tokens_per_row=seq_len, hidden=text.hidden_size if hasattr(text, "hidden_size") else text.d_model,
                       vocab=text.vocab_size, compute_bytes=compute_bytes, chunked=not launch.shards_parameters,
                       lm_head_trains=head is not None and any(p.requires_grad for p in planned.model.parameters()
                                                               if p is head.weight),
                       softcap=getattr(text, "final_logit_softcapping", None) is not None)
    measured = mfu is not None
    rows, extra_forwards, reference = preference_costs(t, planned.model, states.weights)
    return Plan(
        model_name=config.model.name, family=planned.family.name, dtype=str(planned.dtype).removeprefix("torch."),
        counts=planned.counts, launch=launch, gpu=gpu, states=states, activations=activations, loss=loss,
        buckets=_deepspeed_buckets(launch, planned, text, compute_bytes), checkpointing=t.gradient_checkpointing,
        batch=t.per_device_train_batch_size, seq_len=seq_len, accumulation=t.gradient_accumulation_steps,
        flops=model_flops(planned.model, planned.family, seq_len, planned.routed_share, extra_forwards),
        mfu=mfu if measured else DEFAULT_MFU,
        mfu_source="given with --mfu" if measured else "assumed; scripts/gpu_check.py measures it on a GPU",
        rows_per_sample=rows, reference=reference)


def preference_costs(training, model, weight_bytes: int) -> tuple[int, float, int]:
    """What ``training.objective`` adds to a step: (rows per sample, forward passes without gradients per trained
    row, bytes of a frozen reference copy). A pair is two rows; DPO's and KTO's reference runs a forward unless its
    log-probabilities are precomputed, and is a copy of the weights when no adapter trains; KTO also runs the policy
    and the reference on its KL rows."""
    from moetune.models.loss.preference import PAIRED_OBJECTIVES, REFERENCE_OBJECTIVES
    from moetune.models.loss.reference import has_adapter

    objective = training.objective
    rows = 2 if objective in PAIRED_OBJECTIVES else 1
    live_reference = objective in REFERENCE_OBJECTIVES and not training.precompute_ref_logps
    forwards = float(live_reference) + (1.0 + live_reference if objective == "kto" else 0.0)
    copy = weight_bytes if live_reference and not has_adapter(model) else 0
    return rows, forwards, copy


def _deepspeed_buckets(launch: Launch, planned: PlannedModel, text, compute_bytes: int) -> int:
    if launch.engine != "deepspeed" or launch.zero_stage == 0:
        return 0
    hidden = getattr(text, "hidden_size", 0)
    reduce = launch.reduce_bucket if launch.reduce_bucket is not None else hidden * hidden  # accelerate's "auto"
    trained = sum(p.numel() for p in planned.model.parameters() if p.requires_grad)
    allgather = launch.allgather_bucket if launch.allgather_bucket is not None else DEEPSPEED_ALLGATHER_DEFAULT
    return compute_bytes * (min(reduce, trained) + min(allgather, math.ceil(trained / launch.processes)))


def what_would_fit(config, planned: PlannedModel, plan: Plan, model_config=None) -> list[str]:
    """The single changes that would make ``plan`` fit at micro-batch 1, each with its planned total."""
    capacity = plan.gpu.memory
    found = []

    def gib(value: int) -> str:
        return f"{value / GIB:.1f} GiB"

    if not plan.checkpointing and plan.total(1, True) <= capacity:
        found.append(f"training.gradient_checkpointing=true: {gib(plan.total(1, True))} at micro-batch 1 "
                     f"(largest micro-batch {plan.largest_batch(True)})")
    if plan.batch > 1 and plan.total(1) <= capacity:
        found.append(f"training.per_device_train_batch_size={plan.largest_batch()} (raise gradient_accumulation_steps "
                     f"to keep the effective batch): {gib(plan.total(plan.largest_batch()))}")
    processes = max(plan.launch.processes, 2)
    for gpus in sorted({processes, 4, 8, 16}):
        if gpus < processes or planned.quantized:  # ZeRO-3 cannot partition bitsandbytes' 4-bit weights
            continue
        for offload in (False, True):
            zero3 = Launch(processes=gpus, engine="deepspeed", zero_stage=3, offload_optimizer=offload, offload_params=offload,
                           described="configs/accelerate/zero3.yaml")
            other = _with_launch(config, planned, plan, zero3)
            if other.total(1) <= capacity:
                where = f"{gpus} GPUs" if gpus != plan.launch.processes else f"the same {gpus} GPUs"
                knob = " and advanced.use_cpu_offload=true" if offload else ""
                found.append(f"DeepSpeed ZeRO-3 on {where} (configs/accelerate/zero3.yaml{knob}): {gib(other.total(1))} "
                             "at micro-batch 1")
                break
        else:
            continue
        break
    for fraction in (2, 4, 8):
        shorter = config.model.max_seq_length // fraction
        if shorter < 256:
            break
        other = _plan(config, planned, plan.launch, plan.gpu, plan.mfu, seq_len=shorter)
        if other.total(1) <= capacity:
            found.append(f"model.max_seq_length={shorter}: {gib(other.total(1))} at micro-batch 1")
            break
    notes = []
    linears = _linear_share(planned)
    why = (f"bitsandbytes quantises nn.Linear layers only, {linears:.0%} of this model's weights; the fused experts "
           "stay unquantised, in their 16-bit dtype")
    if linears < 0.5 and not planned.quantized:
        notes.append(f"(model.load_in_4bit would not help: {why})")
    elif linears < 0.5:
        plain = dataclasses.replace(config, model=dataclasses.replace(config.model, load_in_4bit=False, load_in_8bit=False))
        other = make_plan(plain, model_config=model_config, launch=plan.launch, gpu=plan.gpu, mfu=plan.mfu, remedies=False)
        (found if other.total(1) <= capacity else notes).append(
            f"model.load_in_4bit=false: {gib(other.total(1))} at micro-batch 1 ({why})")
    if not found:
        found.append("nothing single fits: combine changes (shorter rows, checkpointing, ZeRO-3 with CPU offload on "
                     "more GPUs)")
    return found + notes


def _with_launch(config, planned: PlannedModel, plan: Plan, launch: Launch) -> Plan:
    t = config.training
    precision = "bf16" if t.bf16 else "fp16" if t.fp16 else "no"
    states = model_states(planned.model, launch, t.optim, quantized=planned.quantized, precision=precision)
    loss = plan.loss
    if launch.shards_parameters and loss.chunked:  # ZeRO-3 partitions the lm_head: the full logits are used
        text = planned.hf_config.get_text_config()
        loss = loss_memory(tokens_per_row=plan.seq_len, hidden=text.hidden_size, vocab=text.vocab_size,
                           compute_bytes=2 if precision != "no" else 4, chunked=False)
    return dataclasses.replace(plan, launch=launch, states=states, loss=loss, buckets=0)


def _linear_share(planned: PlannedModel) -> float:
    total = sum(p.numel() for p in planned.base.parameters())
    linear = sum(m.weight.numel() for m in planned.base.modules() if type(m) is torch.nn.Linear)
    return linear / max(total, 1)
