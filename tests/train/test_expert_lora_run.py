"""`moetune train` with LoRA on the routed experts of a tiny Qwen3-MoE: the adapter holds expert weights."""

import json

from safetensors.torch import load_file

from moetune.cli import main

from .conftest import read_metrics

QWEN3 = ("{num_hidden_layers: 2, hidden_size: 64, intermediate_size: 128, moe_intermediate_size: 32, "
         "num_attention_heads: 4, num_key_value_heads: 2, num_experts: 4, num_experts_per_tok: 2, "
         "max_position_embeddings: 256}")


def test_train_with_expert_lora_saves_expert_weights_in_the_adapter(tiny_run):
    config, out = tiny_run
    assert main(["train", "--config", str(config), "model.architecture=qwen_moe", f"model.config_overrides={QWEN3}",
                 "moe.expert_training=lora", "moe.expert_lora.r=2", "moe.expert_lora.alpha=4", "lora.lora_dropout=0",
                 "training.max_steps=3", "training.save_steps=3", "training.eval_steps=3"]) == 0
    adapter = load_file(out / "adapter_model.safetensors")
    experts = {k: v for k, v in adapter.items() if ".mlp.experts." in k}
    # Both fused tensors of both layers, rank 2 for each of the 4 experts; lora_B has moved off zero.
    assert sorted(k.split("model.layers.")[1] for k in experts) == sorted(
        f"{layer}.mlp.experts.{part}lora_{ab}.weight" for layer in (0, 1) for part in ("", "base_layer.") for ab in "AB")
    assert all(v.shape[0 if ".lora_A." in k else 1] == 2 * 4 for k, v in experts.items())
    assert all(v.abs().sum() > 0 for k, v in experts.items() if ".lora_B." in k)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(adapter_config["target_parameters"]) == sorted(
        f"model.layers.{layer}.mlp.experts.{name}" for layer in (0, 1) for name in ("gate_up_proj", "down_proj"))
    assert set(adapter_config["rank_pattern"].values()) == {2}
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3]
