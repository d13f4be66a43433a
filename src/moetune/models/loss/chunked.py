"""Next-token cross-entropy from the final hidden states, without the full (tokens, vocab) logits.

The plain path (``lm_head(hidden)`` then ``causal_lm_loss``) holds a float32 copy of every logit and
as much again for its gradient: for a 151,936-entry vocabulary that is 2.5 GB per 4,096 tokens, the
largest single allocation of LoRA training on an MoE. Here only the positions that carry a label get
logits, a chunk of tokens at a time, and each chunk's gradients (w.r.t. the hidden states, the
lm_head weight and bias) are computed in the forward pass, as Liger Kernel's fused linear
cross-entropy does: the chunk's logits are freed before the next chunk and backward holds none.
Where Liger Kernel is installed and the tensors are on a CUDA GPU, its fused Triton kernel is used.

What sits between the hidden states and the logits in transformers 5.x MoE families:

* Mixtral, Qwen2/3-MoE, OLMoE, gpt-oss, DeepSeek-V2/V3, GLM-4-MoE, MPT: ``lm_head`` alone;
* Cohere2-MoE: ``logits * config.logit_scale``; Granite-MoE: ``logits / config.logits_scaling``;
* Gemma 4, Mistral-Large-4: ``softcap * tanh(logits / softcap)`` (``final_logit_softcapping``).

:func:`logit_options` reads those from a model config; ``chunked_causal_lm_loss(..., **logit_options(config))``
then computes the same loss as the model's own logits would give.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from moetune.data.encode import IGNORE_INDEX
from moetune.errors import UserError
from moetune.models.load.kernels import fused_linear_cross_entropy_available

CHUNKED = "chunked"
LIGER = "liger_fused_linear_cross_entropy"
IMPLEMENTATIONS = ("auto", CHUNKED, LIGER)


def chunked_causal_lm_loss(hidden_states: torch.Tensor, lm_head: nn.Module | torch.Tensor, labels: torch.Tensor, *,
                           label_smoothing: float = 0.0, chunk_tokens: int = 1024, logit_scale: float | None = None,
                           softcap: float | None = None,
                           implementation: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and the number of tokens it sums over.

    ``hidden_states`` (B, T, H): the model's final hidden states, before ``lm_head``. ``lm_head``: an
    ``nn.Linear`` (with or without bias), a PEFT ``modules_to_save`` copy of one, a PEFT LoRA-wrapped
    one (its effective weight ``W + scale * B @ A`` is used; LoRA dropout must be 0 in training), or a
    bare (V, H) weight tensor. ``labels`` (B, T), -100 where no loss is wanted; shifted here, so the
    hidden state at t is scored against ``labels[:, t + 1]``.

    Returns ``(loss_sum, loss_tokens)``: the float32 sum over non-ignored tokens of
    ``F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing, reduction="sum")`` where
    ``logits = lm_head(hidden)`` (then ``* logit_scale``, then ``softcap * tanh(logits / softcap)``),
    and an int64 count of those tokens. Divide the sum by a token count of your choosing. With no
    labelled token, both are 0 and every gradient is zero.

    Gradients reach ``hidden_states`` and, where they require grad, the lm_head weight and bias
    (frozen ones cost nothing). The logits are computed in the matmul dtype (the weight's, or the
    autocast dtype under autocast), as ``lm_head`` computes them; the softmax, scale and softcap in
    float32. ``chunk_tokens`` bounds the transient memory to one float32 chunk of logits,
    ``chunk_tokens * V * 4`` bytes (594 MiB at 1,024 x 151,936), plus half that again for its bf16
    copy with bf16/fp16 weights, and one more float32 chunk with ``softcap``. ``implementation``: "auto" (Liger's fused kernel on a CUDA
    tensor where ``liger_kernel`` is installed, else "chunked"), "chunked", or
    "liger_fused_linear_cross_entropy".

    Not supported: lm_head weights that are partitioned outside their module's forward (DeepSpeed
    ZeRO-3, FSDP, tensor-parallel DTensors: gather them first), quantised lm_heads, and LoRA variants
    (DoRA) or LoRA biases on lm_head.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if hidden_states.dim() != 3 or labels.shape != hidden_states.shape[:2]:
        raise ValueError(f"hidden_states must be (B, T, H) and labels (B, T); got {tuple(hidden_states.shape)} "
                         f"and {tuple(labels.shape)}")
    weight, bias = lm_head_weight_and_bias(lm_head)
    hidden, targets = _labelled_positions(hidden_states, labels.to(hidden_states.device))
    loss_tokens = torch.tensor(targets.numel(), dtype=torch.int64, device=hidden.device)

    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = weight.dtype
    # Casting here, outside the autograd.Function, lets autograd cast the gradients back to each
    # parameter's own dtype.
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None

    chosen = lm_loss_implementation(hidden.device) if implementation == "auto" else implementation
    if chosen == LIGER and targets.numel() > 0:
        return _liger_loss(hidden, weight, bias, targets, label_smoothing, logit_scale, softcap), loss_tokens
    with torch.autocast(device_type, enabled=False):
        loss_sum = _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, label_smoothing, logit_scale,
                                                    softcap, chunk_tokens, torch.is_grad_enabled())
    return loss_sum, loss_tokens


def chunked_sequence_logps(hidden_states: torch.Tensor, lm_head: nn.Module | torch.Tensor, labels: torch.Tensor, *,
                           chunk_tokens: int = 1024, logit_scale: float | None = None,
                           softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed next-token log-probability of its labels, and how many tokens each sum holds: (B,), (B,).

    What preference objectives score a sequence by. Inputs as :func:`chunked_causal_lm_loss`. Only the labelled
    positions get logits, a chunk at a time; with gradients on, each chunk is checkpointed (its logits recomputed in
    backward), so no more than one chunk of float32 logits exists at once in either pass. The sums are float32.
    """
    weight, bias = lm_head_weight_and_bias(lm_head)
    batch, length, _ = hidden_states.shape
    labels = labels.to(hidden_states.device)
    predicts = torch.zeros(batch, length, dtype=torch.bool, device=labels.device)
    predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    positions = predicts.reshape(-1).nonzero().squeeze(1)
    row_of_token = positions // length
    hidden, targets = _labelled_positions(hidden_states, labels)
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    pieces = []
    with torch.autocast(device_type, enabled=False):
        for start in range(0, hidden.shape[0], chunk_tokens):
            args = (hidden[start:start + chunk_tokens], weight, bias, targets[start:start + chunk_tokens], logit_scale, softcap)
            if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
                pieces.append(torch.utils.checkpoint.checkpoint(_chunk_token_logps, *args, use_reentrant=False))
            else:
                pieces.append(_chunk_token_logps(*args))
    token_logps = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    sums = torch.zeros(batch, dtype=torch.float32, device=hidden.device).index_add(0, row_of_token, token_logps)
    return sums, torch.bincount(row_of_token, minlength=batch)


