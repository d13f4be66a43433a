"""LM, aux and z losses: equal to transformers' own, never double counted, and the aux-loss gradient
reaches the router with gradient checkpointing on."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from moetune.models.load.factory import build_model
from moetune.models.loss.lm_loss import lm_loss_is_chunked, mean_loss_and_perplexity, scored_token_count, use_full_logits
from moetune.models.loss.objective import compute_losses
from moetune.models.routing.balance import load_balancing_loss, router_z_loss
from moetune.models.routing.capture import LayerRouting, expert_token_counts


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_equals_transformers(top_k, masked):
    logits = tuple(torch.randn(2 * 7, 4) * 3 for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]]) if masked else None
    ours = load_balancing_loss(logits, num_experts=4, top_k=top_k, attention_mask=mask)
    theirs = load_balancing_loss_func(logits, 4, top_k, mask)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)


def test_balanced_routing_gives_top_k_and_z_loss_is_logsumexp_squared():
    uniform = (torch.zeros(8, 4),)
    # Uniform probabilities: P_e = 1/4; ties go to experts 0 and 1, so f = (1, 1, 0, 0) and the loss is 4 * 2/4 = 2.
    assert load_balancing_loss(uniform, 4, 2).item() == pytest.approx(2.0)
    logits = (torch.tensor([[0.0, 0.0], [1.0, 1.0]]),)
    expected = (torch.log(torch.tensor(2.0)) ** 2 + (1 + torch.log(torch.tensor(2.0))) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected.item())


def test_compute_losses_splits_hf_loss_without_double_counting(mixtral_config, tokens):
    config = mixtral_config("moe.auxiliary_loss_weight=0.25", "moe.router_z_loss_weight=0.1")
    model = build_model(config, seed=42).eval()
    parts = compute_losses(model, {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}, config)

    hf = model(input_ids=tokens, labels=tokens, output_router_logits=True)
    coef = model.config.router_aux_loss_coef
    assert parts.aux_loss.item() == pytest.approx(hf.aux_loss.item(), rel=1e-6)
    # HF's loss already holds coef * aux; the LM loss is what is left.
    assert parts.lm_loss.item() == pytest.approx(hf.loss.item() - coef * hf.aux_loss.item(), rel=1e-5)
    expected_total = parts.lm_loss + 0.25 * parts.aux_loss + 0.1 * parts.z_loss
    assert parts.total.item() == pytest.approx(expected_total.item(), rel=1e-6)
    assert len(parts.router_logits) == 2 and parts.router_logits[0].shape == (tokens.numel(), 4)


def test_aux_loss_off_leaves_the_total_equal_to_the_lm_loss(mixtral_config, tokens):
    config = mixtral_config("moe.use_auxiliary_loss=false", "moe.monitor.expert_usage=false")
    parts = compute_losses(build_model(config, seed=42), {"input_ids": tokens}, config)
    assert parts.router_logits == () and parts.aux_loss.item() == 0.0
    assert torch.equal(parts.total, parts.lm_loss)


def test_padding_is_left_out_of_the_lm_loss(mixtral_config, tokens):
    config = mixtral_config()
    model = build_model(config, seed=42).eval()
    mask = torch.ones_like(tokens)
    mask[:, -4:] = 0
    parts = compute_losses(model, {"input_ids": tokens, "attention_mask": mask}, config)
    labels = tokens.masked_fill(mask == 0, -100)
    assert parts.lm_loss.item() == pytest.approx(model(input_ids=tokens, attention_mask=mask, labels=labels).loss.item(),
                                                 rel=1e-5)


def router_aux_grads(config, tokens, gradient_checkpointing=False) -> tuple[list[torch.Tensor], bool]:
    """Gradients of the aux loss alone on each router, and whether checkpointing was on."""
    torch.manual_seed(3)
    model = build_model(config, seed=42, gradient_checkpointing=gradient_checkpointing)
    model.train()
    parts = compute_losses(model, {"input_ids": tokens}, config)
    parts.aux_loss.backward()
    grads = [p.grad.clone() for n, p in model.named_parameters() if ".mlp.gate.modules_to_save" in n]
    return grads, model.base_model.model.model.gradient_checkpointing


def test_aux_loss_gradient_reaches_the_router_with_gradient_checkpointing(mixtral_config, tokens):
    plain, _ = router_aux_grads(mixtral_config("moe.freeze_router=false"), tokens)
    checkpointed, on = router_aux_grads(mixtral_config("moe.freeze_router=false"), tokens, gradient_checkpointing=True)
    assert on
    assert len(checkpointed) == 2
    assert all(g.abs().sum() > 0 for g in checkpointed)
    for a, b in zip(plain, checkpointed, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_expert_token_counts_per_layer_come_from_the_chosen_experts():
    # The chosen experts, not the largest logits: a correction bias can pick another expert.
    logits = torch.zeros(2, 3)
    routing = (LayerRouting(logits, torch.tensor([[0], [1]]), torch.ones(2, 1)),
               LayerRouting(logits, torch.tensor([[2], [2]]), torch.ones(2, 1)))
    assert expert_token_counts(routing).tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 2.0]]
    assert expert_token_counts(routing, torch.tensor([[1, 0]])).tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]


def _trainable_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("family", ["mixtral", "mpt-upcycled"])
def test_the_lm_loss_from_hidden_states_equals_the_full_logits_loss(family, mixtral_config, mpt_config, tokens, caplog):
    # The trainer's loss never materialises the full logits; loss and gradients must not change.
    import logging

    make = mixtral_config if family == "mixtral" else lambda *o: mpt_config("moe.upcycling.enabled=true", *o)
    config = make("lora.modules_to_save=[lm_head]", "training.label_smoothing_factor=0.1")
    labels = tokens.clone()
    labels[0, :5] = -100  # a prompt that carries no loss
    batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": labels}
    chunked_model = build_model(config, seed=42)
    with caplog.at_level(logging.INFO, logger="moetune"):
        chunked = compute_losses(chunked_model, batch, config)
    assert lm_loss_is_chunked(chunked_model) is True
    assert "LM loss: chunked, from the final hidden states" in caplog.text
    chunked.total.backward()

    torch.manual_seed(0)
    full_model = build_model(config, seed=42)
    use_full_logits(full_model)
    full = compute_losses(full_model, batch, config)
    full.total.backward()

    assert chunked.lm_loss_sum.item() == pytest.approx(full.lm_loss_sum.item(), rel=1e-5)
    assert chunked.loss_tokens.item() == full.loss_tokens.item() == int((labels[:, 1:] != -100).sum())
    grads, expected = _trainable_grads(chunked_model), _trainable_grads(full_model)
    assert grads.keys() == expected.keys() and any("lm_head" in n for n in grads)
    for name, grad in grads.items():
        assert torch.allclose(grad, expected[name], rtol=1e-4, atol=1e-6), name


def test_validation_and_eval_share_one_per_token_mean_and_capped_perplexity():
    # The trainer's validation and `moetune eval` report these two numbers; one definition keeps them equal.
    assert mean_loss_and_perplexity(10.0, 4) == (2.5, pytest.approx(math.exp(2.5)))
    assert mean_loss_and_perplexity(0.0, 0) == (0.0, 1.0)  # no scored token: no division by zero
    loss, perplexity = mean_loss_and_perplexity(1e6, 10)  # a diverged model: huge, finite
    assert loss == 1e5 and perplexity == math.exp(50.0)
    labels = torch.tensor([[-100, 5, 6, -100], [7, -100, 8, 9]])
    assert int(scored_token_count(labels)) == 4  # the first position of a row is never scored
