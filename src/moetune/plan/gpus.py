"""The GPUs ``moetune plan --gpu`` knows: memory the driver makes visible and dense bf16 tensor peak.

Memory is what ``torch.cuda.get_device_properties(0).total_memory`` reports for the SXM / PCIe parts
(H100 and A100 80 GB: 79.2 GiB; H200: 139.8 GiB; L40S: 44.4 GiB); the peaks are NVIDIA's datasheet
figures without sparsity (H100 / H200 SXM 989 TFLOP/s, A100 312, L40S 362).
"""

from __future__ import annotations

from dataclasses import dataclass

from moetune.errors import UserError

GIB = 2**30


@dataclass(frozen=True)
class Gpu:
    name: str
    memory: int
    """Bytes visible to the process."""
    peak_flops: float | None
    """Dense bf16 FLOP/s, None when unknown (``--gpu-memory``)."""


GPUS = {
    "h100": Gpu("H100 80GB", int(79.2 * GIB), 989e12),
    "h200": Gpu("H200 141GB", int(139.8 * GIB), 989e12),
    "a100-80": Gpu("A100 80GB", int(79.2 * GIB), 312e12),
    "l40s": Gpu("L40S 48GB", int(44.4 * GIB), 362e12),
}


def resolve_gpu(name: str | None = None, memory_gib: float | None = None) -> Gpu | None:
    """``--gpu NAME`` or ``--gpu-memory GIB``; a UserError naming the known GPUs for an unknown name."""
    if name is not None:
        gpu = GPUS.get(name.lower())
        if gpu is None:
            raise UserError(f"--gpu {name!r} is not a GPU moetune plan knows; use one of {', '.join(GPUS)}, or give "
                            "its memory with --gpu-memory GIB.")
        return gpu
    if memory_gib is not None:
        if memory_gib <= 0:
            raise UserError(f"--gpu-memory must be a positive number of GiB, got {memory_gib:g}.")
        return Gpu(f"{memory_gib:g} GiB GPU", int(memory_gib * GIB), None)
    return None


def visible_gpu() -> Gpu | None:
    """The first visible CUDA GPU (its name, memory, and peak when it is one of :data:`GPUS`), or None."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    known = next((gpu for key, gpu in GPUS.items() if key.split("-")[0].upper() in props.name.upper()), None)
    return Gpu(props.name, props.total_memory, known.peak_flops if known else None)