def _chunk_token_logps(chunk, weight, bias, target, logit_scale, softcap) -> torch.Tensor:
    logits = F.linear(chunk, weight, bias).float()
    if logit_scale is not None:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits.log_softmax(dim=-1).gather(1, target[:, None]).squeeze(1)


def lm_loss_implementation(device: torch.device | str | None = None) -> str:
    """Which implementation ``implementation="auto"`` picks for tensors on ``device`` (default: the
    current CUDA device if any, else CPU), for a log line."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda" and fused_linear_cross_entropy_available():
        return LIGER
    return CHUNKED


def logit_options(config) -> dict[str, float | None]:
    """``logit_scale`` and ``softcap`` for a transformers model config: what its CausalLM head applies
    to ``lm_head``'s output (Cohere2-MoE scales, Granite-MoE divides, Gemma 4 softcaps; most apply nothing)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text_config, "logit_scale", None)
    divisor = getattr(text_config, "logits_scaling", None)
    if divisor is not None and divisor != 1:
        scale = (scale or 1.0) / divisor
    return {"logit_scale": None if scale in (None, 1, 1.0) else float(scale),
            "softcap": getattr(text_config, "final_logit_softcapping", None)}


def lm_head_weight_and_bias(lm_head: nn.Module | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (V, H) weight and optional (V,) bias that ``lm_head`` applies, still attached to autograd."""
    if isinstance(lm_head, torch.Tensor):
        return lm_head, None
    if _is_peft_lora(lm_head):
        return _lora_effective_weight(lm_head)
    if _is_peft_wrapper(lm_head):
        return lm_head_weight_and_bias(_active_peft_module(lm_head))
    if type(lm_head) is nn.Linear:
        return lm_head.weight, lm_head.bias
    raise UserError(f"The chunked LM loss supports an nn.Linear lm_head (plain, PEFT modules_to_save or LoRA-wrapped); "
                    f"this model's lm_head is a {type(lm_head).__name__}. Turn the chunked loss off for this model.")


def _labelled_positions(hidden_states: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states that predict a label (next-token shift) and those labels: (N, H), (N,)."""
    batch, length, width = hidden_states.shape
    # A hidden state at t predicts labels[t + 1]; the last position of each row predicts nothing.
    predicts = torch.zeros(batch, length, dtype=torch.bool, device=labels.device)
    predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    rows = predicts.reshape(-1).nonzero().squeeze(1)
    flat_hidden = hidden_states.reshape(batch * length, width)
    return flat_hidden.index_select(0, rows), labels.reshape(-1).index_select(0, rows + 1)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy over ``hidden @ weight.T + bias``, a chunk of rows at a time.

    The forward pass computes each chunk's gradients while its logits exist, so backward only
    scales them by the incoming gradient: 3 matmuls per chunk, no recomputation, no logits kept.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, label_smoothing, logit_scale, softcap, chunk_tokens, grad_enabled):
        want_hidden = grad_enabled and hidden.requires_grad
        want_weight = grad_enabled and weight.requires_grad
        want_bias = grad_enabled and bias is not None and bias.requires_grad
        vocab = weight.shape[0]
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight) if want_weight else None
        grad_bias = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if want_bias else None

        for start in range(0, hidden.shape[0], chunk_tokens):
            chunk = hidden[start:start + chunk_tokens]
            chunk_loss, grad_logits = _chunk_loss_and_logit_grad(
                chunk, weight, bias, targets[start:start + chunk_tokens, None], label_smoothing, logit_scale, softcap,
                want_grad=want_hidden or want_weight or want_bias)
            loss_sum += chunk_loss
            if grad_logits is None:
                continue
            if want_bias:
                grad_bias += grad_logits.sum(dim=0, dtype=torch.float32)
            if want_hidden:
                grad_hidden[start:start + chunk_tokens] = grad_logits @ weight
            if want_weight:
                grad_weight.addmm_(grad_logits.t(), chunk)
            del grad_logits  # before the next chunk's logits are allocated

        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias.to(bias.dtype) if want_bias else None)
        return loss_sum

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_output.to(torch.float32)
        grads = [None if g is None else g * scale.to(g.dtype) for g in (grad_hidden, grad_weight, grad_bias)]
        return (*grads, None, None, None, None, None, None)


