"""The family matrix: every model type moetune supports, on a tiny random checkpoint written with
save_pretrained (the files a hub repository holds), goes through the same checks: detection, attention
LoRA with every expert frozen, expert LoRA through target_parameters, ESFT, the router saved and
reloaded bit-identical, the aux loss against transformers' own (or the family's formula), expert usage
against a reference computed from the router outputs, packing only where packed samples give the
logits each sample gives alone, a falling loss, and merging in the checkpoint's on-disk layout.
`moetune train` / `moetune eval` per router kind: tests/train/test_family_runs.py.

Adding a model type: its family module, its registry line (moetune.plugins) and its line in
:data:`MODEL_TYPES` below.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora.layer import ParamWrapper
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import moetune.models.families.mpt.modeling  # noqa: F401  (registers mpt_moe with the Auto classes)
from moetune.config import load_config
from moetune.errors import ConfigError
from moetune.models.families import FAMILY_NAMES, all_families, family_for_model_type, known_model_types, packs_by_position_ids
from moetune.models.layout import (
    find_moe_blocks,
    innermost_model,
    is_expert_parameter,
    is_shared_expert_parameter,
    shared_expert_paths,
)
from moetune.models.load.factory import build_base_model, build_model, resolve_family
from moetune.models.load.pretrained import causal_lm_class
from moetune.models.loss.objective import compute_losses
from moetune.models.routing.balance import sequence_balance_loss, switch_balance_loss
from moetune.models.routing.capture import expert_token_counts
from moetune.models.trainable.counts import trainable_parts
from moetune.models.trainable.esft import apply_esft_plan, expert_blocks, load_esft_artefact, merge_esft, save_esft

QKVO = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})
MLA = frozenset({"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"})

# model_type -> (the Linears the default attention LoRA lands on, whether its MoE blocks have shared experts).
MODEL_TYPES: dict[str, tuple[frozenset[str], bool]] = {
    "mixtral": (QKVO, False),
    "qwen2_moe": (QKVO, True),
    "qwen3_moe": (QKVO, False),
    "olmoe": (QKVO, False),
    "flex_olmo": (QKVO, False),
    "gpt_oss": (QKVO, False),
    "deepseek_v2": (frozenset({"q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}), True),  # V2-Lite: no q LoRA
    "deepseek_v3": (MLA, True),
    "deepseek_v32": (MLA, True),
    "glm4_moe": (QKVO, True),
    "glm4_moe_lite": (MLA, True),
    "dots1": (QKVO, True),
    "exaone_moe": (QKVO, True),
    "solar_open": (QKVO, True),
    "mistral4": (MLA, True),
    "hunyuan_v1_moe": (QKVO, True),
    "phimoe": (QKVO, False),
    "granitemoe": (QKVO, False),
    "granitemoeshared": (QKVO, True),
    "cohere2_moe": (QKVO, False),
    "ernie4_5_moe": (QKVO, True),
    "minimax_m2": (QKVO, False),
    "afmoe": (QKVO, True),
    "llama4_text": (QKVO, True),
    "gemma4_text": (QKVO, False),
    "qwen3_next": (QKVO | {"in_proj_qkvz", "in_proj_ba", "out_proj"}, True),
    "qwen3_5_moe_text": (QKVO | {"in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"}, True),
    "minimax": (QKVO | {"qkv_proj", "out_proj", "output_gate"}, False),
    "jamba": (QKVO | {"in_proj", "x_proj", "out_proj"}, False),
    "granitemoehybrid": (QKVO | {"in_proj"}, True),
    "lfm2_moe": (frozenset({"q_proj", "k_proj", "v_proj", "in_proj", "out_proj"}), False),
    "kimi_linear": (QKVO | {"kv_a_proj_with_mqa", "kv_b_proj"}, True),
    "nemotron_h": (QKVO | {"in_proj"}, True),
    "mpt": (frozenset({"Wqkv", "out_proj"}), False),
    "mpt_moe": (frozenset({"Wqkv", "out_proj"}), False),
}
MOE_TYPES = [t for t in MODEL_TYPES if t != "mpt"]
FUSED_TYPES = [t for t in MOE_TYPES if family_for_model_type(t).fused_experts]


def test_the_matrix_lists_every_model_type_and_each_has_one_family():
    assert sorted(MODEL_TYPES) == sorted(t for spec in all_families() for t in spec.model_types)
    assert set(known_model_types()) == set(MODEL_TYPES) | {t for spec in all_families() for t in spec.multimodal_types}
    model_types = [t for spec in all_families() for t in spec.model_types]
    assert len(model_types) == len(set(model_types))
    assert all(set(spec.tiny_configs) == set(spec.model_types) for spec in all_families())
    assert FAMILY_NAMES == tuple(sorted(spec.name for spec in all_families()))


def family_config(path: Path, *overrides: str):
    return load_config(None, [f"model.name={path}", "model.torch_dtype=float32", "model.max_seq_length=64",
                              "lora.r=4", "lora.lora_dropout=0.0", "moe.expert_training=frozen", *overrides])


def tokens(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def trainable(model) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def perturb_trainable(model, scale: float = 0.1) -> None:
    """Stands in for training: move every trainable tensor (LoRA B starts at zero)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * scale)


