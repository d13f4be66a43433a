"""The preference objectives' losses against their papers' formulas, and the sequence log-probabilities,
reference and step objective they are computed from.

The expected values are written out here with ``math`` on plain floats, one pair (row) at a time:
DPO (Rafailov et al. 2023, eq. 7), conservative DPO's label smoothing (Mitchell 2023), IPO (Azar et al. 2023,
eq. 17, on per-token mean log-ratios as TRL computes it), ORPO (Hong et al. 2024, eq. 7-8) and KTO
(Ethayarajh et al. 2024, eq. 8, KL clamped at 0). Label smoothing is checked against the formula only: TRL 1.16's
``sigmoid`` loss no longer reads ``label_smoothing`` (it applies to its ``robust``, ``exo_pair`` and ``aot`` losses),
so tests/models/test_dpo_parity.py compares the unsmoothed losses.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from moetune.data.encode import IGNORE_INDEX
from moetune.models.load.factory import build_base_model, build_model
from moetune.models.loss.lm_loss import forward_with_sequence_logps, lm_loss_is_chunked, use_full_logits
from moetune.models.loss.objective import compute_losses, step_token_counts
from moetune.models.loss.preference import dpo_losses, kto_losses, orpo_losses
from moetune.models.loss.reference import AdapterOff, FrozenCopy

# Two pairs: summed log-probabilities of chosen / rejected under the policy and the reference, completion lengths.
POLICY_CHOSEN, POLICY_REJECTED = [-12.0, -30.5], [-15.0, -28.0]
REF_CHOSEN, REF_REJECTED = [-13.0, -29.0], [-14.0, -29.5]
CHOSEN_TOKENS, REJECTED_TOKENS = [4, 10], [5, 9]
BETA = 0.3


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def dpo_paper(i: int, smoothing: float = 0.0) -> float:
    margin = BETA * ((POLICY_CHOSEN[i] - REF_CHOSEN[i]) - (POLICY_REJECTED[i] - REF_REJECTED[i]))
    return -(1 - smoothing) * logsigmoid(margin) - smoothing * logsigmoid(-margin)


def ipo_paper(i: int) -> float:
    h = ((POLICY_CHOSEN[i] - REF_CHOSEN[i]) / CHOSEN_TOKENS[i]
         - (POLICY_REJECTED[i] - REF_REJECTED[i]) / REJECTED_TOKENS[i])
    return (h - 1 / (2 * BETA)) ** 2


def orpo_paper(i: int) -> float:
    def odds(logp_sum: float, tokens: int) -> float:
        p = math.exp(logp_sum / tokens)  # the per-token mean likelihood P(y|x)
        return p / (1 - p)

    return -logsigmoid(math.log(odds(POLICY_CHOSEN[i], CHOSEN_TOKENS[i]) / odds(POLICY_REJECTED[i], REJECTED_TOKENS[i])))


def tensors(*lists):
    return [torch.tensor(values, dtype=torch.float32) for values in lists]


CASES = {
    "dpo-sigmoid": (lambda: dpo_losses(*tensors(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED), beta=BETA)[0],
                    lambda i: dpo_paper(i)),
    "dpo-label-smoothing": (lambda: dpo_losses(*tensors(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED), beta=BETA,
                                               label_smoothing=0.2)[0],
                            lambda i: dpo_paper(i, smoothing=0.2)),
    "ipo": (lambda: dpo_losses(*tensors(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED), beta=BETA, loss="ipo",
                               chosen_tokens=torch.tensor(CHOSEN_TOKENS), rejected_tokens=torch.tensor(REJECTED_TOKENS))[0],
            ipo_paper),
    "orpo": (lambda: orpo_losses(*tensors(POLICY_CHOSEN, POLICY_REJECTED), torch.tensor(CHOSEN_TOKENS),
                                 torch.tensor(REJECTED_TOKENS), beta=BETA)[0],
             orpo_paper),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pair_losses_follow_the_papers(case):
    ours, paper = CASES[case]
    losses = ours()
    assert losses.shape == (2,)
    for i in range(2):
        assert losses[i].item() == pytest.approx(paper(i), rel=1e-5), i


def test_dpo_rewards_are_beta_times_the_log_ratios_and_detached():
    policy_chosen = torch.tensor(POLICY_CHOSEN, requires_grad=True)
    _, chosen, rejected = dpo_losses(policy_chosen, *tensors(POLICY_REJECTED, REF_CHOSEN, REF_REJECTED), beta=BETA)
    assert not chosen.requires_grad
    assert chosen.tolist() == pytest.approx([BETA * (p - r) for p, r in zip(POLICY_CHOSEN, REF_CHOSEN, strict=True)])
    assert rejected.tolist() == pytest.approx([BETA * (p - r) for p, r in zip(POLICY_REJECTED, REF_REJECTED, strict=True)])


@pytest.mark.parametrize("kl_sign", [1.0, -1.0])  # a negative KL estimate is clamped to 0
def test_kto_follows_the_paper(kl_sign):
    logps, ref = [-10.0, -20.0, -7.0], [-11.0, -19.0, -7.5]
    kl_logps, ref_kl = [-30.0, -25.0, -28.0], [-30.0 - kl_sign * 0.6, -25.0 - kl_sign * 0.3, -28.0 - kl_sign * 0.9]
    desirable, weights = [True, False, True], {True: 1.5, False: 0.7}
    losses, desirable_rewards, undesirable_rewards, kl = kto_losses(
        *tensors(logps, ref, kl_logps, ref_kl), torch.tensor(desirable), beta=BETA, desirable_weight=weights[True],
        undesirable_weight=weights[False])

    z0 = max(0.0, sum(k - r for k, r in zip(kl_logps, ref_kl, strict=True)) / 3)
    assert kl.item() == pytest.approx(z0, abs=1e-6)
    for i, good in enumerate(desirable):
        r = logps[i] - ref[i]
        value = weights[good] * sigmoid(BETA * (r - z0) if good else BETA * (z0 - r))  # v(x, y)
        assert losses[i].item() == pytest.approx(weights[good] - value, rel=1e-5)  # lambda_y - v(x, y)
    assert desirable_rewards.tolist() == pytest.approx([BETA * 1.0, BETA * 0.5])
    assert undesirable_rewards.tolist() == pytest.approx([BETA * -1.0])


# --------------------------------------------------------------------------- on a tiny model

PAIRS = [([5, 9, 17, 33], [40, 41, 42, 2], [50, 51, 2]),
         ([7, 8], [60, 61, 62, 63, 64, 2], [70, 2]),
         ([11, 12, 13, 14, 15, 16], [80, 2], [90, 91, 92, 93, 2]),
         ([20, 21, 22], [100, 101, 102], [110, 111, 112, 113, 114, 115, 2])]


def pair_batch(pairs) -> dict[str, torch.Tensor]:
    """A pair batch: chosen rows then rejected rows, right-padded with 0, labels only on the completions."""
    rows = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    length = max(len(p) + len(c) for p, c in rows)
    input_ids, labels = torch.zeros(len(rows), length, dtype=torch.long), torch.full((len(rows), length), IGNORE_INDEX)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        end = len(prompt) + len(completion)
        input_ids[i, :end], attention_mask[i, :end] = torch.tensor(prompt + completion), 1
        labels[i, len(prompt):end] = torch.tensor(completion)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "pair_index": torch.arange(len(pairs))}


def perturb_lora_b(model, scale: float = 0.05) -> None:
    """Stands in for training: lora_B starts at zero, where the adapter changes nothing."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def test_sequence_logps_from_hidden_states_equal_the_full_logits_path(mixtral_config):
    config = mixtral_config("lora.modules_to_save=[lm_head]")
    batch = pair_batch(PAIRS)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    chunked_model = build_model(config, seed=42)
    perturb_lora_b(chunked_model)
    full_model = copy.deepcopy(chunked_model)
    use_full_logits(full_model)
    row_weights = torch.linspace(0.5, 2.0, batch["labels"].shape[0])  # a different gradient for every row

    results = []
    for model in (chunked_model, full_model):
        _, sums, tokens = forward_with_sequence_logps(model, inputs, batch["labels"])
        (sums * row_weights).sum().backward()
        results.append((sums.detach(), tokens, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert lm_loss_is_chunked(chunked_model) is True and lm_loss_is_chunked(full_model) is False

    (sums, tokens, grads), (full_sums, full_tokens, full_grads) = results
    assert tokens.tolist() == full_tokens.tolist() == [len(c) for _, c, _ in PAIRS] + [len(r) for _, _, r in PAIRS]
    torch.testing.assert_close(sums, full_sums, rtol=1e-5, atol=1e-5)
    assert grads.keys() == full_grads.keys() and any("lm_head" in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_at_lora_init_the_dpo_loss_is_log_2_and_adapter_off_is_the_base_model(mixtral_config):
    config = mixtral_config("training.objective=dpo", "moe.use_auxiliary_loss=false")
    batch = pair_batch(PAIRS)
    policy = build_model(config, seed=42)
    base = FrozenCopy(build_base_model(config, seed=42).eval())  # the same seed gives the same weights

    parts = compute_losses(policy, batch, config, AdapterOff())
    assert torch.equal(parts.preference.loss_sum / parts.preference.pairs, torch.tensor(math.log(2)))
    assert parts.total.item() == pytest.approx(math.log(2), abs=1e-7)  # dpo_sft_weight 0, aux off: DPO alone
    assert torch.equal(parts.preference.chosen_rewards, torch.zeros(len(PAIRS)))

    perturb_lora_b(policy)  # the adapter moves the policy, never the reference
    _, policy_logps, _ = forward_with_sequence_logps(policy, {"input_ids": batch["input_ids"],
                                                              "attention_mask": batch["attention_mask"]}, batch["labels"])
    reference_logps = AdapterOff().logps(policy, batch)
    torch.testing.assert_close(reference_logps, base.logps(None, batch), rtol=0, atol=1e-5)
    assert (policy_logps.detach() - reference_logps).abs().max() > 1e-3


def test_the_step_objective_over_micro_batches_is_the_per_pair_mean(mixtral_config):
    config = mixtral_config("training.objective=dpo", "training.dpo_sft_weight=0.5", "moe.auxiliary_loss_weight=0.02")
    model = build_model(config, seed=42)
    perturb_lora_b(model)
    reference = AdapterOff()
    micro_batches = [pair_batch(PAIRS[:1]), pair_batch(PAIRS[1:])]  # 1 pair and 3 pairs
    step = sum(step_token_counts(batch) for batch in micro_batches)
    assert step.tolist() == [sum(len(c) for _, c, _ in PAIRS),
                             sum(2 * len(p) + len(c) + len(r) for p, c, r in PAIRS), len(PAIRS)]
    parts = [compute_losses(model, batch, config, reference) for batch in micro_batches]
    objective = sum(p.objective(step) for p in parts)

    whole = compute_losses(model, pair_batch(PAIRS), config, reference)
    per_pair, _, _ = dpo_losses(*whole_logps(model, reference), beta=config.training.dpo_beta)
    chosen_tokens = sum(len(c) for _, c, _ in PAIRS)
    expected = (per_pair.mean() + 0.5 * whole.lm_loss_sum / chosen_tokens
                + 0.02 * sum(p.aux_loss * p.routed_tokens / step[1] for p in parts))
    assert objective.item() == pytest.approx(expected.item(), rel=1e-5)
    # The preference part alone is the plain mean over the step's pairs, whatever the micro-batch sizes.
    assert sum(p.preference.loss_sum for p in parts).item() / len(PAIRS) == pytest.approx(per_pair.mean().item(), rel=1e-5)


def test_the_reference_forward_runs_before_the_policy_s_and_scores_the_same(mixtral_config):
    # Run first, the reference's forward adds its transient memory to nothing, not to the policy's activations that
    # backward keeps (it was the peak of a DPO step: docs/benchmarks.md); the rewards must not change.
    config = mixtral_config("training.objective=dpo", "moe.use_auxiliary_loss=false")
    model = build_model(config, seed=42)
    perturb_lora_b(model)
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append("policy" if torch.is_grad_enabled() else "reference"))
    parts = compute_losses(model, pair_batch(PAIRS), config, AdapterOff())
    assert forwards == ["reference", "policy"]

    chosen, rejected, ref_chosen, ref_rejected = whole_logps(model, AdapterOff())
    beta = config.training.dpo_beta
    torch.testing.assert_close(parts.preference.chosen_rewards, beta * (chosen - ref_chosen).detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(parts.preference.rejected_rewards, beta * (rejected - ref_rejected).detach(),
                               rtol=1e-6, atol=1e-6)
    assert (parts.preference.chosen_rewards.abs() > 1e-5).all()  # the perturbed adapter moved the policy


def whole_logps(model, reference):
    """(policy chosen, policy rejected, reference chosen, reference rejected) summed log-probabilities of PAIRS."""
    batch = pair_batch(PAIRS)
    _, logps, _ = forward_with_sequence_logps(model, {"input_ids": batch["input_ids"],
                                                      "attention_mask": batch["attention_mask"]}, batch["labels"])
    return (*logps.detach().chunk(2), *reference.logps(model, batch).chunk(2))
