"""Expert-usage figures from routed-token counts."""

import math

import pytest
import torch

from moetune.train.expert_usage import summarize_usage, usage_heatmap, usage_scalars, usage_warnings


def test_even_usage_is_perfectly_balanced():
    [layer] = summarize_usage(torch.tensor([[25.0, 25.0, 25.0, 25.0]]))
    assert layer.shares == (0.25, 0.25, 0.25, 0.25)
    assert layer.entropy == pytest.approx(1.0)
    assert layer.cv == pytest.approx(0.0)
    assert usage_warnings([layer], starving_share=0.25, dominant_share=0.5) == []


def test_collapsed_layer_is_named_with_its_shares():
    counts = torch.tensor([[10.0, 10.0, 10.0, 10.0], [91.0, 3.0, 3.0, 3.0]])
    balance = summarize_usage(counts)
    assert balance[1].shares == (0.91, 0.03, 0.03, 0.03)
    assert balance[1].max_share == pytest.approx(0.91)
    expected_entropy = -(0.91 * math.log(0.91) + 3 * 0.03 * math.log(0.03)) / math.log(4)
    assert balance[1].entropy == pytest.approx(expected_entropy)
    warnings = usage_warnings(balance, starving_share=0.25, dominant_share=0.5)
    assert warnings == ["Expert utilization layer 1: [0.91, 0.03, 0.03, 0.03] (expert 0 takes 91% of routed tokens)"]


def test_starving_expert_is_reported():
    balance = summarize_usage(torch.tensor([[40.0, 40.0, 18.0, 2.0]]))
    [warning] = usage_warnings(balance, starving_share=0.25, dominant_share=0.5)
    assert warning.startswith("Expert utilization layer 0: [0.40, 0.40, 0.18, 0.02] (starving: expert(s) 3 ")


def test_scalars_and_heatmap():
    balance = summarize_usage(torch.tensor([[1.0, 3.0], [2.0, 2.0]]))
    scalars = usage_scalars(balance)
    assert scalars["expert_usage/layer_0/expert_1"] == 0.75
    assert scalars["expert_balance/max_share"] == 0.75
    assert scalars["expert_balance/min_share"] == 0.25
    image = usage_heatmap(balance)
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype.name == "uint8"
