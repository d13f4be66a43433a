"""What only some families have, beyond the matrix of tests/models/test_families.py: gpt-oss's eager
attention and MXFP4 experts, aux-loss-free balancing by the router's correction bias, shared experts
that train, and the README's family table, generated from the specs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM

from moetune.config import load_config
from moetune.errors import ConfigError
from moetune.models.families import all_families, family_for_model_type
from moetune.models.layout import is_expert_parameter, is_shared_expert_parameter
from moetune.models.load.factory import build_model
from moetune.models.loss.objective import compute_losses
from moetune.models.routing.capture import expert_token_counts


def family_config(path: Path, *overrides: str):
    return load_config(None, [f"model.name={path}", "model.torch_dtype=float32", "model.max_seq_length=64",
                              "lora.r=4", "lora.lora_dropout=0.0", "moe.expert_training=frozen", *overrides])


def tokens(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def trainable(model) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]



def test_gpt_oss_runs_eager_attention_where_sdpa_is_asked_for(checkpoint, caplog):
    with caplog.at_level(logging.INFO, logger="moetune"):
        model = build_model(family_config(checkpoint("gpt_oss"), "model.attn_implementation=sdpa"), seed=42)
    assert model.config._attn_implementation == "eager"
    assert "model.attn_implementation=sdpa does not apply" in caplog.text
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("sinks"))


# ------------------------------------------------------------- aux-loss-free balancing, shared experts


@pytest.mark.parametrize("model_type", ["deepseek_v3", "glm4_moe"])
def test_the_bias_update_evens_out_a_forced_imbalance(checkpoint, model_type):
    from moetune.models.routing.balance import update_router_biases

    config = family_config(checkpoint(model_type), "lora.enabled=false", "moe.router_bias_update_rate=0.05")
    model = build_model(config, seed=42).eval()
    spec = family_for_model_type(model_type)
    router = [m for n, m in model.named_modules() if n.endswith(f"mlp.{spec.router_name}")][0]
    with torch.no_grad():  # every token goes to expert 0
        router.weight.mul_(20.0)
        router.e_score_correction_bias.copy_(torch.tensor([2.0, 0.0, 0.0, 0.0]))
    batch = {"input_ids": tokens(batch=4, length=16)}

    def load() -> torch.Tensor:
        with torch.no_grad():
            counts = expert_token_counts(compute_losses(model, batch, config).routing)
        return counts

    before = load()
    for _ in range(60):
        update_router_biases(model, spec, load(), config.moe.router_bias_update_rate)
    after = load()
    assert before[0, 0] == 64 and after[0, 0] < 48  # every token took expert 0; now most do not
    assert after.max() - after.min() < before.max() - before.min()
    assert router.e_score_correction_bias[0] < 2.0


def test_updated_biases_are_saved_with_the_adapter_and_reloaded(checkpoint, tmp_path):
    from moetune.models.routing.balance import update_router_biases

    config = family_config(checkpoint("deepseek_v3"), "moe.router_bias_update_rate=0.01", "moe.freeze_router=true")
    model = build_model(config, seed=42)
    spec = family_for_model_type("deepseek_v3")
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".mlp.gate." in n)  # weight stays frozen
    update_router_biases(model, spec, torch.tensor([[10.0, 0.0, 0.0, 6.0]]), 0.01)
    moved = {n: b.clone() for n, b in model.named_buffers() if n.endswith("modules_to_save.default.e_score_correction_bias")}
    assert len(moved) == 1 and torch.allclose(next(iter(moved.values())), torch.tensor([0.29, -0.29, 0.21, -0.21]))
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoint("deepseek_v3")),
                                         tmp_path / "adapter")
    assert all(torch.equal(dict(reloaded.named_buffers())[n], b) for n, b in moved.items())


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_the_bias_update_is_refused_for_routers_without_a_bias(checkpoint, model_type):
    with pytest.raises(ConfigError, match=rf"correction bias, which '{model_type}' models cannot do: they have none"):
        build_model(family_config(checkpoint(model_type), "moe.router_bias_update_rate=0.001"), seed=42)


@pytest.mark.parametrize("model_type", ["qwen2_moe", "deepseek_v2"])
def test_shared_experts_train_when_asked_and_are_saved_with_the_adapter(checkpoint, tmp_path, model_type):
    shared = family_for_model_type(model_type).shared_experts
    model = build_model(family_config(checkpoint(model_type), "moe.shared_experts.train=true"), seed=42)
    trained = [n for n in trainable(model) if is_shared_expert_parameter(n, shared)]
    assert trained and all(".modules_to_save.default." in n for n in trained)
    assert not any(p.requires_grad for n, p in model.named_parameters() if is_expert_parameter(n))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.5)
    model.eval()
    expected = model(tokens()).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoint(model_type)), tmp_path / "adapter")
    assert torch.equal(reloaded.eval()(tokens()).logits, expected)
    full = build_model(family_config(checkpoint(model_type), "moe.shared_experts.train=true", "lora.enabled=false"), seed=42)
    params = dict(full.named_parameters())
    assert all(params[n].requires_grad for n in params if is_shared_expert_parameter(n, shared))
    assert not any(params[n].requires_grad for n in params if is_expert_parameter(n))


# ------------------------------------------------------------------------ checkpoints as the hub ships them


def test_gpt_oss_mxfp4_experts_are_loaded_dequantised_to_bf16(checkpoint, tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    source = checkpoint("gpt_oss")
    state = load_file(source / "model.safetensors")
    lut = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
    expected = {}
    generator = torch.Generator().manual_seed(0)
    for key in [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, inner, outer = state.pop(key).shape  # stored (E, in, out); MXFP4 holds (E, out, in / 32, 16)
        nibbles = torch.randint(0, 16, (experts, outer, inner // 32, 32), generator=generator, dtype=torch.uint8)
        scales = torch.randint(125, 129, (experts, outer, inner // 32), generator=generator, dtype=torch.uint8)
        state[f"{key}_blocks"] = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
        state[f"{key}_scales"] = scales
        values = lut[nibbles.long()] * torch.exp2(scales.float() - 127)[..., None]
        expected[key] = values.reshape(experts, outer, inner).transpose(1, 2)
    folder = tmp_path / "gpt-oss-mxfp4"
    folder.mkdir()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                     "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="moetune"):
        model = build_model(family_config(folder, "model.torch_dtype=bfloat16"), seed=42)
    assert "experts are MXFP4, which cannot be trained; loading them dequantised to bf16" in caplog.text
    params = dict(model.named_parameters())
    for key, values in expected.items():
        loaded = params[f"base_model.model.{key}"]
        assert loaded.dtype == torch.bfloat16 and not loaded.requires_grad
        assert torch.equal(loaded.float(), values)  # FP4 x 2^k is exact in bf16
    assert torch.isfinite(model(tokens()).logits).all()


def test_the_readmes_family_table_is_the_one_the_specs_generate():
    from moetune.models.families._readme import END, START, render_family_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme.split(START, 1)[1].split(END, 1)[0]
    assert table.strip() == render_family_table().strip(), "run python scripts/update_config_reference.py"
    for spec in all_families():
        row = next(line for line in table.splitlines() if line.startswith(f"| `{spec.name}` |"))
        assert all(model_type in row for model_type in spec.model_types), spec.name


# A multimodal hub checkpoint's model_type -> a tiny vision tower for it, and attention Linears LoRA must reach.
MULTIMODAL = {
    "qwen3_5_moe": (dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64),
                    {"q_proj", "in_proj_qkv", "out_proj"}),
    "llama4": (dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1, image_size=28,
                    patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=64),
               {"q_proj", "k_proj", "v_proj", "o_proj"}),
}


@pytest.mark.parametrize("model_type", sorted(MULTIMODAL))
def test_a_multimodal_checkpoint_trains_its_language_model(tmp_path, model_type):
    from transformers import AutoModelForImageTextToText

    from moetune.models.families import family_of

    spec = family_for_model_type(model_type)
    text_type = spec.multimodal_types[model_type]
    vision, targets = MULTIMODAL[model_type]
    hf_config = AutoConfig.for_model(model_type, text_config=dict(spec.tiny_configs[text_type]), vision_config=vision)
    torch.manual_seed(0)
    vision_language = AutoModelForImageTextToText.from_config(hf_config).eval()
    vision_language.save_pretrained(tmp_path / model_type)
    if model_type == "llama4":  # the hub's value, which transformers 5.x's strict config refuses unless fixed
        written = json.loads((tmp_path / model_type / "config.json").read_text())
        written["text_config"]["attn_temperature_tuning"] = 4
        (tmp_path / model_type / "config.json").write_text(json.dumps(written))
    model = build_model(family_config(tmp_path / model_type), seed=42)
    assert family_of(model).name == spec.name and model.config.model_type == text_type
    assert not any("vision" in n or "visual" in n for n, _ in model.named_parameters())
    # The checkpoint's own language model, weight for weight (moetune runs the experts kernel fastest on CPU).
    with torch.no_grad(), model.disable_adapter():
        assert torch.allclose(model.eval()(tokens()).logits, vision_language(input_ids=tokens()).logits, atol=1e-5)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable(model)} >= targets


def test_every_moe_type_transformers_ships_is_supported_or_named_in_the_readme_as_left_out():
    import transformers
    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from moetune.models.families import known_model_types

    models = Path(transformers.__file__).parent / "models"
    shipped = set()
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        module = model_type_to_module_name(model_type)
        source = models / module / f"modeling_{module}.py"
        if source.is_file() and "self.experts = " in source.read_text():  # a routed-experts module
            shipped.add(model_type)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    left_out = readme.split("\nLeft out (refused", 1)[1].split("\n\n", 1)[0]
    missing = sorted(t for t in shipped - set(known_model_types()) if f"`{t}`" not in left_out)
    assert not missing, f"transformers ships MoE types the README neither supports nor leaves out: {missing}"
    assert len(set(known_model_types()) & shipped) >= 25
