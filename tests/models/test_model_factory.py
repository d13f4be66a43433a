"""build_model: architecture choice, config_overrides checks, tokenizer vocab, kernels and fallbacks."""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import MixtralForCausalLM, MptForCausalLM, PreTrainedTokenizerFast

from moetune.errors import ConfigError, UserError
from moetune.models.load.dtypes import resolve_dtype
from moetune.models.load.factory import build_base_model, build_model, resolve_family


def tiny_tokenizer(size: int) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_misspelt_config_override_names_the_key_and_the_closest_one(mixtral_config, mpt_config):
    config = mixtral_config("model.config_overrides={num_hidden_layer: 2}")
    with pytest.raises(ConfigError) as err:
        build_model(config, seed=42)
    assert err.value.key == "model.config_overrides.num_hidden_layer"
    assert "model.config_overrides.num_hidden_layer is not a setting of MixtralConfig" in str(err.value)
    assert "Did you mean 'num_hidden_layers'?" in str(err.value)


def test_config_override_aliases_are_accepted(mixtral_config, mpt_config):
    # MPT calls it d_model; hidden_size is its attribute_map alias and must be accepted too.
    config = mpt_config("model.config_overrides={n_layers: 1, hidden_size: 32, n_heads: 2, vocab_size: 64}",
                        "lora.enabled=false")
    model = build_model(config, seed=42)
    assert model.config.d_model == 32 and model.config.n_layers == 1


def test_random_init_takes_vocab_size_and_special_ids_from_the_tokenizer(mixtral_config, mpt_config):
    tokenizer = tiny_tokenizer(200)
    model = build_model(mixtral_config("lora.enabled=false"), tokenizer=tokenizer, seed=42)
    assert isinstance(model, MixtralForCausalLM)
    assert model.config.vocab_size == 200 == model.get_input_embeddings().num_embeddings
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (0, 1, 2)


def test_tiny_mixtral_has_the_requested_shape_and_the_fastest_experts_kernel(mixtral_config, mpt_config, caplog):
    with caplog.at_level(logging.INFO, logger="moetune"):
        model = build_model(mixtral_config(), seed=42)
    base = model.get_base_model()
    assert base.config.num_hidden_layers == 2 and base.config.hidden_size == 64
    assert base.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 256, 64)
    fastest = "grouped_mm" if torch.cuda.is_available() else "eager"  # eager measured faster on CPU
    assert base.config._experts_implementation == fastest
    assert f"experts: {fastest} (fastest available)" in caplog.text


def test_experts_implementation_override_is_used_and_logged(mixtral_config, mpt_config, caplog):
    with caplog.at_level(logging.INFO, logger="moetune"):
        model = build_model(mixtral_config("model.experts_implementation=eager", "lora.enabled=false"), seed=42)
    assert model.config._experts_implementation == "eager"
    assert "experts: eager (set by model.experts_implementation)" in caplog.text


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_attention_falls_back_to_sdpa_with_one_warning(mixtral_config, mpt_config, caplog):
    with caplog.at_level(logging.WARNING, logger="moetune"):
        model = build_model(mixtral_config("model.attn_implementation=flash_attention_2", "lora.enabled=false"), seed=42)
    assert model.config._attn_implementation == "sdpa"
    warnings = [r for r in caplog.records if "flash_attention_2 is unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "using sdpa instead" in warnings[0].getMessage()


def test_architecture_is_read_from_config_json(mixtral_config, mpt_config, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    config = mixtral_config("model.architecture=null", "model.random_init=false", f"model.name={tmp_path}")
    assert resolve_family(config.model).name == "mixtral"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="is a 'bert' model, which moetune does not support; it supports afmoe, "):
        resolve_family(config.model)


def test_missing_model_path_is_a_user_error(mixtral_config, mpt_config, tmp_path):
    config = mixtral_config("model.random_init=false", f"model.name={tmp_path / 'nowhere'}")
    with pytest.raises(UserError, match="could not be loaded"):
        build_model(config, seed=42)


def test_loading_saved_weights_checks_the_architecture(mixtral_config, mpt_config, tmp_path):
    dense = build_model(mpt_config("lora.enabled=false"), seed=42)
    assert isinstance(dense, MptForCausalLM)
    dense.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="model.architecture is 'mixtral' but model.name .* is a 'mpt' model"):
        build_model(mixtral_config("model.random_init=false", f"model.name={tmp_path}"), seed=42)


