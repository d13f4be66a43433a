"""Every model family on a tiny checkpoint written with save_pretrained (the files a hub repository
holds): detection, what trains, router save/reload, the family's own aux loss, expert usage from the
routers, five steps that lower the loss, and merging."""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM

import moetune.models.families.mpt.modeling  # noqa: F401  (registers mpt_moe with the Auto classes)
from moetune.config import load_config
from moetune.errors import ConfigError
from moetune.models.families import FAMILY_NAMES, all_families, family_for_model_type
from moetune.models.layout import innermost_model, is_expert_parameter, is_shared_expert_parameter
from moetune.models.load.factory import build_model, resolve_family
from moetune.models.loss.objective import compute_losses
from moetune.models.routing.balance import load_balancing_loss
from moetune.models.routing.capture import expert_token_counts

CASES = [(spec.name, model_type) for spec in all_families() for model_type in spec.tiny_configs]
MOE_CASES = [case for case in CASES if case[1] != "mpt"]
IDS = [model_type for _, model_type in CASES]
MOE_IDS = [model_type for _, model_type in MOE_CASES]

# The attention Linears LoRA must land on with the default lora.target_modules (q/k/v/o_proj).
ATTENTION = {
    "mixtral": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "qwen2_moe": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "qwen3_moe": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "olmoe": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "gpt_oss": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "glm4_moe": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "deepseek_v2": {"q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"},  # V2-Lite: no q LoRA
    "deepseek_v3": {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"},
    "mpt": {"Wqkv", "out_proj"},
    "mpt_moe": {"Wqkv", "out_proj"},
}


def tiny_model(model_type: str, seed: int = 0):
    spec = family_for_model_type(model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **spec.tiny_configs[model_type]))
    if spec.correction_bias is not None and spec.has_correction_bias(model_type):
        with torch.no_grad():  # a bias that changes the choice, so counting from logits alone would be wrong
            for name, buffer in model.named_buffers():
                if name.endswith(spec.correction_bias):
                    buffer.copy_(torch.tensor([0.3, -0.3, 0.2, -0.2]))
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """``checkpoint(model_type)`` -> folder of a tiny random checkpoint saved with save_pretrained."""
    root = tmp_path_factory.mktemp("families")
    made: dict[str, Path] = {}

    def make(model_type: str) -> Path:
        if model_type not in made:
            made[model_type] = root / model_type
            tiny_model(model_type).save_pretrained(made[model_type])
        return made[model_type]

    return make


def family_config(path: Path, *overrides: str):
    return load_config(None, [f"model.name={path}", "model.torch_dtype=float32", "model.max_seq_length=64",
                              "lora.r=4", "lora.lora_dropout=0.0", "moe.expert_training=frozen", *overrides])


