"""Model-state memory per GPU: the weights as a run holds them, the gradients of what trains and the
optimizer's states, sharded or offloaded as the launch says (:class:`moetune.plan.launch.Launch`).

One process or DDP: every tensor as the built model holds it (bf16 base, float32 LoRA factors as PEFT
makes them, the router copies PEFT saves); gradients in each parameter's dtype; torch's AdamW keeps two
states in the parameter's dtype plus a float32 step count per tensor. These equal the real tensors'
bytes exactly (tests/plan/test_model_states.py). DDP adds one more copy of the gradients (its buckets).

DeepSpeed casts the model to the mixed-precision dtype and keeps, for what trains, a float32 master
copy, float32 gradients and the two Adam moments: per trainable parameter 2 bytes of 16-bit weight,
2 of 16-bit gradient and 16 of float32 states, as DeepSpeed's own estimators count them
(``estimate_zero2_model_states_mem_needs``: "2_grads_16bit + 4_grads_32bit + 4_params_32bit +
8_optimizer_states_32bit"). ZeRO-1 splits the float32 states over the processes, ZeRO-2 the gradients
too, ZeRO-3 every weight, frozen ones included, plus twice the largest layer gathered whole
(``estimate_zero3_model_states_mem_needs``' ``4 * largest_layer_params``). FSDP is planned as
ZeRO-3 in the model's own dtypes. Offloaded states move to CPU memory.

Weights that bitsandbytes stores in 4 bits (NF4, blocks of 64, double quantisation, as moetune asks):
half a byte per weight, one byte of quantised absmax per block, a float32 absmax per 256 blocks and the
two code books; in 8 bits: a byte per weight and a float32 scale per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from moetune.plan.launch import Launch

NF4_BLOCK, NESTED_BLOCK = 64, 256
# bitsandbytes' quant state per 4-bit tensor: the NF4 code (16 float32), the nested code (256 float32)
# and the nested offset (one float32).
NF4_CODE_BYTES = 16 * 4 + 256 * 4 + 4
STEP_BYTES = 4  # torch's AdamW keeps each tensor's step count as a float32 tensor


@dataclass(frozen=True)
class ModelStates:
    """Bytes per GPU. ``weights``: every parameter and buffer (``trainable`` of it trains); ``gathered``:
    ZeRO-3 / FSDP layers gathered whole while they run; ``cpu``: what is offloaded to CPU memory."""

    weights: int
    trainable: int
    gradients: int
    optimizer: int
    gathered: int = 0
    cpu: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.gathered


def stored_bytes(param: torch.Tensor, bits: int | None = None, dtype: torch.dtype | None = None) -> int:
    """Bytes ``param`` takes as the run stores it: in ``bits`` when bitsandbytes quantises it, else in
    ``dtype`` (DeepSpeed's mixed precision) or its own dtype."""
    count = param.numel()
    if bits == 4:
        blocks = math.ceil(count / NF4_BLOCK)
        return math.ceil(count / 2) + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + NF4_CODE_BYTES
    if bits == 8:
        return count + 4 * param.shape[0]
    if dtype is not None and param.is_floating_point():
        return count * dtype.itemsize
    return count * param.element_size()


def optimizer_state_bytes(param: torch.Tensor, optim: str) -> int:
    """Bytes of the optimizer's state for one trainable tensor (moetune's ``training.optim``)."""
    size = param.numel() * param.element_size()
    if optim in ("adamw_torch", "adamw_torch_fused"):
        return 2 * size + STEP_BYTES
    if optim == "sgd":
        return size  # the momentum buffer
    if optim == "adafactor":
        # transformers' Adafactor without beta1: factored second moments for 2-D and up, and the
        # weight's RMS as a float32 scalar tensor.
        if param.dim() >= 2:
            shape = param.shape
            return (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]) * param.element_size() + 4
        return size + 4
    if optim == "adamw_8bit":  # bitsandbytes: 8-bit states in blocks of 256 from 4,096 elements on, else 32-bit
        if param.numel() >= 4096:
            return 2 * (param.numel() + 4 * math.ceil(param.numel() / 256) + 256 * 4)
        return 2 * param.numel() * 4
    raise ValueError(f"unknown optimizer {optim!r}")


def model_states(model: nn.Module, launch: Launch, optim: str, *, quantized: dict[int, int] | None = None,
                 precision: str = "no") -> ModelStates:
    """Model-state bytes per GPU of ``model`` (the planned model, the training plan applied) under ``launch``.
    ``precision``: "bf16" / "fp16" / "no" (``training.bf16`` / ``fp16``); ``quantized``: id -> bits."""
    quantized = quantized or {}
    params = list({id(p): p for p in model.parameters()}.values())  # tied weights once
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = [p for p in params if p.requires_grad]
    if launch.engine == "deepspeed":
        return _deepspeed(model, params, trainable, buffers, launch, quantized, precision)
    weights = buffers + sum(stored_bytes(p, quantized.get(id(p))) for p in params)
    trained = sum(stored_bytes(p) for p in trainable)
    optimizer = sum(optimizer_state_bytes(p, optim) for p in trainable)
    if launch.engine == "fsdp":
        shards = launch.processes
        largest = max((sum(stored_bytes(p) for p in layer.parameters()) for layer in decoder_layers(model)), default=0)
        states = ModelStates(weights=weights // shards, trainable=trained // shards, gradients=trained // shards,
                             optimizer=optimizer // shards, gathered=largest)
        if launch.offload_params:
            return ModelStates(weights=buffers, trainable=0, gradients=0, optimizer=0, gathered=largest,
                               cpu=states.weights + states.gradients + states.optimizer)
        return states
    gradients = trained * (2 if launch.engine == "ddp" else 1)  # DDP reduces through buckets holding a copy
    return ModelStates(weights=weights, trainable=trained, gradients=gradients, optimizer=optimizer)


def _deepspeed(model, params, trainable, buffers: int, launch: Launch, quantized, precision: str) -> ModelStates:
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    shards = launch.processes
    weights = sum(stored_bytes(p, quantized.get(id(p)), low) for p in params)
    trained_count = sum(p.numel() for p in trainable)
    trained = sum(stored_bytes(p, None, low) for p in trainable)
    # 16-bit gradients; float32 master weights and gradients and two Adam moments (16 bytes) with mixed
    # precision, only the moments (8) when the weights themselves are float32.
    states = trained_count * (16 if low is not None else 8)
    gradients = trained if launch.zero_stage < 2 else trained // shards
    optimizer = states if launch.zero_stage < 1 else states // shards
    gathered = 0
    if launch.zero_stage >= 3:
        gathered = 2 * max((sum(stored_bytes(p, None, low) for p in layer.parameters()) for layer in
                            decoder_layers(model)), default=0)
        weights //= shards
        trained //= shards
    cpu = 0
    if launch.offload_optimizer:
        cpu += optimizer
        optimizer = 0
        if launch.zero_stage == 2:  # the gradient partition is kept beside the states, in CPU memory
            cpu += gradients
            gradients = 0
    if launch.offload_params and launch.zero_stage >= 3:
        cpu += weights
        weights = 0
    return ModelStates(weights=weights + buffers, trainable=trained, gradients=gradients, optimizer=optimizer,
                       gathered=gathered, cpu=cpu)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the modules of its ``_no_split_modules`` classes (what FSDP wraps and
    ZeRO-3 gathers one at a time)."""
    from moetune.models.layout import innermost_model

    names = set(getattr(innermost_model(model), "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]