def owning_linear(name: str) -> str:
    """``q_proj`` for ``...self_attn.q_proj.lora_A.default.weight``."""
    return name.split(".lora_")[0].rsplit(".", 1)[-1]


# ------------------------------------------------------------------------------------------ detection


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_the_family_is_detected_from_config_json_and_its_facts_hold(checkpoint, tiny_model, model_type):
    config = family_config(checkpoint(model_type))
    spec = resolve_family(config.model)
    assert model_type in spec.model_types
    hf_config = AutoConfig.from_pretrained(checkpoint(model_type))
    assert hf_config.model_type == model_type
    assert spec.context_length(hf_config) == getattr(hf_config, spec.context_key) > 0
    model = tiny_model(model_type)
    if spec.packs_by_position_ids:  # where packs_by_position_ids starts: the forward takes position ids
        assert "position_ids" in inspect.signature(model.forward).parameters
    blocks = find_moe_blocks(model, spec.router_name)
    assert (len(blocks) > 0) == (model_type != "mpt")
    assert bool(shared_expert_paths(model, blocks, spec.shared_experts)) == MODEL_TYPES[model_type][1]
    dense = spec.dense_layers(hf_config)
    if dense:  # the dense FFN layers come first, then every layer is an MoE layer
        assert [int(re.search(r"\.(\d+)\.", block.path + ".").group(1)) for block in blocks][0] == dense


@pytest.mark.parametrize("model_type", ["jetmoe", "bert"])
def test_a_model_type_no_family_describes_is_refused_with_what_moetune_supports(tmp_path, model_type):
    # jetmoe is an MoE transformers implements and moetune leaves out: no generic path takes it.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(ConfigError, match=rf"is a '{model_type}' model, which moetune does not support; it supports "
                                          r"afmoe, cohere2_moe, deepseek_v2, .*qwen3_next, solar_open \(README"):
        resolve_family(family_config(tmp_path).model)


# ------------------------------------------------------------------------------------- what trains


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_attention_lora_lands_on_every_token_mixer_and_every_expert_is_frozen(checkpoint, model_type):
    model = build_model(family_config(checkpoint(model_type), "moe.freeze_router=true"), seed=42)
    names = trainable(model)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert {owning_linear(n) for n in names} == MODEL_TYPES[model_type][0]
    spec = family_for_model_type(model_type)
    experts = [p for n, p in model.named_parameters() if is_expert_parameter(n)]
    shared = [p for n, p in model.named_parameters() if is_shared_expert_parameter(n, spec.shared_experts)]
    assert bool(experts) == (model_type != "mpt") and bool(shared) == MODEL_TYPES[model_type][1]
    assert not any(p.requires_grad for p in experts + shared)
    parts = trainable_parts(model, find_moe_blocks(model, spec.router_name), spec)
    assert parts["attention"] == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0


