"""Routed and shared experts that train (moe.expert_training: lora | full, moe.shared_experts.method):
the expert LoRA's per-expert factors, full and shared-expert training, exact reloads, the
trainable-parameter split, and the errors that stand in for a run that would train nothing. (Expert
LoRA on every model type, with merging: the matrix in tests/models/test_families.py.)"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora.layer import ParamWrapper
from transformers import AutoConfig, AutoModelForCausalLM

from moetune.config import load_config
from moetune.errors import UserError
from moetune.models.families import family_for_model_type
from moetune.models.layout import is_expert_parameter, is_shared_expert_parameter
from moetune.models.load.factory import build_base_model, build_model
from moetune.models.trainable.plan import apply_training_plan

EXPERT_R, EXPERT_ALPHA, R, ALPHA = 2, 8.0, 4, 32.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """``checkpoint(model_type)`` -> folder of a tiny random checkpoint (save_pretrained)."""
    root = tmp_path_factory.mktemp("expert_lora")
    made = {}

    def make(model_type: str):
        if model_type not in made:
            spec = family_for_model_type(model_type)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **spec.tiny_configs[model_type]))
            made[model_type] = root / model_type
            model.save_pretrained(made[model_type])
        return made[model_type]

    return make


def config_for(path, *overrides: str):
    return load_config(None, [f"model.name={path}", "model.torch_dtype=float32", "model.max_seq_length=64",
                              f"lora.r={R}", f"lora.lora_alpha={ALPHA}", "lora.lora_dropout=0.0", *overrides])


def expert_lora_config(path, *overrides: str):
    return config_for(path, "moe.expert_training=lora", f"moe.expert_lora.r={EXPERT_R}",
                      f"moe.expert_lora.alpha={EXPERT_ALPHA}", *overrides)


def tokens() -> torch.Tensor:
    return torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def perturb_trainable(model, scale: float = 0.1) -> None:
    """Stands in for training: move every trainable tensor (LoRA B starts at zero)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * scale)


def param_wrappers(model) -> dict[str, ParamWrapper]:
    """Every fused expert LoRA, by the parameter it adapts (``model.layers.0.mlp.experts.down_proj``)."""
    return {f"{name.replace('base_model.model.', '', 1).replace('.base_layer', '')}.{m.parameter_name}": m
            for name, m in model.named_modules() if isinstance(m, ParamWrapper) and ".experts" in name}


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_full_experts_train_every_expert_weight_and_reload_exactly(checkpoint, tmp_path, model_type):
    spec = family_for_model_type(model_type)
    config = config_for(checkpoint(model_type), "moe.expert_training=full")
    model = build_model(config, seed=42)
    trained = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad and is_expert_parameter(n)}
    assert trained == set(spec.expert_parameters)  # weights and, on gpt-oss, biases
    assert all(".modules_to_save.default." in n for n, p in model.named_parameters()
               if p.requires_grad and is_expert_parameter(n))
    assert not any(p.requires_grad for n, p in model.named_parameters() if f".mlp.{spec.router_name}." in n)
    perturb_trainable(model, scale=0.05)
    model.eval()
    with torch.no_grad():
        expected = model(tokens()).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(build_base_model(config, seed=42), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(tokens()).logits, expected)
        assert torch.allclose(model.merge_and_unload()(tokens()).logits, expected, atol=1e-5)


@pytest.mark.parametrize("model_type", ["qwen2_moe", "deepseek_v3", "glm4_moe"])
def test_shared_experts_take_lora_without_touching_the_routed_experts(checkpoint, tmp_path, model_type):
    shared = family_for_model_type(model_type).shared_experts
    config = config_for(checkpoint(model_type), "moe.shared_experts.train=true", "moe.shared_experts.method=lora")
    model = build_model(config, seed=42)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shared_lora = [n for n in names if is_shared_expert_parameter(n, shared)]
    assert shared_lora and all(".lora_A." in n or ".lora_B." in n for n in shared_lora)
    # down_proj / gate_proj / up_proj of the shared experts only: PEFT's v4 name conversion would
    # otherwise move them onto the routed experts' fused tensors.
    assert {n.split(".")[-4] for n in shared_lora} >= {"gate_proj", "up_proj", "down_proj"}
    assert not any(is_expert_parameter(n) for n in names)
    perturb_trainable(model)
    model.eval()
    with torch.no_grad():
        expected = model(tokens()).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(build_base_model(config, seed=42), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(tokens()).logits, expected)
        assert torch.allclose(model.merge_and_unload()(tokens()).logits, expected, atol=1e-5)


