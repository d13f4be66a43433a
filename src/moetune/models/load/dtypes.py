"""The one reading of a dtype name (``model.torch_dtype``, ``moetune upcycle --dtype``) as a torch dtype."""

from __future__ import annotations

import torch


def resolve_dtype(name: str) -> torch.dtype | str:
    """``"bfloat16"`` -> ``torch.bfloat16``; ``"auto"`` stays ``"auto"``: the checkpoint's own dtype,
    which ``from_pretrained`` reads from its config.json (else from the stored weights)."""
    return "auto" if name == "auto" else getattr(torch, name)
