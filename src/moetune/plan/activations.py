"""The activations a training step keeps for backward, measured by running the model's own forward on meta
tensors (shapes, no storage, no arithmetic) and summing what autograd saves
(``torch.autograd.graph.saved_tensors_hooks``): every family's real code path, LoRA and experts
included, at the run's micro-batch and sequence length, in seconds even for 100B+ models.

What a GPU runs that the meta device cannot is stood in for:

* attention: the fused kernels (flash-attn, sdpa's flash and memory-efficient backends) keep the
  query, key, value, output and a float32 log-sum-exp per query and head, never the (T, T) scores;
  sdpa on meta tensors would pick its math backend, so it is replaced by exactly those saves. With
  ``sdpa`` (not flash-attn) transformers hands the kernel a 4-D mask for padded and packed rows, and
  then repeats the key and value heads of grouped-query attention; both copies are saved too. Eager
  attention (gpt-oss's sinks, MPT's ALiBi) runs as it is, scores included.
* experts: transformers' grouped kernel (what it picks on a GPU), whose shapes do not depend on the
  routing; on float32 weights, which the meta grouped kernel refuses, its own fallback op.
* questions to the data (is any token padding, do positions restart): answered as for one causal row
  per sequence, the shapes a flash kernel sees either way.
* mixed precision without DeepSpeed (accelerate's autocast): the matmul family casts its float32
  inputs (the LoRA factors and what PEFT casts to them) to the 16-bit dtype, as CUDA autocast does.

Each decoder layer's saves are kept apart, so gradient checkpointing (non-reentrant, one layer at a
time) is planned from the same pass: what is saved outside the layers, each layer's input hidden
states, and one layer's saves again while it is recomputed in backward. Packed rows (restarting
position ids, flattened for the flash kernels) hold the same tensors as padded rows of the same shape:
both are planned as rows of ``model.max_seq_length`` tokens.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from moetune.plan.memory import decoder_layers

# What CUDA autocast runs in 16 bits (torch.amp's "lower precision" list, the ops transformers' models call).
_LOWER_PRECISION = {F.linear, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.einsum,
                    torch.Tensor.__matmul__, torch.Tensor.matmul, torch.Tensor.mm, torch.Tensor.bmm}


@dataclass(frozen=True)
class Activations:
    """Bytes autograd keeps for backward at one micro-batch: ``outside`` the decoder layers (embedding,
    final norm, routing kept for the losses), each layer's own saves and each layer's input."""

    outside: int
    layers: tuple[int, ...]
    layer_inputs: tuple[int, ...]

    def saved(self, checkpointing: bool) -> int:
        """Bytes kept at the end of the forward pass, plus, with checkpointing, one layer's saves again
        while backward recomputes it."""
        if checkpointing:
            return self.outside + sum(self.layer_inputs) + max(self.layers, default=0)
        return self.outside + sum(self.layers)


@dataclass(frozen=True)
class ActivationPlan:
    """Activations as an affine function of the micro-batch: ``at(b) = fixed + per_row * b`` (what does
    not grow with the batch, the rotary tables, is in ``fixed``)."""

    fixed: Activations
    per_row: Activations

    def at(self, batch: int, checkpointing: bool) -> int:
        return self.fixed.saved(checkpointing) + batch * self.per_row.saved(checkpointing)


def plan_activations(model: nn.Module, seq_len: int, *, autocast_dtype: torch.dtype | None = None,
                     num_experts: int = 1, masked_sdpa: bool = False) -> ActivationPlan:
    """Activations of ``model`` (a meta model, the training plan applied) per row of ``seq_len`` tokens,
    from meta forwards at one and two rows. ``autocast_dtype``: the dtype of accelerate's autocast, when a
    run uses it (mixed precision without DeepSpeed). ``num_experts``: routed experts per MoE block.
    ``masked_sdpa``: the run's attention is sdpa, which gets a mask for padded or packed rows (the
    flash kernels take none)."""
    options = {"autocast_dtype": autocast_dtype, "num_experts": num_experts, "masked_sdpa": masked_sdpa}
    one = measure_on_meta(model, 1, seq_len, **options)
    two = measure_on_meta(model, 2, seq_len, **options)
    per_row = Activations(two.outside - one.outside, tuple(b - a for a, b in zip(one.layers, two.layers, strict=True)),
                          tuple(b - a for a, b in zip(one.layer_inputs, two.layer_inputs, strict=True)))
    fixed = Activations(one.outside - per_row.outside,
                        tuple(a - p for a, p in zip(one.layers, per_row.layers, strict=True)),
                        tuple(a - p for a, p in zip(one.layer_inputs, per_row.layer_inputs, strict=True)))
    return ActivationPlan(fixed=fixed, per_row=per_row)


def measure_on_meta(model: nn.Module, batch: int, seq_len: int, *, autocast_dtype: torch.dtype | None = None,
                    num_experts: int = 1, masked_sdpa: bool = False) -> Activations:
    """One training forward of ``model`` on meta tensors, (``batch``, ``seq_len``) token ids, with the
    bytes autograd saves attributed to the decoder layer that saved them."""
    with SavedBytes(model) as saved:
        forward_on_meta(model, batch, seq_len, autocast_dtype=autocast_dtype, num_experts=num_experts,
                        masked_sdpa=masked_sdpa)
    return saved.activations()


def forward_on_meta(model: nn.Module, batch: int, seq_len: int, *, autocast_dtype: torch.dtype | None = None,
                    num_experts: int = 1, masked_sdpa: bool = False, observer: TorchFunctionMode | None = None) -> None:
    """One training forward of ``model`` on meta tensors, (``batch``, ``seq_len``) token ids, the GPU kernels
    stood in for as the module doc says. ``observer``: a mode that sees every torch function the model calls
    before the stand-ins replace any (the caller's hooks and modes observe the rest)."""
    inputs = {"input_ids": torch.zeros(batch, seq_len, dtype=torch.long, device="meta"), "use_cache": False}
    if "logits_to_keep" in inspect.signature(_innermost(model).forward).parameters:
        inputs["logits_to_keep"] = 1  # the chunked LM loss takes the hidden states (its memory: moetune.plan.loss)
    with (_MetaKernels(autocast_dtype, 1 / num_experts, masked_sdpa), observer or contextlib.nullcontext(),
          torch.enable_grad(), mock.patch.object(torch, "autocast", _autocast_off_on_meta)):
        model.train()
        model(**inputs)


_AUTOCAST = torch.autocast


def _autocast_off_on_meta(device_type, *args, **kwargs):
    # PEFT's expert LoRA turns autocast off around its weight fold, for the weight's device type; torch has
    # no autocast for "meta", and nothing there to turn off.
    return contextlib.nullcontext() if device_type == "meta" else _AUTOCAST(device_type, *args, **kwargs)


class SavedBytes:
    """Within a ``with``: the bytes of every distinct storage autograd saves for backward (parameters
    left out), per decoder layer of ``model`` and outside them, and each layer's input hidden states."""

    def __init__(self, model: nn.Module):
        self.layers = decoder_layers(model)
        self.params = {p.untyped_storage()._cdata for p in model.parameters()}
        self.seen: set[int] = set()
        # Every saved tensor stays referenced until the pass ends, so a storage freed mid-forward (a branch whose
        # result is dropped) cannot hand its address to a later one, which would then pass as seen. On the meta
        # device this holds no memory.
        self.alive: list[torch.Tensor] = []
        self.outside = 0
        self.per_layer = [0] * len(self.layers)
        self.inputs = [0] * len(self.layers)
        self.current: int | None = None
        self._handles: list = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def __enter__(self) -> SavedBytes:
        for index, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._enter_layer(index), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._leave_layer))
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()

    def activations(self) -> Activations:
        return Activations(self.outside, tuple(self.per_layer), tuple(self.inputs))

    def _enter_layer(self, index: int):
        def hook(module, args, kwargs):
            self.current = index
            hidden = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hidden, torch.Tensor):
                self.inputs[index] = hidden.untyped_storage().nbytes()
        return hook

    def _leave_layer(self, module, args, output) -> None:
        self.current = None

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.alive.append(tensor)
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self.params and key not in self.seen:
            self.seen.add(key)
            if self.current is None:
                self.outside += storage.nbytes()
            else:
                self.per_layer[self.current] += storage.nbytes()
        return tensor


