"""An older deepspeed_moe_config.json "moe" block is read into moe.* by load_config, or rejected, never ignored."""

import json
from pathlib import Path

import pytest
import yaml

from moetune.cli import main
from moetune.config import load_config
from moetune.config.legacy_deepspeed import ENV_VAR, read_legacy_moe_block
from moetune.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[2]


def ds_file(tmp_path, moe, name="deepspeed_moe_config.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "moe": moe}, indent=2))
    return path


def line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


@pytest.fixture(autouse=True)
def _no_launch(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def test_the_block_becomes_the_moe_settings_it_names(tmp_path, capsys):
    path = ds_file(tmp_path, {"enabled": True, "num_experts": 8, "top_k": 2, "ep_size": 4, "capacity_factor": 1.25,
                              "moe_loss_coeff": 0.01, "upcycle_every": 2, "router_jitter_noise": 0.01})
    config = load_config(None, deepspeed_config=path)
    u = config.moe.upcycling
    assert (u.num_experts, u.top_k, u.every_n_blocks, u.capacity_factor, u.router_jitter) == (8, 2, 2, 1.25, 0.01)
    assert (config.moe.expert_parallel.size, config.moe.auxiliary_loss_weight) == (4, 0.01)
    assert config == load_config(None, ["moe.upcycling.num_experts=8", "moe.expert_parallel.size=4",
                                        "moe.upcycling.capacity_factor=1.25", "moe.auxiliary_loss_weight=0.01",
                                        "moe.upcycling.every_n_blocks=2", "moe.upcycling.router_jitter=0.01"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith('moetune: read moe.upcycling.num_experts=8, moe.upcycling.top_k=2, moe.expert_parallel.size=4, '
                          'moe.upcycling.capacity_factor=1.25, moe.auxiliary_loss_weight=0.01')
    assert f'from the "moe" block of {path}; move them to the moe section of the config.' in err


def test_the_file_accelerate_passes_is_read_by_default(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ENV_VAR, str(ds_file(tmp_path, {"num_experts": 4, "top_k": 1})))
    config = load_config(None)
    assert (config.moe.upcycling.num_experts, config.moe.upcycling.top_k) == (4, 1)
    assert 'read moe.upcycling.num_experts=4, moe.upcycling.top_k=1 from the "moe" block' in capsys.readouterr().err
    # As at train time: a launch whose file is gone reads nothing; a file named explicitly must exist.
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "gone.json"))
    assert load_config(None) == load_config(None, deepspeed_config=None)
    with pytest.raises(UserError, match="gone.json: no such DeepSpeed config file"):
        load_config(None, deepspeed_config=tmp_path / "gone.json")


def test_a_conflict_with_the_yaml_names_both_keys_and_lines(tmp_path):
    path = ds_file(tmp_path, {"num_experts": 4})
    config = tmp_path / "c.yaml"
    config.write_text("moe:\n  upcycling:\n    num_experts: 6\n")
    with pytest.raises(ConfigError) as info:
        load_config(config, deepspeed_config=path)
    assert info.value.key == "moe.upcycling.num_experts"
    assert str(info.value).startswith(
        f'{config}:3: moe.upcycling.num_experts is 6 in the config but 4 in the "moe" block of {path} '
        f'("num_experts" at {path}:{line_of(path, "num_experts")}); keep it in one place')
    with pytest.raises(ConfigError, match=r"override 'moe.upcycling.num_experts=6': moe.upcycling.num_experts is 6 in "
                                          r"the config but 4"):
        load_config(None, ["moe.upcycling.num_experts=6"], deepspeed_config=path)


def test_the_yaml_may_repeat_the_value_and_a_default_leaves_it_to_the_block(tmp_path):
    path = ds_file(tmp_path, {"num_experts": 4, "k": 1})
    repeated = load_config(None, ["moe.upcycling.num_experts=4"], deepspeed_config=path)
    defaulted = load_config(None, ["moe.upcycling.top_k=2"], deepspeed_config=path)  # 2 is the default
    assert (repeated.moe.upcycling.num_experts, defaulted.moe.upcycling.top_k) == (4, 1)


def test_a_bad_value_in_the_block_names_its_json_line(tmp_path):
    path = ds_file(tmp_path, {"num_experts": 8, "top_k": 3})
    with pytest.raises(UserError) as info:
        load_config(None, deepspeed_config=path)
    assert str(info.value) == f"{path}:{line_of(path, 'top_k')}: moe.upcycling.top_k must be 1 or 2, got 3."


@pytest.mark.parametrize("block, message", [
    ({"min_capacity": 4}, r"\"moe\".\"min_capacity\" is not supported .* live in the moe section of config.yaml"),
    ({"num_expert": 8}, r"\"moe\".\"num_expert\" is not a known MoE setting. MoE settings now live in the moe section"),
    ({"num_experts": 4, "use_rts": True}, r"\"moe\".\"use_rts\" is not supported"),
    ({"k": 1, "top_k": 2}, r"sets moe.upcycling.top_k twice with different values \(1 from \"k\" at .*:\d+, 2 from "),
])
def test_settings_without_a_home_are_rejected_with_their_line(tmp_path, block, message):
    path = ds_file(tmp_path, block)
    bad = list(block)[-1]
    with pytest.raises(UserError, match=message) as info:
        load_config(None, deepspeed_config=path)
    assert str(info.value).startswith(f"{path}:{line_of(path, bad)}: ")


def test_unreadable_files_are_user_errors(tmp_path):
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="bad.json is not valid JSON"):
        load_config(None, deepspeed_config=tmp_path / "bad.json")
    (tmp_path / "list.json").write_text('{"moe": [1, 2]}')
    with pytest.raises(UserError, match=r"list.json:1: \"moe\" must be an object of MoE settings, got list"):
        load_config(None, deepspeed_config=tmp_path / "list.json")


def test_a_tab_indented_file_still_names_lines(tmp_path):
    # Tabs are JSON whitespace, which PyYAML (reading the lines) refuses as indentation.
    path = tmp_path / "tabs.json"
    path.write_text('{\n\t"train_batch_size": "auto",\n\t"moe": {\n\t\t"num_experts": 4,\n\t\t"k": 1\n\t}\n}\n')
    assert [(s.key, s.value, s.location) for s in read_legacy_moe_block(path)] == [
        ("moe.upcycling.num_experts", 4, f"{path}:4"), ("moe.upcycling.top_k", 1, f"{path}:5")]


@pytest.mark.parametrize("name", ["deepspeed_moe_config.json", "configs/zero3.json"])
def test_the_shipped_deepspeed_files_have_no_legacy_block(name, capsys):
    assert read_legacy_moe_block(ROOT / name) == []
    assert load_config(None, deepspeed_config=ROOT / name) == load_config(None)
    assert capsys.readouterr().err == ""


def test_validate_and_print_config_show_what_the_launch_trains(tmp_path, capsys):
    path = ds_file(tmp_path, {"num_experts": 4, "top_k": 1})
    config = tmp_path / "c.yaml"
    config.write_text("model: {architecture: mpt}\nmoe:\n  upcycling: {enabled: true}\n")
    assert main(["print-config", "--config", str(config), "--deepspeed-config", str(path)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)["moe"]["upcycling"]
    assert (printed["enabled"], printed["num_experts"], printed["top_k"]) == (True, 4, 1)
    assert main(["validate", "--config", str(config), "--deepspeed-config", str(path), "moe.upcycling.num_experts=6"]) == 2
    err = capsys.readouterr().err
    assert "override 'moe.upcycling.num_experts=6': moe.upcycling.num_experts is 6 in the config but 4" in err
    assert f'("num_experts" at {path}:{line_of(path, "num_experts")})' in err and "Traceback" not in err