def _chunk_loss_and_logit_grad(chunk, weight, bias, target, label_smoothing, logit_scale, softcap, want_grad):
    """Summed cross-entropy of one chunk and d loss / d raw logits (in the weight's dtype), or None.

    A function of its own so that every alias of the chunk's logits is freed on return.
    """
    vocab = weight.shape[0]
    logits = F.linear(chunk, weight, bias).float()
    if logit_scale is not None:
        logits.mul_(logit_scale)
    tanh = None
    if softcap is not None:
        tanh = logits.div_(softcap).tanh_()
        logits = tanh * softcap
    # The softmax is built in place in the logits buffer (torch.logsumexp would allocate a second
    # chunk-sized tensor): shift by the row max, read what the loss needs, exponentiate.
    shifted = logits.sub_(logits.amax(dim=-1, keepdim=True))
    # F.cross_entropy's label smoothing: target mass (1 - eps) on the label, eps / V on every class;
    # the row max cancels out of  lse - (1 - eps) * z_y - eps / V * sum(z).
    token_loss = -(1.0 - label_smoothing) * shifted.gather(1, target)
    if label_smoothing > 0:
        token_loss = token_loss - (label_smoothing / vocab) * shifted.sum(dim=-1, keepdim=True)
    exp = shifted.exp_()
    sum_exp = exp.sum(dim=-1, keepdim=True)
    loss = (token_loss + sum_exp.log()).sum()
    if not want_grad:
        return loss, None
    grad_logits = exp.div_(sum_exp)  # softmax: d loss / d logits = p - q
    grad_logits.scatter_add_(1, target, torch.full_like(target, label_smoothing - 1.0, dtype=torch.float32))
    if label_smoothing > 0:
        grad_logits.sub_(label_smoothing / vocab)
    if tanh is not None:
        grad_logits.mul_(tanh.square_().neg_().add_(1.0))
    if logit_scale is not None:
        grad_logits.mul_(logit_scale)
    return loss, grad_logits.to(weight.dtype)


def _liger_loss(hidden, weight, bias, targets, label_smoothing, logit_scale, softcap) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    if logit_scale is not None:
        # Liger has no logit scale; (s * h) @ W.T + s * b is the same logits without copying W.
        hidden = hidden * logit_scale
        bias = bias * logit_scale if bias is not None else None
    loss = liger_fused_linear_cross_entropy(hidden, weight, targets, bias=bias, ignore_index=IGNORE_INDEX,
                                            label_smoothing=label_smoothing, reduction="sum", softcap=softcap)
    return loss.float()


def _is_peft_lora(module: nn.Module) -> bool:
    if importlib.util.find_spec("peft") is None:
        return False
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def _is_peft_wrapper(module: nn.Module) -> bool:
    if importlib.util.find_spec("peft") is None:
        return False
    from peft.utils.other import ModulesToSaveWrapper

    return isinstance(module, ModulesToSaveWrapper)


def _active_peft_module(wrapper: nn.Module) -> nn.Module:
    """The module a ModulesToSaveWrapper's forward would call."""
    if wrapper.disable_adapters or not wrapper.active_adapters or \
            wrapper.active_adapters[0] not in wrapper.modules_to_save:
        return wrapper.original_module
    return wrapper.modules_to_save[wrapper.active_adapters[0]]


def _lora_effective_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight, bias = lm_head_weight_and_bias(layer.get_base_layer())
    if layer.disable_adapters or layer.merged:
        return weight, bias
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A:
            continue
        dropout = layer.lora_dropout[adapter]
        if adapter in getattr(layer, "lora_variant", {}) or getattr(layer, "lora_bias", {}).get(adapter):
            raise UserError(f"The chunked LM loss supports plain LoRA on lm_head; adapter {adapter!r} uses a LoRA "
                            "variant or a LoRA bias. Turn the chunked loss off for this model.")
        if layer.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
            raise UserError(f"The chunked LM loss folds lm_head's LoRA into its weight, which cannot apply LoRA dropout "
                            f"(adapter {adapter!r} has lora_dropout={dropout.p}). Set lora.lora_dropout=0 or turn the "
                            "chunked loss off.")
        weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)
    return weight, bias