def param_wrappers(model) -> dict[str, ParamWrapper]:
    """Every fused expert LoRA, by the parameter it adapts (``model.layers.0.mlp.experts.down_proj``)."""
    return {f"{name.replace('base_model.model.', '', 1).replace('.base_layer', '')}.{m.parameter_name}": m
            for name, m in model.named_modules() if isinstance(m, ParamWrapper) and ".experts" in name}


@pytest.mark.parametrize("model_type", FUSED_TYPES)
def test_expert_lora_and_a_trained_router_reload_bit_identical_and_merge_in_the_on_disk_layout(checkpoint, tmp_path,
                                                                                                model_type):
    spec = family_for_model_type(model_type)
    config = family_config(checkpoint(model_type), "moe.expert_training=lora", "moe.expert_lora.r=2",
                           "moe.freeze_router=false")
    model = build_model(config, seed=42)
    # AutoModelForCausalLM, or (Mistral 4, which it does not map) the class config.json names.
    auto = causal_lm_class(AutoConfig.from_pretrained(checkpoint(model_type)))
    assert (auto is AutoModelForCausalLM) == (model_type != "mistral4")
    base = auto.from_pretrained(checkpoint(model_type))
    shapes = {n: p.shape for n, p in base.named_parameters()}
    wrappers = param_wrappers(model)
    assert set(wrappers) == {n for n in shapes if is_expert_parameter(n) and len(shapes[n]) == 3
                             and n.rsplit(".", 1)[-1] in spec.expert_parameters} and wrappers
    for name, wrapper in wrappers.items():  # rank 2 per expert: A is (r*E, in), B (out, r*E)
        assert wrapper.num_experts == shapes[name][0] == 4
        assert wrapper.lora_A["default"].weight.shape == (2 * 4, wrapper.in_features)
        assert wrapper.lora_B["default"].weight.shape == (wrapper.out_features, 2 * 4)
        assert wrapper.get_delta_weight("default").shape == shapes[name]
    trained_routers = [n for n in trainable(model) if f".{spec.router_name}.modules_to_save.default." in n]
    assert trained_routers and not any(is_expert_parameter(n) and "lora_" not in n for n in trainable(model))

    perturb_trainable(model)
    model.eval()
    with torch.no_grad():
        expected = model(tokens()).logits
    model.save_pretrained(tmp_path / "adapter")
    # As resuming loads it: in inference mode PEFT computes some Mamba projections in another order (1e-7 apart).
    reloaded = PeftModel.from_pretrained(build_base_model(config, seed=42), tmp_path / "adapter", is_trainable=True)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(tokens()).logits, expected)  # router, attention and expert LoRA, bit for bit
        merged = model.merge_and_unload()
        # Float rounding only (1e-5 through a recurrent scan); a wrong delta or a flipped expert moves logits by 1e-2.
        assert torch.allclose(merged(tokens()).logits, expected, atol=1e-4)
    assert all(not torch.equal(p, dict(base.named_parameters())[n]) for n, p in merged.named_parameters() if n in wrappers)
    merged.save_pretrained(tmp_path / "merged")
    on_disk = set(load_file(checkpoint(model_type) / "model.safetensors"))
    assert set(load_file(tmp_path / "merged" / "model.safetensors")) == on_disk  # the checkpoint's own layout
    again = auto.from_pretrained(tmp_path / "merged").eval()
    assert again.config.model_type == model_type
    with torch.no_grad():
        assert torch.allclose(again(tokens()).logits, expected, atol=1e-4)


