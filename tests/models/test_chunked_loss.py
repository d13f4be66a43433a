"""The chunked LM loss equals cross-entropy over the full float32 logits: sum, count and gradients
w.r.t. hidden states, lm_head weight and bias, for any chunk size, label smoothing, dtype and head."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, MixtralConfig, MixtralForCausalLM

from moetune.errors import UserError
from moetune.models.load import kernels
from moetune.models.loss import chunked as chunked_loss
from moetune.models.loss.chunked import chunked_causal_lm_loss, lm_loss_implementation, logit_options
from moetune.models.loss.lm_loss import causal_lm_loss

BATCH, LENGTH, HIDDEN, VOCAB = 2, 13, 16, 40  # 24 shifted positions, 21 of them labelled


def make_inputs(dtype=torch.float32, bias=True):
    hidden = torch.randn(BATCH, LENGTH, HIDDEN, dtype=dtype, requires_grad=True)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=bias, dtype=dtype)
    labels = torch.randint(0, VOCAB, (BATCH, LENGTH))
    labels[0, :4] = -100  # a prompt without loss: positions 0-2 predict nothing
    return hidden, head, labels


def reference_loss(hidden, head, labels, label_smoothing=0.0, logit_scale=None, softcap=None):
    """Today's computation: full logits, upcast to float32, F.cross_entropy(reduction="sum")."""
    logits = head(hidden).float()
    if logit_scale is not None:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return causal_lm_loss(logits, labels, label_smoothing, reduction="sum")


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("chunk_tokens", [1, 5, 7, 21, 1000])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_sum_count_and_gradients_equal_full_logits(chunk_tokens, label_smoothing):
    hidden, head, labels = make_inputs()
    params = [hidden, head.weight, head.bias]
    expected = reference_loss(hidden, head, labels, label_smoothing)
    expected_grads = grads(expected * 0.37, params)

    loss_sum, loss_tokens = chunked_causal_lm_loss(hidden, head, labels, label_smoothing=label_smoothing,
                                                   chunk_tokens=chunk_tokens)
    assert loss_sum.dtype == torch.float32 and loss_tokens.dtype == torch.int64
    assert loss_tokens.item() == 21 == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss_sum, expected, rtol=1e-5, atol=1e-5)
    # 0.37 stands for the caller's 1 / tokens: backward must scale by the incoming gradient.
    for ours, theirs in zip(grads(loss_sum * 0.37, params), expected_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("logit_scale", "softcap"), [(0.0625, None), (None, 5.0), (2.0, 3.0)])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_logit_scale_and_softcap_equal_full_logits(logit_scale, softcap, label_smoothing):
    hidden, head, labels = make_inputs()
    hidden.data *= 4  # large logits, so the softcap bends them
    params = [hidden, head.weight, head.bias]
    expected = reference_loss(hidden, head, labels, label_smoothing, logit_scale, softcap)
    loss_sum, _ = chunked_causal_lm_loss(hidden, head, labels, label_smoothing=label_smoothing, chunk_tokens=4,
                                         logit_scale=logit_scale, softcap=softcap)
    torch.testing.assert_close(loss_sum, expected, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(grads(loss_sum, params), grads(expected, params), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_all_labels_ignored_gives_zero_sum_count_and_gradients(label_smoothing):
    hidden, head, labels = make_inputs()
    labels[:] = -100
    loss_sum, loss_tokens = chunked_causal_lm_loss(hidden, head, labels, label_smoothing=label_smoothing)
    assert loss_sum.item() == 0.0 and loss_tokens.item() == 0
    for grad in grads(loss_sum, [hidden, head.weight, head.bias]):
        assert torch.isfinite(grad).all() and not grad.any()


def test_only_the_last_position_labelled_is_no_loss():
    """The label at position 0 is never predicted; the hidden state at T-1 predicts nothing."""
    hidden, head, labels = make_inputs()
    labels[:] = -100
    labels[:, 0] = 3
    loss_sum, loss_tokens = chunked_causal_lm_loss(hidden, head, labels)
    assert loss_tokens.item() == 0 and loss_sum.item() == 0.0


def test_bf16_inputs_match_a_bf16_logits_reference():
    hidden, head, labels = make_inputs(dtype=torch.bfloat16)
    params = [hidden, head.weight, head.bias]
    expected = reference_loss(hidden, head, labels, 0.1)
    loss_sum, loss_tokens = chunked_causal_lm_loss(hidden, head, labels, label_smoothing=0.1, chunk_tokens=6)
    assert loss_sum.dtype == torch.float32 and loss_tokens.item() == 21
    torch.testing.assert_close(loss_sum, expected, rtol=2e-3, atol=2e-2)
    for ours, theirs in zip(grads(loss_sum, params), grads(expected, params), strict=True):
        assert ours.dtype == theirs.dtype == torch.bfloat16
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=2e-2, atol=2e-2)


def test_under_autocast_logits_are_computed_in_the_autocast_dtype():
    hidden, head, labels = make_inputs()
    params = [hidden, head.weight, head.bias]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference_loss(hidden, head, labels)
        loss_sum, _ = chunked_causal_lm_loss(hidden, head, labels, chunk_tokens=8)
    float32_logits_loss = reference_loss(hidden, head, labels)
    torch.testing.assert_close(loss_sum, expected, rtol=1e-6, atol=1e-5)
    assert (loss_sum - float32_logits_loss).abs() > 1e-3
    for ours, theirs in zip(grads(loss_sum, params), grads(expected, params), strict=True):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2)