def test_without_lora_full_routed_experts_train_and_the_shared_ones_stay_frozen(checkpoint):
    # lora.enabled: false trains the model itself; moe.train_shared_experts: false freezes only the shared experts.
    shared = family_for_model_type("qwen2_moe").shared_experts
    model = build_model(config_for(checkpoint("qwen2_moe"), "lora.enabled=false", "moe.expert_training=full"), seed=42)
    params = dict(model.named_parameters())
    shared_names = [n for n in params if is_shared_expert_parameter(n, shared)]
    routed_names = [n for n in params if is_expert_parameter(n)]
    assert shared_names and routed_names
    assert not any(params[n].requires_grad for n in shared_names)
    assert all(params[n].requires_grad for n in routed_names)
    assert params["model.embed_tokens.weight"].requires_grad


def test_the_trainable_line_splits_attention_router_experts_and_shared_experts(checkpoint, caplog):
    with caplog.at_level(logging.INFO, logger="moetune"):
        build_model(expert_lora_config(checkpoint("qwen2_moe"), "moe.freeze_router=false", "moe.shared_experts.train=true"),
                    seed=42)
    hidden, inter, shared_inter, experts, layers = 64, 32, 64, 4, 2
    q, kv = 4 * 16, 2 * 16  # qwen2_moe tiny: 4 heads, 2 kv heads, head_dim 16
    attention = layers * R * ((hidden + q) + 2 * (hidden + kv) + (q + hidden))
    routed = layers * EXPERT_R * experts * ((hidden + 2 * inter) + (inter + hidden))
    shared = layers * (3 * hidden * shared_inter + hidden)  # in full: gate/up/down_proj (no bias) + gate (H -> 1)
    router = layers * experts * hidden
    assert (f"trainable by part: attention {attention:,} | router {router:,} | experts {routed:,} | "
            f"shared experts {shared:,} | other 0") in caplog.text


def test_expert_training_stays_frozen_by_default_for_pretrained_models(checkpoint):
    model = build_model(config_for(checkpoint("qwen3_moe")), seed=42)
    assert not any(p.requires_grad for n, p in model.named_parameters() if is_expert_parameter(n))


def test_expert_lora_that_matches_no_expert_parameter_is_an_error_naming_the_experts(checkpoint):
    config = config_for(checkpoint("qwen3_moe"), "moe.expert_training=lora", "lora.exclude_modules=[gate_up_proj, down_proj]")
    with pytest.raises(UserError, match=r"no expert parameter matched: the qwen_moe family names "
                                        r"\['gate_up_proj', 'down_proj'\] and lora.exclude_modules is "
                                        r"\['gate_up_proj', 'down_proj'\], while this model's experts "
                                        r"\(model.layers.0.mlp.experts, one of 2 MoE blocks\) hold "
                                        r"\['gate_up_proj \(4, 64, 64\)', 'down_proj \(4, 64, 32\)'\]"):
        build_model(config, seed=42)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_a_family_whose_expert_names_match_nothing_cannot_train_nothing(checkpoint, mode):
    config = config_for(checkpoint("qwen3_moe"), f"moe.expert_training={mode}")
    family = dataclasses.replace(family_for_model_type("qwen3_moe"), expert_parameters=("w1", "w2"))
    with pytest.raises(UserError, match=r"no expert parameter matched: the qwen_moe family names \['w1', 'w2'\], "
                                        r"while this model's experts \(model.layers.0.mlp.experts, one of 2 MoE "
                                        r"blocks\) hold \['gate_up_proj \(4, 64, 64\)', 'down_proj \(4, 64, 32\)'\]"):
        apply_training_plan(build_base_model(config, seed=42), config, family=family)


def test_expert_lora_with_dropout_is_refused_before_peft_sees_it(checkpoint):
    with pytest.raises(UserError, match=r"LoRA on expert parameters \(model.layers.0.mlp.experts.gate_up_proj, \.\.\.\) "
                                        r"cannot be combined with dropout .* set lora.lora_dropout: 0 \(it is 0.05\)"):
        build_model(expert_lora_config(checkpoint("qwen3_moe"), "lora.lora_dropout=0.05"), seed=42)


@pytest.mark.parametrize(("model_type", "overrides"), [
    ("qwen3_moe", ("moe.expert_training=lora", f"moe.expert_lora.r={EXPERT_R}")),
    ("deepseek_v2", ("moe.expert_training=full", "moe.shared_experts.train=true", "moe.shared_experts.method=lora")),
], ids=["qwen3_moe-lora", "deepseek_v2-full-shared-lora"])
def test_a_checkpoint_loads_back_into_a_rebuilt_model_for_resuming(checkpoint, tmp_path, model_type, overrides):
    from moetune.models.trainable.weights import load_trainable_weights

    config = config_for(checkpoint(model_type), *overrides)
    model = build_model(config, seed=42)
    perturb_trainable(model, scale=0.05)
    model.eval()
    with torch.no_grad():
        expected = model(tokens()).logits
    model.save_pretrained(tmp_path / "checkpoint-3")
    resumed = build_model(config, seed=42)
    load_trainable_weights(resumed, tmp_path / "checkpoint-3")
    with torch.no_grad():
        assert torch.equal(resumed.eval()(tokens()).logits, expected)