def expert_rows(model, blocks) -> dict[str, torch.Tensor]:
    """Every routed expert's weights, one entry per expert: {"<block>.<param>.<expert>": tensor}."""
    rows = {}
    for block in blocks:
        experts = block.module.experts
        if isinstance(experts, torch.nn.ModuleList):
            rows |= {f"{block.path}.{name}.{index}": param.detach().clone()
                     for index, expert in enumerate(experts) for name, param in expert.named_parameters()}
        else:
            rows |= {f"{block.path}.{name}.{index}": row.clone() for name, param in experts.named_parameters()
                     for index, row in enumerate(param.detach())}
    return rows


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_esft_trains_only_the_selected_experts_and_reloads_and_merges_exactly(tmp_path, tiny_model, model_type):
    model = tiny_model(model_type)
    blocks = expert_blocks(model)
    selection = [[0, 3]] + [[1]] * (len(blocks) - 1)
    (tmp_path / "experts.json").write_text(json.dumps({"selected": selection}))
    config = load_config(None, ["model.architecture=mixtral", "model.random_init=true", "lora.enabled=false",
                                "moe.expert_training=esft", f"moe.esft.experts={tmp_path / 'experts.json'}"])
    ids = tokens()
    with torch.no_grad():
        base_logits = model(ids).logits
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows_before = expert_rows(model, blocks)
    chosen = {key for key in rows_before for block, layer in zip(blocks, selection, strict=True)
              if key.startswith(f"{block.path}.") and int(key.rsplit(".", 1)[1]) in layer}
    apply_esft_plan(model, config, family_for_model_type(model_type))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base_logits)  # nothing trained yet: exactly the base
    # Gradients and optimizer state can only exist for the selected experts' weights, nothing more.
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable_params) == sum(rows_before[key].numel() for key in chosen) > 0
    optimizer = torch.optim.AdamW(trainable_params, lr=1e-2)
    model.train()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
    assert not torch.allclose(trained, base_logits)
    save_esft(model, tmp_path / "run")
    with torch.no_grad():
        assert torch.allclose(load_esft_artefact(tiny_model(model_type), tmp_path / "run")(ids).logits, trained, atol=1e-6)
        merged = merge_esft(model)
        assert torch.allclose(merged(ids).logits, trained, atol=1e-6)
    after = dict(merged.named_parameters())
    assert set(after) == set(before)  # merged back into the model's own parameter names
    assert all(torch.equal(p, after[n]) for n, p in before.items() if ".experts." not in n)  # router, attention untouched
    rows_after = expert_rows(merged, blocks)
    assert {key for key, row in rows_before.items() if not torch.equal(row, rows_after[key])} <= chosen


# ---------------------------------------------------------------------------------------- routing


