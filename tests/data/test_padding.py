"""Padding: one sample per row, right-padded with an attention mask; labels and expert labels ignored on padding."""

from __future__ import annotations

from datasets import Dataset

from moetune.data.expert_labels import NO_LABEL
from moetune.data.padding import PaddingCollator, SampleDataset


def test_padding_collator_masks_the_padding_and_ignores_its_labels():
    encoded = Dataset.from_dict({"input_ids": [[5, 6, 7], [3]], "labels": [[-100, 6, 7], [-100]], "expert_label_id": [1, 0]})
    rows = SampleDataset(encoded)
    assert len(rows) == 2 and rows[1] == {"input_ids": [3], "labels": [-100], "expert_label_ids": [0]}
    padded = PaddingCollator(pad_token_id=0)([rows[0], rows[1]])
    assert padded["input_ids"].tolist() == [[5, 6, 7], [3, 0, 0]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert padded["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert padded["expert_label_ids"].tolist() == [[1, 1, 1], [0, NO_LABEL, NO_LABEL]]