def test_frozen_lm_head_gets_no_gradient_and_a_bare_weight_works():
    hidden, head, labels = make_inputs(bias=False)
    head.weight.requires_grad_(False)
    expected = reference_loss(hidden, head, labels)
    loss_sum, _ = chunked_causal_lm_loss(hidden, head.weight, labels, chunk_tokens=5)
    loss_sum.backward()
    assert head.weight.grad is None
    torch.testing.assert_close(hidden.grad, grads(expected, [hidden])[0], rtol=1e-5, atol=1e-6)


def test_no_grad_gives_the_same_loss():
    hidden, head, labels = make_inputs()
    with torch.no_grad():
        loss_sum, _ = chunked_causal_lm_loss(hidden, head, labels, chunk_tokens=5)
    assert not loss_sum.requires_grad
    torch.testing.assert_close(loss_sum, reference_loss(hidden, head, labels).detach(), rtol=1e-5, atol=1e-5)


def tiny_mixtral() -> MixtralForCausalLM:
    config = MixtralConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=128,
                           max_position_embeddings=64)
    return MixtralForCausalLM(config)


def test_tiny_mixtral_hidden_states_and_lm_head_give_the_model_logits_loss():
    model = tiny_mixtral()
    tokens = torch.randint(0, 128, (2, 16))
    labels = tokens.clone()
    labels[1, :5] = -100
    trained = [model.model.layers[1].self_attn.q_proj.weight, model.lm_head.weight]

    expected = causal_lm_loss(model(input_ids=tokens).logits, labels, 0.1, reduction="sum")
    expected_grads = grads(expected, trained)
    hidden = model.model(input_ids=tokens).last_hidden_state
    loss_sum, loss_tokens = chunked_causal_lm_loss(hidden, model.lm_head, labels, label_smoothing=0.1,
                                                   chunk_tokens=7, **logit_options(model.config))
    assert loss_tokens.item() == 2 * 15 - 4
    torch.testing.assert_close(loss_sum, expected, rtol=1e-5, atol=1e-4)
    for ours, theirs in zip(grads(loss_sum, trained), expected_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("how", ["modules_to_save", "lora"])
def test_peft_wrapped_lm_head_trains_what_its_forward_uses(how):
    model = tiny_mixtral()
    if how == "lora":
        peft_config = LoraConfig(r=4, target_modules=["lm_head"], lora_dropout=0.0, init_lora_weights=False)
    else:
        peft_config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    model = get_peft_model(model, peft_config)
    head = model.base_model.model.lm_head
    trainable = [p for p in head.parameters() if p.requires_grad]
    assert trainable
    hidden = torch.randn(2, 10, 64, requires_grad=True)
    labels = torch.randint(0, 128, (2, 10))
    expected = causal_lm_loss(head(hidden), labels, reduction="sum")
    loss_sum, _ = chunked_causal_lm_loss(hidden, head, labels, chunk_tokens=6)
    torch.testing.assert_close(loss_sum, expected, rtol=1e-5, atol=1e-4)
    for ours, theirs in zip(grads(loss_sum, [hidden, *trainable]), grads(expected, [hidden, *trainable]), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_lora_dropout_on_lm_head_is_refused_in_training():
    model = get_peft_model(tiny_mixtral(), LoraConfig(r=4, target_modules=["lm_head"], lora_dropout=0.1))
    head = model.base_model.model.lm_head.train()
    with pytest.raises(UserError, match="lora_dropout=0.1"):
        chunked_causal_lm_loss(torch.randn(1, 4, 64), head, torch.zeros(1, 4, dtype=torch.long))


def test_an_lm_head_that_is_not_a_linear_is_refused():
    with pytest.raises(UserError, match="lm_head is a Sequential"):
        chunked_causal_lm_loss(torch.randn(1, 4, 8), torch.nn.Sequential(torch.nn.Linear(8, 8)),
                               torch.zeros(1, 4, dtype=torch.long))


def test_logit_options_follow_each_family():
    assert logit_options(AutoConfig.for_model("mixtral")) == {"logit_scale": None, "softcap": None}
    assert logit_options(AutoConfig.for_model("qwen3_moe")) == {"logit_scale": None, "softcap": None}
    assert logit_options(AutoConfig.for_model("cohere2_moe", logit_scale=0.125)) == \
        {"logit_scale": 0.125, "softcap": None}
    assert logit_options(AutoConfig.for_model("granitemoe", logits_scaling=8.0)) == \
        {"logit_scale": 0.125, "softcap": None}


def test_implementation_is_chunked_on_cpu_and_liger_on_a_gpu_that_has_it(monkeypatch):
    assert lm_loss_implementation("cpu") == "chunked"
    installed = types.ModuleType("liger_kernel")
    installed.__spec__ = importlib.machinery.ModuleSpec("liger_kernel", None)
    monkeypatch.setitem(sys.modules, "liger_kernel", installed)
    monkeypatch.setattr(kernels.torch.cuda, "is_available", lambda: True)
    assert lm_loss_implementation("cuda:0") == "liger_fused_linear_cross_entropy"
    assert lm_loss_implementation("cpu") == "chunked"
    monkeypatch.setattr(chunked_loss, "fused_linear_cross_entropy_available", lambda: False)
    assert lm_loss_implementation("cuda:0") == "chunked"
    with pytest.raises(ValueError, match="implementation must be one of"):
        chunked_causal_lm_loss(torch.randn(1, 4, 8), torch.randn(8, 8), torch.zeros(1, 4, dtype=torch.long),
                               implementation="fused")