class _AttentionSaves(torch.autograd.Function):
    """What a fused attention kernel keeps for backward: query, key, value, the mask when there is one,
    the output and a float32 log-sum-exp per query and head. The output is laid out in memory as the
    query is (flash-attn's ``empty_like``): (batch, tokens, heads, dim) after the usual projection and
    transpose, which makes the transpose back free; (batch, heads, tokens, dim) when the query was
    rebuilt contiguous (partial rotary embeddings), which costs the copy the model then makes."""

    @staticmethod
    def forward(ctx, query, key, value, mask):
        batch, heads, tokens, _ = query.shape
        if query.is_contiguous():
            out = query.new_empty(batch, heads, tokens, value.shape[-1])
        else:
            out = query.new_empty(batch, tokens, heads, value.shape[-1]).transpose(1, 2)
        lse = query.new_empty(batch, heads, tokens, dtype=torch.float32)
        ctx.save_for_backward(query, key, value, mask, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the plan does not go backward
        raise NotImplementedError


class _GroupedMmSaves(torch.autograd.Function):
    """What ``grouped_mm`` keeps for backward: the input when the weight needs a gradient, the weight when
    the input does (autograd saves only what a wanted gradient needs), and the group offsets."""

    @staticmethod
    def forward(ctx, input, weight, offs):
        ctx.save_for_backward(input if weight.requires_grad else None, weight if input.requires_grad else None, offs)
        return input.new_empty(input.shape[0], weight.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError


class _MetaKernels(TorchFunctionMode):
    """The GPU kernels' saves on meta tensors (see the module doc)."""

    def __init__(self, autocast_dtype: torch.dtype | None, routed_share: float, masked: bool):
        super().__init__()
        self.autocast_dtype = autocast_dtype
        self.routed_share = routed_share
        self.masked = masked

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__bool__ and args[0].is_meta:
            # transformers' mask code asks the data whether rows are padded or packed; a meta tensor has
            # none, and the answer that keeps one causal row per sequence ("all ones", "no restart") is True.
            return True
        if func in (torch.where, torch.nonzero, torch.Tensor.nonzero) and args[0].is_meta and len(args) == 1:
            # A loop over per-expert modules (upcycled MPT) picks each expert's tokens: with balanced
            # routing, 1 / num_experts of the (tokens, top_k) choices.
            condition = args[0]
            found = round(condition.numel() * self.routed_share)
            index = torch.empty(found, condition.dim(), dtype=torch.long, device="meta")
            return index if func is not torch.where else tuple(index.unbind(1))
        if func is F.scaled_dot_product_attention:
            query, key, value = args[:3]
            if self.autocast_dtype is not None:
                query, key, value = (_lower(t, self.autocast_dtype) for t in (query, key, value))
            mask = None
            if self.masked:
                # transformers gives sdpa a 4-D mask for padded or packed rows, and then repeats the key and
                # value heads for grouped-query attention (repeat_kv); the kernel converts the boolean mask
                # to the query's dtype and keeps that copy.
                groups = query.shape[1] // key.shape[1]
                key, value = (t.repeat_interleave(groups, dim=1) if groups > 1 else t for t in (key, value))
                mask = query.new_empty(query.shape[0], 1, query.shape[2], key.shape[2])
            return _AttentionSaves.apply(query, key, value, mask)
        if func in (getattr(F, "grouped_mm", None), getattr(torch, "_grouped_mm", None)) and args[1].dtype != torch.bfloat16:
            # The meta grouped kernel takes bf16 only; the CPU and GPU kernels save the same three tensors.
            return _GroupedMmSaves.apply(args[0], args[1], kwargs.get("offs", args[2] if len(args) > 2 else None))
        if self.autocast_dtype is not None and func in _LOWER_PRECISION:
            args = tuple(_lower(a, self.autocast_dtype) for a in args)
        return func(*args, **kwargs)


def _lower(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
        return value.to(dtype)
    return value


def _innermost(model: nn.Module) -> nn.Module:
    from moetune.models.layout import innermost_model

    return innermost_model(model)

