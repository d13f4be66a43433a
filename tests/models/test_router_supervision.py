"""Label-guided routing: the loss's values by hand, unlabelled tokens adding nothing, the label ids
batches carry (packed and padded), the auto mapping, and the loss part reaching the objective."""

from __future__ import annotations

import math

import pytest
import torch

from moetune.config import load_config
from moetune.data.expert_labels import NO_LABEL, label_ids_of, label_vocabulary
from moetune.data.packing import PackedCollator, PackedDataset
from moetune.data.padding import PaddingCollator, SampleDataset
from moetune.errors import ConfigError, UserError
from moetune.models.load.factory import build_model
from moetune.models.loss.objective import LossParts, compute_losses
from moetune.models.routing.supervision import label_targets, router_supervision_loss

LOGITS = torch.tensor([[2.0, 0.0, -1.0, 0.5],
                       [0.0, 1.0, 1.0, -2.0],
                       [3.0, -3.0, 0.0, 0.0],
                       [0.1, 0.2, 0.3, 0.4]])


def _neg_log(p: float) -> float:
    return -math.log(p)


def test_cross_entropy_toward_the_labels_experts_by_hand():
    # Explicit map, numbered in sorted order: a -> 0, b -> 1, c -> 2. Token 2 is unlabelled.
    mapping = {"c": (3,), "a": (0,), "b": (1, 2)}
    ids = torch.tensor([[0, 1], [NO_LABEL, 2]])
    p = [[math.exp(v) / sum(math.exp(w) for w in row) for v in row] for row in LOGITS.tolist()]
    expected = (_neg_log(p[0][0]) + _neg_log(p[1][1] + p[1][2]) + _neg_log(p[3][3])) / 3
    second_layer = LOGITS.flip(-1)
    q = [[math.exp(v) / sum(math.exp(w) for w in row) for v in row] for row in second_layer.tolist()]
    expected_second = (_neg_log(q[0][0]) + _neg_log(q[1][1] + q[1][2]) + _neg_log(q[3][3])) / 3
    loss = router_supervision_loss((LOGITS, second_layer), ids, mapping)
    assert loss.item() == pytest.approx((expected + expected_second) / 2, rel=1e-6)


