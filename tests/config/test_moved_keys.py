"""Keys that moved (the upcycling keys into moe.upcycling, the other flat moe keys into their groups); configs,
overrides and flags with the old names still load."""

import textwrap
from pathlib import Path

import pytest
import yaml

from moetune.config import dump_config, load_config
from moetune.config.moved_keys import MOVED_KEYS
from moetune.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted([*ROOT.glob("*.yaml"), *(ROOT / "configs").rglob("*.yaml")])

OLD = """\
model:
  architecture: mpt
moe:
  upcycle: true
  num_experts: 4
  top_k: 1
  upcycle_every: 2
  expert_noise_std: 0.01
  router_init_std: 0.03
  capacity_factor: 1.5
  router_jitter: 0.01
  auxiliary_loss_weight: 0.02
  expert_lora_r: 4
  expert_lora_alpha: 8
  esft_experts: experts.json
  train_shared_experts: true
  shared_expert_training: lora
  monitor_expert_usage: false
  log_expert_metrics: false
  starving_expert_share: 0.1
  dominant_expert_share: 0.9
  router_supervision_weight: 0.5
  label_to_expert: {payments: [1, 2]}
  backend: native
  expert_parallel_size: 2
"""
NEW = """\
model:
  architecture: mpt
moe:
  auxiliary_loss_weight: 0.02
  upcycling:
    enabled: true
    num_experts: 4
    top_k: 1
    every_n_blocks: 2
    expert_noise_std: 0.01
    router_init_std: 0.03
    capacity_factor: 1.5
    router_jitter: 0.01
  expert_lora: {r: 4, alpha: 8}
  esft: {experts: experts.json}
  shared_experts: {train: true, method: lora}
  monitor: {expert_usage: false, log_metrics: false, starving_expert_share: 0.1, dominant_expert_share: 0.9}
  router_supervision: {weight: 0.5, label_to_expert: {payments: [1, 2]}}
  expert_parallel: {backend: native, size: 2}
"""


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_a_config_with_the_old_keys_loads_as_the_new_ones_saying_so(tmp_path, capsys):
    new = load_config(write(tmp_path, NEW, "new.yaml"))
    assert capsys.readouterr().err == ""
    old = load_config(write(tmp_path, OLD, "old.yaml"))
    assert old == new
    assert (old.moe.upcycling.num_experts, old.moe.upcycling.every_n_blocks, old.moe.upcycling.capacity_factor) == (4, 2, 1.5)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(MOVED_KEYS)
    assert f"moetune: moe.num_experts is now moe.upcycling.num_experts ({tmp_path / 'old.yaml'}:5)" in lines[1]
    assert "moe.upcycle_every is now moe.upcycling.every_n_blocks" in lines[3]


def test_old_key_overrides_load_as_the_new_ones(capsys):
    old = load_config(None, ["moe.upcycle=true", "moe.num_experts=4", "moe.top_k=1", "moe.upcycle_every=2"])
    err = capsys.readouterr().err
    new = load_config(None, ["moe.upcycling.enabled=true", "moe.upcycling.num_experts=4", "moe.upcycling.top_k=1",
                             "moe.upcycling.every_n_blocks=2"])
    assert old == new and old.moe.upcycling.top_k == 1
    assert "moetune: moe.num_experts is now moe.upcycling.num_experts (override 'moe.num_experts=4')" in err
    assert err.count("\n") == 4
    # Inside a whole section given by an override, too.
    assert load_config(None, ["moe={num_experts: 4, top_k: 1, upcycle: true, upcycle_every: 2}"]) == new


def test_an_old_key_override_overrides_the_file_under_either_name(tmp_path):
    config = load_config(write(tmp_path, NEW), ["moe.num_experts=6"])
    assert config.moe.upcycling.num_experts == 6
    config = load_config(write(tmp_path, OLD), ["moe.upcycling.num_experts=6"])
    assert config.moe.upcycling.num_experts == 6


def test_both_names_with_different_values_is_an_error_naming_both(tmp_path):
    path = write(tmp_path, "moe:\n  num_experts: 4\n  upcycling:\n    num_experts: 6\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "moe.upcycling.num_experts"
    assert str(info.value) == (f"{path}:4: moe.upcycling.num_experts is 6, but moe.num_experts (its old name, at "
                               f"{path}:2) is 4; set it once, as moe.upcycling.num_experts.")
    with pytest.raises(ConfigError, match=r"override 'moe.upcycling.top_k=1' sets moe.upcycling.top_k to 1, but "
                                          r"override 'moe.top_k=2' set it to 2 under the name moe.top_k"):
        load_config(None, ["moe.top_k=2", "moe.upcycling.top_k=1"])
    # The same value under both names is merely redundant.
    same = write(tmp_path, "moe:\n  num_experts: 4\n  upcycling: {num_experts: 4}\n", "same.yaml")
    assert load_config(same).moe.upcycling.num_experts == 4


def test_an_error_in_an_old_key_points_at_its_line(tmp_path):
    path = write(tmp_path, "training:\n  seed: 1\nmoe:\n  top_k: 3\n")
    with pytest.raises(UserError) as info:
        load_config(path)
    assert str(info.value) == f"{path}:4: moe.upcycling.top_k must be 1 or 2, got 3."


def test_print_config_of_an_old_config_loads_back_equal_with_only_new_keys(tmp_path):
    config = load_config(write(tmp_path, OLD))
    dumped = dump_config(config)
    moe = yaml.safe_load(dumped)["moe"]
    assert not {old.split(".", 1)[1] for old in MOVED_KEYS} & set(moe)
    assert moe["upcycling"]["num_experts"] == 4
    assert load_config(write(tmp_path, dumped, "resolved.yaml")) == config


def test_a_model_key_users_bring_points_to_the_upcycling_section(tmp_path):
    with pytest.raises(UserError, match=r"unknown key 'moe.num_local_experts'. Did you mean moe.upcycling.num_experts\? "
                                        r"\(it belongs in another section\)"):
        load_config(write(tmp_path, "moe:\n  num_local_experts: 4\n"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_configs_use_only_the_new_keys(path):
    raw = yaml.safe_load(path.read_text()) or {}
    moe = raw.get("moe") or {}
    assert not [key for key in MOVED_KEYS if key.split(".", 1)[1] in moe]
    sweep_keys = [key for run in raw.get("runs", []) for key in run] + list(raw.get("grid", {}))
    assert not [key for key in sweep_keys if key in MOVED_KEYS]
