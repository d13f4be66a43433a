"""Model FLOPs of a training step, and what they take at a stated MFU.

Per token, every weight a token goes through costs 2 FLOPs per parameter forward and 2 for the gradient
of its input in backward: 4N for frozen weights; a weight that trains costs 2 more for its own gradient:
6N (the counts of PaLM's MFU, Chowdhery et al. 2022, appendix B, with the frozen part of a LoRA run at
4N). Routed experts count the top_k / num_experts share a token uses; the input embedding is a lookup
and counts nothing. Attention adds its scores and weighted values: 2 x heads x tokens x (qk dim + v
dim) forward per token and layer, three times that with backward (12 x heads x head_dim x tokens for
equal dims), over every key of the row (what the kernels and torch's FlopCounterMode count, a causal
mask's skipped half included; sliding windows too). LoRA factors train (6N); PEFT's LoRA on fused expert
weights folds ``W + B A`` into the weight once per micro-batch (its FLOPs are per micro-batch) and the
folded weight then gets a gradient like a trained one. The input-gradient FLOPs assume what a run with
gradient checkpointing does (PEFT then makes the embeddings' output require grad): every layer's.

Gradient checkpointing recomputes the forward (2N more) on the hardware, which MFU, by its definition,
does not count: steps per hour at an MFU come from model FLOPs. A preference objective's extra forward
passes without gradients (DPO's and KTO's reference on every row unless precomputed, KTO's policy and
reference on its KL rows) are work the step cannot skip: each adds the forward's 2 FLOPs per weight a token
uses plus the attention's forward third, counted in ``reference_per_token``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moetune.models.layout import is_expert_parameter

HOUR = 3600


@dataclass(frozen=True)
class Flops:
    """Model FLOPs: ``per_token`` (weights and attention at the planned row length) and ``per_micro_batch``
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


def model_flops(model: nn.Module, hf_config, seq_len: int, routed_share: float, extra_forwards: float = 0.0) -> Flops:
    """FLOPs of ``model`` (the planned model, training plan applied) per token of rows ``seq_len`` long.
    ``routed_share``: top_k / num_experts. ``extra_forwards``: forward passes without gradients per trained
    forward (a preference objective's reference)."""
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
    attention = attention_flops(hf_config, seq_len)
    return Flops(weights_per_token=weights, attention_per_token=attention, per_micro_batch=fold_flops,
                 reference_per_token=extra_forwards * (forward + attention / 3))


def attention_flops(hf_config, seq_len: int) -> float:
    """Attention scores and weighted values per token, forward and backward, every layer with attention."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_heads", 0)
    hidden = getattr(text, "hidden_size", None) or getattr(text, "d_model", 0)
    head_dim = getattr(text, "head_dim", None) or (hidden // heads if heads else 0)
    qk_dim = getattr(text, "qk_head_dim", None) or (
        text.qk_nope_head_dim + text.qk_rope_head_dim if getattr(text, "qk_rope_head_dim", None) else head_dim)
    v_dim = getattr(text, "v_head_dim", None) or head_dim
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layers", 0)
    layer_types = getattr(text, "layer_types", None)
    if layer_types:  # hybrids: linear-attention / SSM layers have no (T x T) scores
        layers = sum(1 for kind in layer_types if "attention" in kind and "linear" not in kind)
    return 3 * 2 * heads * seq_len * (qk_dim + v_dim) * layers


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
