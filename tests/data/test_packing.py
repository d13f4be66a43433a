"""Packing: the best-fit-decreasing plan, rows with restarting positions, and the packed collator."""

from __future__ import annotations

from datasets import Dataset

from moetune.data.packing import PackedCollator, PackedDataset, plan_packed_rows


def test_best_fit_decreasing_plan():
    lengths = [5, 9, 3, 7, 2, 8]
    rows = plan_packed_rows(lengths, 10)
    assert rows == [[1], [5, 4], [3, 2], [0]]
    assert sorted(i for row in rows for i in row) == list(range(6))
    assert sum(lengths) / (len(rows) * 10) == 0.85


def test_a_packed_row_restarts_positions_per_sample_and_keeps_each_samples_label():
    encoded = Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5], [6]], "labels": [[-100, 2, 3], [-100, 5], [-100]],
                                 "expert_label_id": [0, 1, 2]})
    row = PackedDataset(encoded, [[0, 1], [2]])[0]
    assert row == {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, -100, 5], "position_ids": [0, 1, 2, 0, 1],
                   "expert_label_ids": [0, 0, 0, 1, 1]}


def test_packed_collator_pads_as_a_separate_sequence_or_flattens():
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9], "position_ids": [0, 1, 2, 0, 1]},
            {"input_ids": [3, 4], "labels": [-100, 4], "position_ids": [0, 1]}]
    batch = PackedCollator(pad_token_id=0)(rows)
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [3, 4, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 4, -100, -100, -100]]
    flat = PackedCollator(pad_token_id=0, flatten=True)(rows)
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]] and flat["input_ids"].shape == (1, 7)
