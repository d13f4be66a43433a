"""Sources mixed by ``weight``: each source's share of a training epoch, up- or down-sampled, seeded.

With weights set (on every source of ``data.sources``, or on none), an epoch holds as many training
records as the split gave, and source i contributes ``weight_i / sum(weights)`` of them: a smaller share
than it has is a seeded sample of its records, a larger one repeats them (whole copies, then a seeded
sample of the rest). Records know their source by ``entry``, which the build writes when weights are set.
Validation records are never mixed: the validation loss stays the loss on the held-out data as it is.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any


def mix_by_weight(records: list[dict[str, Any]], sources: Sequence[Any], seed: int) -> tuple[list[dict[str, Any]], list[dict]]:
    """(the epoch's records, one count per source: ``source``, ``weight``, ``records`` it has, ``samples`` it gives).

    Without weights the records come back as they are and the counts are empty.
    """
    weights = [getattr(source, "weight", None) for source in sources]
    if all(weight is None for weight in weights):
        return records, []
    by_entry: list[list[dict[str, Any]]] = [[] for _ in sources]
    for record in records:
        by_entry[record.get("entry", 0)].append(record)
    present = [i for i, members in enumerate(by_entry) if members]
    total_weight = sum(weights[i] for i in present)
    rng = random.Random(seed)
    mixed: list[dict[str, Any]] = []
    counts = []
    for i, (source, members) in enumerate(zip(sources, by_entry, strict=True)):
        wanted = round(len(records) * weights[i] / total_weight) if members else 0
        copies, rest = divmod(wanted, len(members)) if members else (0, 0)
        chosen = members * copies + [members[j] for j in sorted(rng.sample(range(len(members)), rest))]
        mixed += chosen
        counts.append({"source": f"data.sources[{i}] ({source.type}: {source.path})", "weight": weights[i],
                       "records": len(members), "samples": len(chosen)})
    return mixed, counts