def tokens(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def trainable(model) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def test_the_registry_is_the_family_modules_and_each_model_type_has_one_family():
    assert FAMILY_NAMES == ("deepseek", "gpt_oss", "mixtral", "mpt", "olmoe", "qwen_moe")
    model_types = [t for spec in all_families() for t in spec.model_types]
    assert len(model_types) == len(set(model_types))
    assert {t for spec in all_families() for t in spec.tiny_configs} == set(model_types)


@pytest.mark.parametrize(("family", "model_type"), CASES, ids=IDS)
def test_the_family_is_detected_from_config_json(checkpoint, family, model_type):
    config = family_config(checkpoint(model_type))
    assert resolve_family(config.model).name == family
    spec = family_for_model_type(model_type)
    hf_config = AutoConfig.from_pretrained(checkpoint(model_type))
    assert isinstance(getattr(hf_config, spec.context_key), int)
    forward = inspect.signature(tiny_model(model_type).forward).parameters
    assert ("position_ids" in forward) == spec.accepts_position_ids  # packs_by_position_ids starts from it
    assert spec.context_length(hf_config) == getattr(hf_config, spec.context_key)


def test_an_unknown_model_type_names_what_moetune_loads(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match=r"is a 'bert' model, which moetune does not know \(it loads deepseek_v2, "
                                          r"deepseek_v3, glm4_moe, gpt_oss, .*qwen3_moe\); set model.architecture"):
        resolve_family(family_config(tmp_path).model)


@pytest.mark.parametrize(("family", "model_type"), CASES, ids=IDS)
def test_lora_lands_on_attention_only_and_every_expert_is_frozen(checkpoint, family, model_type):
    model = build_model(family_config(checkpoint(model_type), "moe.freeze_router=true"), seed=42)
    names = trainable(model)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert {n.split(".")[-4] for n in names} == ATTENTION[model_type]
    shared = family_for_model_type(model_type).shared_experts
    experts = [(n, p) for n, p in model.named_parameters() if is_expert_parameter(n)]
    shared_params = [(n, p) for n, p in model.named_parameters() if is_shared_expert_parameter(n, shared)]
    assert (len(experts) > 0) == (model_type != "mpt")
    assert (len(shared_params) > 0) == (model_type in ("qwen2_moe", "deepseek_v2", "deepseek_v3", "glm4_moe"))
    assert not any(p.requires_grad for _, p in experts + shared_params)


@pytest.mark.parametrize(("family", "model_type"), MOE_CASES, ids=MOE_IDS)
def test_a_trained_router_is_saved_and_reloads_to_identical_logits(checkpoint, tmp_path, family, model_type):
    model = build_model(family_config(checkpoint(model_type), "moe.freeze_router=false"), seed=42)
    router = family_for_model_type(model_type).router_name
    with torch.no_grad():  # stands in for training: move every trainable tensor
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.5)
    model.eval()
    expected = model(tokens()).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoint(model_type)), tmp_path / "adapter")
    assert torch.equal(reloaded.eval()(tokens()).logits, expected)
    trained = [p for n, p in model.named_parameters() if f".{router}.modules_to_save.default." in n]
    assert trained and all(p.requires_grad for p in trained)


def hf_switch_aux_loss(model, ids):
    """transformers' own aux loss of the same forward (router_aux_loss_coef set apart)."""
    return model(input_ids=ids, output_router_logits=True).aux_loss


def deepseek_sequence_loss(router_logits, chosen, top_k: int, sigmoid: bool) -> torch.Tensor:
    """DeepSeek's balance loss written out per sequence and layer (V2 seq_aux; V3 eq. 17-20)."""
    total = 0.0
    for logits, experts in zip(router_logits, chosen, strict=True):
        batch, length = 2, logits.shape[0] // 2
        num_experts = logits.shape[-1]
        for row in range(batch):
            rows = slice(row * length, (row + 1) * length)
            if sigmoid:
                scores = torch.sigmoid(logits[rows].double())
                scores = scores / scores.sum(-1, keepdim=True)
            else:
                scores = torch.softmax(logits[rows].double(), -1)
            counts = torch.bincount(experts[rows].reshape(-1), minlength=num_experts).double()
            f = num_experts / (top_k * length) * counts
            total = total + (f * scores.mean(0)).sum() / batch
    return total


@pytest.mark.parametrize(("family", "model_type"), MOE_CASES, ids=MOE_IDS)
def test_the_aux_loss_is_the_family_definition_on_the_same_router_outputs(checkpoint, family, model_type):
    config = family_config(checkpoint(model_type), "lora.enabled=false")
    model = build_model(config, seed=42).eval()
    ids = tokens()
    with torch.no_grad():
        parts = compute_losses(model, {"input_ids": ids}, config)
    spec = family_for_model_type(model_type)
    if spec.balance_loss == "switch":
        assert parts.aux_loss.item() == pytest.approx(hf_switch_aux_loss(model, ids).item(), rel=1e-6)
    else:
        # transformers computes none for DeepSeek/GLM (aux_loss is None); the reference is DeepSeek's formula.
        assert getattr(model(input_ids=ids, output_router_logits=True), "aux_loss", None) is None
        expected = deepseek_sequence_loss(parts.router_logits, [r.experts for r in parts.routing],
                                          model.config.num_experts_per_tok, spec.uses_sigmoid(model_type))
        assert parts.aux_loss.item() == pytest.approx(expected.item(), rel=1e-6)
        assert parts.aux_loss.item() != pytest.approx(
            load_balancing_loss(parts.router_logits, 4, model.config.num_experts_per_tok).item(), rel=1e-3)


