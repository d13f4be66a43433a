"""Model FLOPs of a training step, and what they take at a stated MFU.

Per token, every weight a token goes through costs 2 FLOPs per parameter forward and 2 for the gradient
of its input in backward: 4N for frozen weights; a weight that trains costs 2 more for its own gradient:
6N (the counts of PaLM's MFU, Chowdhery et al. 2022, appendix B, with the frozen part of a LoRA run at
4N). Routed experts count the top_k / num_experts share a token uses (all of them where the family
multiplies every token by every expert, Llama 4); the input embedding is a lookup and counts nothing.
LoRA factors train (6N); PEFT's LoRA on fused expert weights folds ``W + B A`` into the weight once per
micro-batch (its FLOPs are per micro-batch) and the folded weight then gets a gradient like a trained
one. The input-gradient FLOPs assume what a run with gradient checkpointing does (PEFT then makes the
embeddings' output require grad): every layer's.

Token mixing adds the products taken between activations, not weights: attention's scores and weighted
values (2 x heads x tokens x (qk dim + v dim) forward per token and layer, over every key of the row, as
the kernels and torch's FlopCounterMode count them, a causal mask's skipped half and sliding windows
included), linear attention's chunked products (Gated DeltaNet, Kimi Delta Attention) and an SSM's scan
(Mamba-2). They are measured, not modelled: one forward of the planned model on meta tensors
(:func:`moetune.plan.activations.forward_on_meta`) counts every such product in the decoder layers outside
the routed experts, 2 FLOPs per multiply-add, and backward adds the same again for each of its inputs that
needs a gradient.

Gradient checkpointing recomputes the forward (2N more) on the hardware, which MFU, by its definition,
does not count: steps per hour at an MFU come from model FLOPs. A preference objective's extra forward
passes without gradients (DPO's and KTO's reference on every row unless precomputed, KTO's policy and
reference on its KL rows) are work the step cannot skip: each adds the forward's 2 FLOPs per weight a token
uses plus the token mixing's forward, counted in ``reference_per_token``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from moetune.models.layout import EXPERTS_NAME, find_moe_blocks, is_expert_parameter
from moetune.plan.activations import forward_on_meta
from moetune.plan.memory import decoder_layers

HOUR = 3600


@dataclass(frozen=True)
class Flops:
    """Model FLOPs: ``per_token`` (weights, and token mixing: attention, linear attention, SSM scans, at the
    planned row length) and ``per_micro_batch``
    (expert LoRA's weight folds)."""

    weights_per_token: float
    attention_per_token: float
    per_micro_batch: float = 0.0
    reference_per_token: float = 0.0

    @property
    def per_token(self) -> float:
        return self.weights_per_token + self.attention_per_token + self.reference_per_token

    def step(self, tokens: int, micro_batches: int = 1) -> float:
        """FLOPs of ``tokens`` tokens in ``micro_batches`` forward/backward passes."""
        return self.per_token * tokens + self.per_micro_batch * micro_batches


def model_flops(model: nn.Module, family, seq_len: int, routed_share: float, extra_forwards: float = 0.0) -> Flops:
    """FLOPs of ``model`` (the planned model on the meta device, training plan applied; ``family`` its
    FamilySpec) per token of rows ``seq_len`` long. ``routed_share``: the share of each MoE block's routed
    experts a token's compute goes through (:attr:`moetune.plan.model.PlannedModel.routed_share`).
    ``extra_forwards``: forward passes without gradients per trained forward (a preference objective's
    reference)."""
    from moetune.models.layout import innermost_model

    inner = innermost_model(model)
    embedding = inner.get_input_embeddings().weight
    output = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if output is not None and output.weight is embedding:  # tied: the matrix is also the lm_head, a matmul
        embedding = None
    folded, fold_flops = _folded_expert_weights(model)
    weights = forward = 0.0
    for name, param in model.named_parameters():
        if param.dim() < 2 or param is embedding or _not_a_matmul_weight(name, param, folded):
            continue
        share = routed_share if is_expert_parameter(name) else 1.0
        trains = param.requires_grad or id(param) in folded or _selected_experts_train(model, name)
        weights += (6 if trains else 4) * param.numel() * share
        forward += 2 * param.numel() * share
    mixing, mixing_forward = token_mixing_flops(model, family, seq_len)
    return Flops(weights_per_token=weights, attention_per_token=mixing, per_micro_batch=fold_flops,
                 reference_per_token=extra_forwards * (forward + mixing_forward))


def token_mixing_flops(model: nn.Module, family, seq_len: int) -> tuple[float, float]:
    """FLOPs per token of the products the decoder layers take between activations (attention, linear
    attention, SSM scans), measured on a meta forward of one row of ``seq_len`` tokens: forward and backward,
    and the forward alone."""
    products = _ActivationProducts(model, family)
    with products.watching():
        forward_on_meta(model, 1, seq_len, observer=products)
    return products.flops / seq_len, products.forward_flops / seq_len


# The products torch's FlopCounterMode counts (matmul, mm, bmm, addmm, baddbmm, einsum, linear, sdpa), as the
# model code calls them.
_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.mm,
            torch.Tensor.mm, torch.bmm, torch.Tensor.bmm}
_ADD_MATMULS = {torch.addmm, torch.Tensor.addmm, torch.baddbmm, torch.Tensor.baddbmm}


