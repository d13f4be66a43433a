"""Which attention, experts and loss kernels to use, with fallbacks that never crash, and whether the
attention kernel a model runs keeps samples packed into one row apart."""

from __future__ import annotations

import importlib.util
import logging

import torch

logger = logging.getLogger(__name__)


def flash_attention_available() -> bool:
    """flash-attn is importable and a CUDA GPU is present (it has no CPU kernel)."""
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def fused_linear_cross_entropy_available() -> bool:
    """Liger Kernel is importable and a CUDA GPU is present (its Triton kernels have no CPU path)."""
    return importlib.util.find_spec("liger_kernel") is not None and torch.cuda.is_available()


def resolve_attn_implementation(requested: str, supported: tuple[str, ...] | None = None) -> str:
    """``requested`` when it can run here; flash_attention_2 falls back to sdpa with one warning.

    ``supported``: the kernels a family's attention has (None: all). MPT's ALiBi attention has one
    (eager); gpt-oss's sinks have no sdpa kernel. A kernel the family lacks becomes "eager".
    """
    if supported is not None and requested not in supported:
        logger.info("model.attn_implementation=%s does not apply: this model's attention runs %s; using eager",
                    requested, " or ".join(supported))
        return "eager"
    if requested == "flash_attention_2" and not flash_attention_available():
        reason = "flash-attn is not installed" if importlib.util.find_spec("flash_attn") is None else "no CUDA GPU is present"
        fallback = "sdpa" if supported is None or "sdpa" in supported else "eager"
        logger.warning("model.attn_implementation=flash_attention_2 is unavailable (%s; `pip install moetune[flash]` on "
                       "a CUDA machine); using %s instead.", reason, fallback)
        return fallback
    return requested


# Kernels that keep samples packed into one row apart from nothing but restarting position_ids (no
# attention mask), in transformers 5.x: for sdpa, eager and flex attention, create_causal_mask
# reads the restarts (masking_utils.find_packed_sequence_indices) into a block-diagonal causal mask;
# the flash kernels take no mask but run varlen over the restarts when the batch is one flattened
# row (the packing collator flattens for them: flattens_packed_rows). A kernel outside masking_utils' table
# gets no mask at all, so its packed samples would attend to each other.
FLASH_KERNELS = ("flash_attention_2", "flash_attention_3")
PACKING_KERNELS = ("sdpa", "eager", "flex_attention", *FLASH_KERNELS)


def attention_kernel(model) -> str | None:
    """The attention implementation ``model`` runs (after any fallback), e.g. "sdpa"; None when it names none."""
    from moetune.models.layout import innermost_model

    return getattr(getattr(innermost_model(model), "config", None), "_attn_implementation", None)


def flattens_packed_rows(model) -> bool:
    """Whether packed rows should be joined into one flattened row for ``model``: its kernel is a flash
    (varlen) kernel, which splits samples at the position_ids restarts only within one row."""
    return attention_kernel(model) in FLASH_KERNELS


def fastest_experts_implementation() -> str | None:
    """The experts kernel to ask for when the config names none.

    None on a GPU: transformers then picks grouped_mm where the GPU supports it. "eager" on a CPU,
    where a matmul per expert measured 3-35% faster than grouped_mm (docs/benchmarks.md).
    """
    return None if torch.cuda.is_available() else "eager"


def experts_implementation_in_use(model) -> str | None:
    """The experts kernel transformers chose for a fused-experts model (e.g. "grouped_mm"), else None."""
    config = getattr(model, "config", None)
    for attribute in ("_experts_implementation_internal", "_experts_implementation"):
        value = getattr(config, attribute, None)
        if value:
            return value
    return None


def log_kernels(model, attn_implementation: str, requested_experts: str | None) -> None:
    """One log line saying which attention and experts kernels the model runs."""
    experts = experts_implementation_in_use(model)
    if experts is None:
        logger.info("attention: %s; experts: per-expert modules", attn_implementation)
        return
    how = "set by model.experts_implementation" if requested_experts else "fastest available"
    logger.info("attention: %s; experts: %s (%s)", attn_implementation, experts, how)


def compile_decoder_layers(model) -> int:
    """Compile each decoder layer in place (regional compilation); returns how many were compiled.

    Compiling layer by layer rather than the whole model keeps the router's data-dependent shapes
    (how many tokens each expert gets) to graph breaks inside one small graph, and every layer reuses
    the code compiled for the first, so compile time does not grow with depth. The layer classes are
    the model's ``_no_split_modules``, the units transformers itself never splits.
    """
    from moetune.models.layout import innermost_model

    layer_classes = set(getattr(innermost_model(model), "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in layer_classes]
    for layer in layers:
        layer.compile()
    logger.info("advanced.torch_compile: compiled %d decoder layers (%s) with torch.compile", len(layers),
                ", ".join(sorted(layer_classes)))
    return len(layers)
