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
    chosen, counts = weighted_indices([record.get("entry", 0) for record in records], sources, seed)
    return (records, counts) if chosen is None else ([records[i] for i in chosen], counts)


def mix_table_by_weight(table, sources: Sequence[Any], seed: int):
    """:func:`mix_by_weight` for a table of records (:mod:`moetune.data.record_table`): the epoch's rows, as an index
    mapping onto the same table, and the counts."""
    from moetune.data.encode import column_values

    if all(getattr(source, "weight", None) is None for source in sources):
        return table, []
    chosen, counts = weighted_indices(column_values(table, "entry").tolist(), sources, seed)
    return table.select(chosen), counts


def weighted_indices(entries: Sequence[int], sources: Sequence[Any], seed: int) -> tuple[list[int] | None, list[dict]]:
    """(the positions an epoch takes, in order, each as often as it is drawn; the counts per source) for records of
    the given source ``entries``; (None, []) without weights."""
    weights = [getattr(source, "weight", None) for source in sources]
    if all(weight is None for weight in weights):
        return None, []
    by_entry: list[list[int]] = [[] for _ in sources]
    for position, entry in enumerate(entries):
        by_entry[max(entry, 0)].append(position)  # -1: a record written without an entry (one source)
    present = [i for i, members in enumerate(by_entry) if members]
    total_weight = sum(weights[i] for i in present)
    rng = random.Random(seed)
    chosen: list[int] = []
    counts = []
    for i, (source, members) in enumerate(zip(sources, by_entry, strict=True)):
        wanted = round(len(entries) * weights[i] / total_weight) if members else 0
        copies, rest = divmod(wanted, len(members)) if members else (0, 0)
        drawn = members * copies + [members[j] for j in sorted(rng.sample(range(len(members)), rest))]
        chosen += drawn
        counts.append({"source": f"data.sources[{i}] ({source.type}: {source.path})", "weight": weights[i],
                       "records": len(members), "samples": len(drawn)})
    return chosen, counts
