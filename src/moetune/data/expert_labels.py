"""Which label id each training sample carries for label-guided routing (``moe.router_supervision_weight``).

Label ids index a sorted vocabulary: the ``expert_label`` values seen in the training records for
``moe.label_to_expert: auto``, or the explicit map's labels. Samples without a label, or with one
the map does not name, get ``NO_LABEL``. :mod:`moetune.models.router_supervision` turns an id into
the label's experts with the same vocabulary order, so both sides agree without sharing state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

NO_LABEL = -1


def label_vocabulary(records: Sequence[Mapping[str, Any]], label_to_expert: str | Mapping[str, Any]) -> tuple[str, ...]:
    """The labels in id order: sorted labels of ``records`` (``auto``) or the map's labels, sorted."""
    if isinstance(label_to_expert, Mapping):
        return tuple(sorted(label_to_expert))
    return tuple(sorted({r["expert_label"] for r in records if r.get("expert_label")}))


def label_ids_of(records: Sequence[Mapping[str, Any]], vocabulary: Sequence[str]) -> list[int]:
    """One label id per record, ``NO_LABEL`` where it has none in ``vocabulary``."""
    index = {label: i for i, label in enumerate(vocabulary)}
    return [index.get(r.get("expert_label"), NO_LABEL) for r in records]
