"""ESFT training plan: resuming from saved experts, and the selections that are refused. (Only the
selected experts train, reload and merge on every model type: the matrix in tests/models/test_families.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moetune.models.families.mpt.modeling  # noqa: F401  (registers mpt_moe with the Auto classes)
from moetune.config import load_config
from moetune.errors import ConfigError, UserError
from moetune.models.families import family_for_model_type
from moetune.models.trainable.esft import (
    apply_esft_plan,
    load_esft,
    save_esft,
)


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


def train_steps(model, tokens, steps=3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), optimizer


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