def reference_choice(model, model_type: str, logits: torch.Tensor, layer_router) -> torch.Tensor:
    """The experts each token goes to by the family's rule, from the router's logits (sorted per token)."""
    config, top_k = model.config, model.config.num_experts_per_tok
    if model_type in ("deepseek_v3", "glm4_moe"):
        scores = torch.sigmoid(logits.float()) + layer_router.e_score_correction_bias
        groups = scores.view(-1, config.n_group, 4 // config.n_group).topk(min(2, 4 // config.n_group), -1)[0].sum(-1)
        keep = torch.zeros_like(groups).scatter_(1, groups.topk(config.topk_group, -1)[1], 1).bool()
        scores = scores.masked_fill(~keep.repeat_interleave(4 // config.n_group, 1), float("-inf"))
        return scores.topk(top_k, -1)[1].sort(-1)[0]
    return logits.float().topk(top_k, -1)[1].sort(-1)[0]  # softmax is monotone: the largest logits win


@pytest.mark.parametrize(("family", "model_type"), MOE_CASES, ids=MOE_IDS)
def test_expert_usage_equals_the_routers_choice_and_sums_to_top_k(checkpoint, family, model_type):
    config = family_config(checkpoint(model_type), "lora.enabled=false")
    model = build_model(config, seed=42).eval()
    ids = tokens()
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    with torch.no_grad():
        parts = compute_losses(model, {"input_ids": ids, "attention_mask": mask}, config)
    spec = family_for_model_type(model_type)
    blocks = [m for m in innermost_model(model).modules() if hasattr(m, spec.router_name) and hasattr(m, "experts")]
    top_k = model.config.num_experts_per_tok
    assert len(parts.routing) == len(blocks) > 0
    for layer, block in zip(parts.routing, blocks, strict=True):
        expected = reference_choice(model, model_type, layer.logits, getattr(block, spec.router_name))
        assert torch.equal(layer.experts.sort(-1)[0], expected)
    counts = expert_token_counts(parts.routing, mask)
    reference = torch.stack([torch.bincount(layer.experts[mask.reshape(-1).bool()].reshape(-1), minlength=4).float()
                             for layer in parts.routing])
    assert torch.equal(counts, reference)
    assert counts.sum(-1).tolist() == [float(mask.sum() * top_k)] * len(blocks)
    if spec.has_correction_bias(model_type):  # the bias changed some choices: logits alone would miscount
        assert not torch.equal(parts.routing[0].experts.sort(-1)[0], parts.routing[0].logits.topk(top_k, -1)[1].sort(-1)[0])


@pytest.mark.parametrize(("family", "model_type"), CASES, ids=IDS)
def test_five_training_steps_lower_the_loss(checkpoint, family, model_type):
    config = family_config(checkpoint(model_type), "moe.freeze_router=false", "moe.auxiliary_loss_weight=0.01")
    model = build_model(config, seed=42).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = {"input_ids": tokens(batch=2, length=16)}
    losses = []
    for _ in range(5):
        parts = compute_losses(model, batch, config)
        parts.total.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(parts.total.item())
        assert (len(parts.routing) > 0) == (model_type != "mpt") and (parts.aux_loss.item() > 0) == (model_type != "mpt")
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(("family", "model_type"), CASES, ids=IDS)
def test_merging_gives_the_adapters_logits_and_reloads_with_auto_classes(checkpoint, tmp_path, family, model_type):
    model = build_model(family_config(checkpoint(model_type), "moe.freeze_router=false"), seed=42)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    model.eval()
    expected = model(tokens()).logits
    merged = model.merge_and_unload()
    assert torch.allclose(merged(tokens()).logits, expected, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert reloaded.config.model_type == model_type
    assert torch.allclose(reloaded(tokens()).logits, expected, atol=1e-5)


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
    with pytest.raises(ConfigError, match=rf"correction bias, which '{model_type}' models do not have"):
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


def test_the_readme_lists_every_family_and_model_type():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Supported model families", 1)[1].split("\n## ", 1)[0]
    for spec in all_families():
        row = next(line for line in section.splitlines() if line.startswith(f"| `{spec.name}` |"))
        assert all(model_type in row for model_type in spec.model_types), spec.name
