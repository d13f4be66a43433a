"""ESFT training plan on every family: only the selected experts train, the artefact holds only them,
and reloading or merging gives the trained model's logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import moetune.models.families.mpt.modeling  # noqa: F401  (registers mpt_moe with the Auto classes)
from moetune.config import load_config
from moetune.errors import ConfigError, UserError
from moetune.models.families import all_families, family_for_model_type
from moetune.models.trainable.esft import (
    SELECTION_FILE,
    WEIGHTS_FILE,
    apply_esft_plan,
    expert_blocks,
    load_esft,
    load_esft_artefact,
    merge_esft,
    save_esft,
)

MOE_TYPES = [t for spec in all_families() for t in spec.tiny_configs if t != "mpt"]


def tiny_model(model_type: str):
    spec = family_for_model_type(model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **spec.tiny_configs[model_type])).eval()


def esft_config(tmp_path, selection):
    path = tmp_path / "experts.json"
    path.write_text(json.dumps({"selected": selection}))
    return load_config(None, ["model.architecture=mixtral", "model.random_init=true", "lora.enabled=false",
                              "moe.expert_training=esft", f"moe.esft.experts={path}"])


def expert_tensors(model) -> dict[str, torch.Tensor]:
    """Every routed expert weight by name, per expert: {"<block>.<param>.<expert>": tensor}."""
    out = {}
    for block in expert_blocks(model):
        experts = block.module.experts
        if isinstance(experts, torch.nn.ModuleList):
            for index, expert in enumerate(experts):
                for name, param in expert.named_parameters():
                    out[f"{block.path}.{name}.{index}"] = param.detach().clone()
        else:
            for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
                if hasattr(experts, name):
                    for index, row in enumerate(getattr(experts, name).detach()):
                        out[f"{block.path}.{name}.{index}"] = row.clone()
    return out


def train_steps(model, tokens, steps=3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), optimizer


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_only_the_selected_experts_train_and_reload_exactly(model_type, tmp_path, tokens):
    model = tiny_model(model_type)
    blocks = expert_blocks(model)
    selection = [[0, 3]] + [[1]] * (len(blocks) - 1)
    config = esft_config(tmp_path, selection)
    base_logits = model(tokens).logits.detach()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    before_experts = expert_tensors(model)

    apply_esft_plan(model, config, family_for_model_type(model_type))
    assert torch.equal(model(tokens).logits, base_logits)  # nothing trained yet: exactly the base
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # Gradients and optimizer state can only exist for these: the selected experts' weights, nothing more.
    expected = sum(value.numel() for key, value in before_experts.items()
                   for block, layer in zip(blocks, selection, strict=True)
                   if key.startswith(block.path + ".") and int(key.rsplit(".", 1)[1]) in layer)
    assert sum(p.numel() for p in trainable.values()) == expected
    assert all(".experts." in name for name in trainable)

    trained, optimizer = train_steps(model, tokens)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in trainable.values()}
    trained_logits = trained(tokens).logits.detach()
    assert not torch.allclose(trained_logits, base_logits)

    save_esft(trained, tmp_path / "run")
    saved = load_file(str(tmp_path / "run" / WEIGHTS_FILE))
    assert json.loads((tmp_path / "run" / SELECTION_FILE).read_text())["selected"] == selection
    first = blocks[0].path
    if model_type == "mpt_moe":
        assert {k.split(".experts.")[1].split(".")[0] for k in saved if k.startswith(first)} == {"0", "3"}
    else:
        assert {k for k in saved if k.startswith(first)} == {f"{first}.experts.{n}" for n in
                                                            ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")
                                                            if hasattr(blocks[0].module.experts, n)}
        assert all(t.shape[0] == (2 if k.startswith(first + ".") else 1) for k, t in saved.items())

    reloaded = load_esft_artefact(tiny_model(model_type), tmp_path / "run")
    assert torch.allclose(reloaded(tokens).logits, trained_logits, atol=1e-6)
    merged = merge_esft(trained)
    assert torch.allclose(merged(tokens).logits, trained_logits, atol=1e-6)
    after = dict(merged.named_parameters())
    assert set(after) == set(before)  # merged back into the model's own parameter names
    after_experts = expert_tensors(merged)
    for block, layer in zip(blocks, selection, strict=True):
        for key, value in before_experts.items():
            if key.startswith(block.path + "."):
                changed = not torch.equal(value, after_experts[key])
                assert changed == (int(key.rsplit(".", 1)[1]) in layer), key
    for name, value in before.items():
        if ".experts." not in name:
            assert torch.equal(value, after[name]), name  # router, attention, embeddings untouched


def test_resume_loads_the_saved_experts_and_refuses_another_selection(tmp_path, tokens):
    model = tiny_model("qwen3_moe")
    apply_esft_plan(model, esft_config(tmp_path, [[0, 3], [2]]))
    train_steps(model, tokens, steps=1)
    save_esft(model, tmp_path / "ckpt")
    fresh = tiny_model("qwen3_moe")
    apply_esft_plan(fresh, esft_config(tmp_path, [[0, 3], [2]]))
    load_esft(fresh, tmp_path / "ckpt")
    assert torch.equal(fresh(tokens).logits, model(tokens).logits)
    other = tiny_model("qwen3_moe")
    apply_esft_plan(other, esft_config(tmp_path, [[0], [2]]))
    with pytest.raises(UserError, match=r"holds experts \[\[0, 3\], \[2\]\] but this run trains \[\[0\], \[2\]\]"):
        load_esft(other, tmp_path / "ckpt")


def test_a_selection_for_another_model_or_nothing_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="selects experts for 3 MoE layers but this model has 2"):
        apply_esft_plan(tiny_model("mixtral"), esft_config(tmp_path, [[0], [1], [2]]))
    with pytest.raises(ConfigError, match="selects expert 7 in model.layers.0.mlp, which has 4 experts"):
        apply_esft_plan(tiny_model("mixtral"), esft_config(tmp_path, [[7], [1]]))
    with pytest.raises(UserError, match="selects no expert in any layer"):
        apply_esft_plan(tiny_model("mixtral"), esft_config(tmp_path, [[], []]))


def test_config_requires_the_selection_and_no_lora():
    base = ["model.architecture=mixtral", "model.random_init=true", "moe.expert_training=esft"]
    with pytest.raises(ConfigError, match="moe.esft.experts must be the experts.json"):
        load_config(None, [*base, "lora.enabled=false"])
    with pytest.raises(ConfigError, match="takes lora.enabled: false"):
        load_config(None, [*base, "moe.esft.experts=e.json"])