def test_auto_sends_label_i_to_expert_i_mod_experts():
    ids = torch.tensor([0, 1, 2, 3, 4, 5, NO_LABEL])
    targets = label_targets("auto", ids, 4)
    assert targets.int().argmax(-1)[:6].tolist() == [0, 1, 2, 3, 0, 1]
    assert targets.sum(-1).tolist() == [1, 1, 1, 1, 1, 1, 0]
    loss = router_supervision_loss((LOGITS,), torch.tensor([1, 0, 0, 3]), "auto")
    by_hand = torch.nn.functional.cross_entropy(LOGITS, torch.tensor([1, 0, 0, 3]))
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_unlabelled_tokens_contribute_nothing():
    ids = torch.tensor([0, NO_LABEL, 1, NO_LABEL])
    logits = LOGITS.clone().requires_grad_(True)
    loss = router_supervision_loss((logits,), ids, "auto")
    changed = LOGITS.clone()
    changed[[1, 3]] = torch.tensor([9.0, -9.0, 4.0, 0.0])
    assert router_supervision_loss((changed,), ids, "auto").item() == pytest.approx(loss.item(), rel=1e-7)
    only_labelled = torch.nn.functional.cross_entropy(LOGITS[[0, 2]], torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(only_labelled.item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[[1, 3]].abs().max() == 0
    assert logits.grad[[0, 2]].abs().max() > 0

    nobody = LOGITS.clone().requires_grad_(True)
    none = router_supervision_loss((nobody,), torch.full((4,), NO_LABEL), "auto")
    none.backward()
    assert none.item() == 0.0 and nobody.grad.abs().max() == 0


def test_auto_vocabulary_is_most_frequent_first_and_independent_of_record_order():
    records = [{"expert_label": "fees"}, {"expert_label": None}, {"expert_label": "currency"}, {},
               {"expert_label": "ledger"}, {"expert_label": "fees"}]
    # fees twice, then the ties in name order.
    assert label_vocabulary(records, "auto") == ("fees", "currency", "ledger")
    assert label_vocabulary(list(reversed(records)), "auto") == ("fees", "currency", "ledger")
    assert label_ids_of(records, ("fees", "currency", "ledger")) == [0, NO_LABEL, 1, NO_LABEL, 2, 0]
    # An explicit map numbers its own labels; a label it does not name is unlabelled.
    explicit = label_vocabulary(records, {"ledger": (0,), "fees": (1, 2)})
    assert explicit == ("fees", "ledger")
    assert label_ids_of(records, explicit) == [0, NO_LABEL, NO_LABEL, NO_LABEL, 1, 0]


class _Encoded:
    """The slice of a ``datasets.Dataset`` the row datasets read."""

    def __init__(self, rows):
        self.rows = rows
        self.column_names = list(rows[0])

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, list):
            return {k: [self.rows[i][k] for i in index] for k in self.column_names}
        return self.rows[index]


ENCODED = _Encoded([{"input_ids": [1, 5, 6], "labels": [-100, 5, 6], "expert_label_id": 2},
                    {"input_ids": [1, 7], "labels": [-100, 7], "expert_label_id": NO_LABEL},
                    {"input_ids": [1, 8, 9, 4], "labels": [-100, 8, 9, 4], "expert_label_id": 0}])


def test_packed_rows_keep_each_samples_label_and_pad_with_no_label():
    rows = PackedDataset(ENCODED, [[0, 1], [2]])
    assert rows[0]["expert_label_ids"] == [2, 2, 2, NO_LABEL, NO_LABEL]
    batch = PackedCollator(pad_token_id=0)([rows[0], rows[1]])
    assert batch["expert_label_ids"].tolist() == [[2, 2, 2, -1, -1], [0, 0, 0, 0, -1]]
    assert batch["expert_label_ids"].shape == batch["input_ids"].shape
    flat = PackedCollator(pad_token_id=0, flatten=True)([rows[0], rows[1]])
    assert flat["expert_label_ids"].tolist() == [[2, 2, 2, -1, -1, 0, 0, 0, 0]]


def test_padded_samples_carry_label_ids_and_plain_data_none():
    samples = SampleDataset(ENCODED)
    batch = PaddingCollator(pad_token_id=0)([samples[0], samples[2]])
    assert batch["expert_label_ids"].tolist() == [[2, 2, 2, -1], [0, 0, 0, 0]]
    plain = _Encoded([{k: v for k, v in row.items() if k != "expert_label_id"} for row in ENCODED.rows])
    assert "expert_label_ids" not in PaddingCollator(pad_token_id=0)([SampleDataset(plain)[0]])
    assert "expert_label_ids" not in PackedCollator(pad_token_id=0)([PackedDataset(plain, [[0, 1]])[0]])


def test_supervision_is_a_routed_token_weighted_part_of_the_objective():
    def parts(routed, supervision):
        return LossParts(lm_loss_sum=torch.tensor(6.0), loss_tokens=torch.tensor(3.0), aux_loss=torch.tensor(1.0),
                         z_loss=torch.tensor(0.0), routed_tokens=torch.tensor(routed), router_logits=(),
                         aux_weight=0.1, router_supervision_loss=torch.tensor(supervision), supervision_weight=0.5)
    first, second = parts(4.0, 2.0), parts(12.0, 1.0)
    step = torch.tensor([6.0, 16.0, 0.0])  # label tokens, routed tokens, preference pairs
    total = first.objective(step) + second.objective(step)
    assert total.item() == pytest.approx(12.0 / 6 + 0.1 * 1.0 + 0.5 * (4 * 2.0 + 12 * 1.0) / 16)
    assert first.total.item() == pytest.approx(2.0 + 0.1 + 0.5 * 2.0)


def test_compute_losses_supervises_the_router_and_keeps_label_ids_from_the_model(mpt_config, tokens):
    config = mpt_config("moe.upcycling.enabled=true", "moe.upcycling.top_k=1", "moe.router_supervision.weight=0.5",
                        "moe.router_supervision.label_to_expert={a: [1], b: [2, 3]}")
    model = build_model(config, seed=42)
    label_ids = torch.tensor([[0] * tokens.shape[1], [1] * 4 + [NO_LABEL] * (tokens.shape[1] - 4)])
    parts = compute_losses(model, {"input_ids": tokens, "attention_mask": torch.ones_like(tokens),
                                   "expert_label_ids": label_ids}, config)
    assert len(parts.router_logits) == 2 and parts.supervision_weight == 0.5
    expected = router_supervision_loss(parts.router_logits, label_ids, {"a": (1,), "b": (2, 3)})
    assert parts.router_supervision_loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # Four experts at a near-uniform start: -log(1/4) for "a", -log(2/4) for "b".
    assert parts.router_supervision_loss.item() == pytest.approx(
        (math.log(4) * 12 + math.log(2) * 4) / 16, rel=0.05)
    parts.total.backward()
    routers = [p for n, p in model.named_parameters() if "router" in n and p.grad is not None]
    assert routers and all(p.grad.abs().max() > 0 for p in routers)


def test_config_accepts_auto_or_a_map_and_rejects_what_cannot_work():
    assert load_config(None, []).moe.router_supervision.label_to_expert == "auto"
    assert load_config(None, []).moe.router_supervision.weight == 0.0
    upcycled = ["moe.upcycling.enabled=true", "moe.upcycling.num_experts=4"]
    moe = load_config(None, [*upcycled, "moe.router_supervision.label_to_expert={fees: [0, 1], rust: 3}"]).moe
    assert moe.router_supervision.label_to_expert == {"fees": (0, 1), "rust": (3,)}
    with pytest.raises(ConfigError,
                       match=r"moe.router_supervision.label_to_expert.rust must be expert indices below moe.upcycling.num_experts \(4\)"):
        load_config(None, [*upcycled, "moe.router_supervision.label_to_expert={rust: [4]}"])
    with pytest.raises(ConfigError, match="moe.router_supervision.label_to_expert.fees must be a non-empty list of expert indices"):
        load_config(None, ["moe.router_supervision.label_to_expert={fees: []}"])
    with pytest.raises(ConfigError, match="moe.router_supervision.label_to_expert must be one of auto"):
        load_config(None, ["moe.router_supervision.label_to_expert=atuo"])
    with pytest.raises(ConfigError, match=r"moe.freeze_router must be false when moe.router_supervision.weight"):
        load_config(None, ["moe.router_supervision.weight=0.5"])
    with pytest.raises(ConfigError, match="moe.router_supervision.weight must be 0 or more"):
        load_config(None, ["moe.router_supervision.weight=-1", "moe.freeze_router=false"])


def test_an_explicit_expert_beyond_the_models_experts_is_bad_input():
    with pytest.raises(UserError, match=r"moe.router_supervision.label_to_expert.b names expert 7, but the model's MoE layers have 4 experts"):
        label_targets({"a": (0,), "b": (7,)}, torch.tensor([0, 1]), 4)