def test_quantised_base_needs_lora(mixtral_config, mpt_config):
    with pytest.raises(UserError, match="set lora.enabled: true"):
        build_model(mixtral_config("model.load_in_4bit=true", "lora.enabled=false", "model.random_init=false"), seed=42)


def test_dense_mpt_without_lora_trains_everything(mixtral_config, mpt_config):
    model = build_model(mpt_config("lora.enabled=false"), seed=42)
    assert model.config.vocab_size == 128
    assert all(p.requires_grad for p in model.parameters())


def test_loaded_model_is_resized_to_a_larger_tokenizer(mixtral_config, mpt_config, tmp_path):
    build_model(mixtral_config("lora.enabled=false"), seed=42).save_pretrained(tmp_path)
    model = build_model(mixtral_config("model.random_init=false", f"model.name={tmp_path}", "lora.enabled=false"),
                        tokenizer=tiny_tokenizer(200), seed=42)
    assert model.get_input_embeddings().num_embeddings == 200 == model.get_output_embeddings().out_features


def test_aux_loss_weight_is_the_model_coefficient(mixtral_config, mpt_config):
    model = build_model(mixtral_config("moe.auxiliary_loss_weight=0.02", "lora.enabled=false"), seed=42)
    assert model.config.router_aux_loss_coef == 0.02 == model.router_aux_loss_coef
    upcycled = build_model(mpt_config("moe.upcycling.enabled=true", "moe.auxiliary_loss_weight=0.03", "lora.enabled=false"),
                           seed=42)
    assert upcycled.config.router_aux_loss_coef == 0.03


@pytest.mark.parametrize(("architecture", "key"), [("mixtral", "max_position_embeddings"), ("mpt", "max_seq_len")])
def test_training_rows_longer_than_the_model_context_are_a_config_error(mixtral_config, mpt_config, architecture, key):
    build = mixtral_config if architecture == "mixtral" else mpt_config
    build_model(build("model.max_seq_length=128"), seed=42)  # exactly the context fits
    with pytest.raises(ConfigError, match=rf"model.max_seq_length \(129\) is longer than the model's context "
                                          rf"\({key}: 128 in its config\)"):
        build_model(build("model.max_seq_length=129"), seed=42)


def test_the_seed_and_checkpointing_are_the_callers_not_the_training_sections(mpt_config, mixtral_config, tokens):
    upcycled = ("moe.upcycling.enabled=true", "moe.upcycling.expert_noise_std=0.01")
    one = build_base_model(mpt_config(*upcycled, "training.seed=1"), seed=5).state_dict()
    two = build_base_model(mpt_config(*upcycled, "training.seed=2"), seed=5).state_dict()
    other = build_base_model(mpt_config(*upcycled, "training.seed=1"), seed=6).state_dict()
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    router = "transformer.blocks.0.ffn.router.weight"  # random init, the new router and the expert noise follow the seed
    assert not torch.equal(one[router], other[router])
    assert not torch.equal(one["transformer.blocks.0.ffn.experts.1.up_proj.weight"],
                           other["transformer.blocks.0.ffn.experts.1.up_proj.weight"])

    def checkpointing(model) -> bool:
        return model.base_model.model.model.gradient_checkpointing

    assert not checkpointing(build_model(mixtral_config("training.gradient_checkpointing=true"), seed=0))
    assert checkpointing(build_model(mixtral_config(), seed=0, gradient_checkpointing=True))
    with pytest.raises(TypeError, match="seed"):
        build_model(mixtral_config())  # no default seed that could silently differ from the run's


def test_one_reading_of_dtype_names():
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype("float32") is torch.float32
    assert resolve_dtype("auto") == "auto"