class _ActivationProducts(TorchFunctionMode):
    """Within :meth:`watching`: the FLOPs (forward and backward) of every product between activations taken in
    a decoder layer outside its routed experts (whose weights ESFT rebuilds from parameters); a product with a
    parameter (a view of one included) is a weight's, which :func:`model_flops` counts per parameter."""

    def __init__(self, model: nn.Module, family):
        super().__init__()
        self.model = model
        self.params = {p.untyped_storage()._cdata for p in model.parameters()}
        self.layers = decoder_layers(model)
        self.experts = [getattr(block.module, EXPERTS_NAME) for block in find_moe_blocks(model, family.router_name)]
        self.depth = {"layer": 0, "experts": 0}
        self.flops = 0.0
        self.forward_flops = 0.0

    def watching(self):
        import contextlib

        from moetune.models.layout import innermost_model

        stack = contextlib.ExitStack()
        for kind, modules in (("layer", self.layers), ("experts", self.experts)):
            for module in modules:
                stack.callback(module.register_forward_pre_hook(self._enter(kind)).remove)
                stack.callback(module.register_forward_hook(self._leave(kind)).remove)
        # A run with gradient checkpointing computes every layer's input gradient (see the module doc).
        embeddings = innermost_model(self.model).get_input_embeddings()
        stack.callback(embeddings.register_forward_hook(
            lambda module, args, out: out if out.requires_grad else out.detach().requires_grad_()).remove)
        return stack

    def _enter(self, kind: str):
        def hook(module, args):
            self.depth[kind] += 1
        return hook

    def _leave(self, kind: str):
        def hook(module, args, output):
            self.depth[kind] -= 1
        return hook

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self.depth["layer"] and not self.depth["experts"]:
            forward, total = self._product_flops(func, args, kwargs, result)
            self.forward_flops += forward
            self.flops += total
        return result

    def _product_flops(self, func, args, kwargs, result) -> tuple[float, float]:
        """(forward, forward and backward) FLOPs of one call; nothing for a call that is no such product."""
        if func is F.scaled_dot_product_attention:
            query, key, value = args[:3]
            scores = 2 * query.shape[:-1].numel() * key.shape[-2]
            keys_need_grad = query.requires_grad or key.requires_grad
            forward = scores * (query.shape[-1] + value.shape[-1])
            return forward, (scores * query.shape[-1] * (1 + query.requires_grad + key.requires_grad)
                             + scores * value.shape[-1] * (1 + keys_need_grad + value.requires_grad))
        if func in _MATMULS:
            return self._product(args[0], args[1], 2 * result.numel() * args[0].shape[-1])
        if func in _ADD_MATMULS:
            return self._product(args[1], args[2], 2 * result.numel() * args[1].shape[-1])
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            return self._product(args[0], weight, 2 * result.numel() * weight.shape[-1])
        if func is torch.einsum:
            equation, *operands = args
            operands = operands[0] if len(operands) == 1 and isinstance(operands[0], (list, tuple)) else operands
            if len(operands) == 2:
                return self._product(*operands, 2 * _einsum_multiply_adds(equation, operands))
        return 0.0, 0.0

    def _product(self, left, right, forward: float) -> tuple[float, float]:
        tensors = [t for t in (left, right) if isinstance(t, torch.Tensor)]
        if any(t.untyped_storage()._cdata in self.params for t in tensors):
            return 0.0, 0.0
        return forward, forward * (1 + sum(t.requires_grad for t in tensors))


def _einsum_multiply_adds(equation: str, operands) -> int:
    """Multiply-adds of a two-operand einsum: the product of the sizes of every index it names."""
    inputs = equation.replace(" ", "").split("->")[0].split(",")
    sizes = {}
    for letters, operand in zip(inputs, operands, strict=True):
        if "..." in letters:
            before, after = letters.split("...")
            batch = operand.dim() - len(before) - len(after)
            sizes.update({f"...{i}": operand.shape[len(before) + i] for i in range(batch)})
            letters = before + after
            shape = operand.shape[:len(before)] + operand.shape[operand.dim() - len(after):]
        else:
            shape = operand.shape
        sizes.update(zip(letters, shape, strict=True))
    return math.prod(sizes.values())


def steps_per_hour(flops: Flops, *, tokens_per_step: int, micro_batches_per_step: int, gpus: int,
                   peak_flops: float, mfu: float) -> float:
    """Optimizer steps per hour on ``gpus`` GPUs of ``peak_flops`` each at model-FLOPs utilisation ``mfu``."""
    step = flops.step(tokens_per_step, micro_batches_per_step)
    return HOUR * gpus * peak_flops * mfu / step


def _folded_expert_weights(model: nn.Module) -> tuple[set[int], float]:
    """PEFT's LoRA on fused expert parameters (``lora.ParamWrapper``): the ids of the weights it folds into,
    and the fold's FLOPs per micro-batch (``W + B A`` per expert: 2 x numel x r, forward and backward)."""
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:
        return set(), 0.0
    folded: set[int] = set()
    flops = 0.0
    for module in model.modules():
        if isinstance(module, ParamWrapper):
            weight = module.get_param()
            folded.add(id(weight))
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    rank = module.r[adapter]
                    flops += 3 * 2 * weight.numel() * rank
                    folded |= {id(module.lora_A[adapter].weight), id(module.lora_B[adapter].weight)}
    return folded, flops


def _not_a_matmul_weight(name: str, param, folded: set[int]) -> bool:
    # PEFT's frozen original beside a trained copy (modules_to_save) does not run; ESFT's trainable slices
    # are written into the fused weight, which is what multiplies; expert LoRA factors are folded.
    if "original_module." in name or name.endswith(".selected"):
        return True
    return id(param) in folded and ("lora_A" in name or "lora_B" in name)


def _selected_experts_train(model: nn.Module, name: str) -> bool:
    """ESFT: a fused expert weight (``parametrizations.<p>.original``) gets a gradient when its selected
    slices train."""
    if not name.endswith(".original"):
        return False
    prefix = name.removesuffix(".original")
    return any(other.startswith(prefix + ".") and other.endswith(".selected") and p.requires_grad
               for other, p in model.named_parameters())
