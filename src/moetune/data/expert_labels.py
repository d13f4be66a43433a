"""Which label id each training sample carries for label-guided routing (``moe.router_supervision.weight``).

Label ids index a vocabulary: the ``expert_label`` values seen in the training records for
``moe.router_supervision.label_to_expert: auto`` (most frequent first), or the explicit map's labels (sorted). Samples without a label, or with one
the map does not name, get ``NO_LABEL``. :mod:`moetune.models.routing.supervision` turns an id into
the label's experts with the same vocabulary order, so both sides agree without sharing state.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

NO_LABEL = -1


def label_vocabulary(records: Sequence[Mapping[str, Any]], label_to_expert: str | Mapping[str, Any]) -> tuple[str, ...]:
    """The labels in id order: the map's labels, sorted; for ``auto`` the labels of ``records``, the most
    frequent first (ties by name).

    ``auto`` sends label i to expert ``i mod num_experts``, so this order gives the largest labels an
    expert of their own and, with more labels than experts, puts the smallest beside them: merging
    two small labels into one expert would hide more of what the routing tells about the label.
    """
    if isinstance(label_to_expert, Mapping):
        return tuple(sorted(label_to_expert))
    counts = Counter(r["expert_label"] for r in records if r.get("expert_label"))
    return tuple(sorted(counts, key=lambda label: (-counts[label], label)))


def label_ids_of(records: Sequence[Mapping[str, Any]], vocabulary: Sequence[str]) -> list[int]:
    """One label id per record, ``NO_LABEL`` where it has none in ``vocabulary``."""
    index = {label: i for i, label in enumerate(vocabulary)}
    return [index.get(r.get("expert_label"), NO_LABEL) for r in records]
