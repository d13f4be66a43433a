"""An older deepspeed_moe_config.json "moe" block is read into moe.* or rejected, never ignored."""

import json

import pytest

from moetune.config import load_config
from moetune.errors import UserError
from moetune.train.setup import apply_legacy_deepspeed_moe


def ds_file(tmp_path, moe):
    path = tmp_path / "deepspeed_moe_config.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "moe": moe}))
    return path


def test_legacy_block_is_read_into_the_moe_section(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds_file(tmp_path, {"num_experts": 4, "top_k": 1})))
    config = apply_legacy_deepspeed_moe(load_config(None))
    assert (config.moe.num_experts, config.moe.top_k) == (4, 1)
    assert 'read moe.num_experts=4, moe.top_k=1 from the "moe" block' in capsys.readouterr().err


def test_a_conflict_with_the_config_names_both_values(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds_file(tmp_path, {"num_experts": 4})))
    with pytest.raises(UserError, match=r"moe.num_experts is 6 in the config but 4 in the \"moe\" block"):
        apply_legacy_deepspeed_moe(load_config(None, ["moe.num_experts=6"]))


def test_a_setting_without_an_equivalent_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds_file(tmp_path, {"num_experts": 4, "use_rts": True})))
    with pytest.raises(UserError, match="moe section of config.yaml"):
        apply_legacy_deepspeed_moe(load_config(None))


def test_the_shipped_deepspeed_files_have_no_legacy_block(monkeypatch):
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "deepspeed_moe_config.json")
    config = load_config(None)
    assert apply_legacy_deepspeed_moe(config) is config