def reference_choice(spec, hf_config, logits: torch.Tensor, block) -> torch.Tensor:
    """The experts each token goes to by the router's rule, from its logits (sorted per token)."""
    router, top_k = spec.router_of(hf_config), hf_config.num_experts_per_tok
    if router.correction_bias is None:
        return logits.float().topk(top_k, -1)[1].sort(-1)[0]  # softmax and sigmoid are monotone
    scores = torch.softmax(logits.float(), -1) if router.scores == "softmax" else torch.sigmoid(logits.float())
    scores = scores + block.get_buffer(router.correction_bias).reshape(-1) if router.correction_bias in dict(
        block.named_buffers()) else scores + block.get_parameter(router.correction_bias).reshape(-1)
    groups = getattr(hf_config, "n_group", 1) or 1
    if router.group_limited and groups > 1:
        per_group = scores.shape[-1] // groups
        best = scores.view(-1, groups, per_group).topk(min(2, per_group), -1)[0].sum(-1)
        keep = torch.zeros_like(best).scatter_(1, best.topk(hf_config.topk_group, -1)[1], 1).bool()
        scores = scores.masked_fill(~keep.repeat_interleave(per_group, 1), float("-inf"))
    return scores.topk(top_k, -1)[1].sort(-1)[0]


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_expert_usage_equals_the_routers_choice_and_sums_to_top_k(checkpoint, model_type):
    config = family_config(checkpoint(model_type), "lora.enabled=false")
    model = build_model(config, seed=42).eval()
    spec = family_for_model_type(model_type)
    ids = tokens()
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    with torch.no_grad():
        parts = compute_losses(model, {"input_ids": ids, "attention_mask": mask}, config)
    blocks = find_moe_blocks(innermost_model(model), spec.router_name)
    top_k = model.config.num_experts_per_tok
    assert len(parts.routing) == len(blocks) > 0
    for layer, block in zip(parts.routing, blocks, strict=True):
        assert torch.equal(layer.experts.sort(-1)[0], reference_choice(spec, model.config, layer.logits, block.module))
    counts = expert_token_counts(parts.routing, mask)
    reference = torch.stack([torch.bincount(layer.experts[mask.reshape(-1).bool()].reshape(-1), minlength=4).float()
                             for layer in parts.routing])
    assert torch.equal(counts, reference)
    assert counts.sum(-1).tolist() == [float(mask.sum() * top_k)] * len(blocks)
    if spec.router_of(model.config).correction_bias:  # the bias changed some choices: logits alone would miscount
        assert not torch.equal(parts.routing[0].experts.sort(-1)[0], parts.routing[0].logits.topk(top_k, -1)[1].sort(-1)[0])


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


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_the_aux_loss_is_transformers_own_where_it_has_one_else_the_routers_formula(checkpoint, model_type):
    config = family_config(checkpoint(model_type), "lora.enabled=false")
    model = build_model(config, seed=42).eval()
    router = family_for_model_type(model_type).router_of(model.config)
    ids = tokens()
    with torch.no_grad():
        parts = compute_losses(model, {"input_ids": ids}, config)
        theirs = model(input_ids=ids, output_router_logits=True)
    assert (getattr(theirs, "aux_loss", None) is not None) == router.transformers_aux_loss
    top_k = model.config.num_experts_per_tok
    if router.transformers_aux_loss:
        assert router.balance_loss is switch_balance_loss
        assert parts.aux_loss.item() == pytest.approx(theirs.aux_loss.item(), rel=1e-6)
    elif router.balance_loss is switch_balance_loss:
        expected = load_balancing_loss_func(parts.router_logits, parts.router_logits[0].shape[-1], top_k)
        assert parts.aux_loss.item() == pytest.approx(expected.item(), rel=1e-6)
    else:
        assert router.balance_loss is sequence_balance_loss
        expected = deepseek_sequence_loss(parts.router_logits, [r.experts for r in parts.routing], top_k,
                                          router.scores == "sigmoid")
        assert parts.aux_loss.item() == pytest.approx(expected.item(), rel=1e-6)


def samples_stay_apart(model) -> bool:
    """Two samples packed into one row with restarting position_ids and no mask: does the second one's
    output equal its output alone?"""
    if "position_ids" not in inspect.signature(innermost_model(model).forward).parameters:
        return False
    first = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(1))
    second = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None]
    with torch.no_grad():
        packed = model(input_ids=torch.cat([first, second], dim=1), position_ids=positions, use_cache=False).logits
        alone = model(input_ids=second, use_cache=False).logits
    return torch.allclose(packed[:, 7:], alone, atol=1e-5)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_rows_are_packed_exactly_where_packed_samples_give_the_logits_they_give_alone(checkpoint, model_type):
    model = build_model(family_config(checkpoint(model_type), "lora.enabled=false"), seed=42).eval()
    assert packs_by_position_ids(model) == samples_stay_apart(model)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_five_training_steps_lower_the_loss(checkpoint, model_type):
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


def test_merging_attention_lora_gives_the_adapters_logits_on_a_per_expert_model(checkpoint, tmp_path):
    # The fused families merge through the matrix above; MPT's upcycled experts are modules of their own.
    model = build_model(family_config(checkpoint("mpt_moe"), "moe.freeze_router=false"), seed=42)
    perturb_trainable(model)
    model.eval()
    with torch.no_grad():
        expected = model(tokens()).logits
        merged = model.merge_and_unload()
        assert torch.allclose(merged(tokens()).logits, expected, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert reloaded.config.model_type == "mpt_moe" and torch.allclose(reloaded(tokens()).logits, expected, atol=1e-5)
