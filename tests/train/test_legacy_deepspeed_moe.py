"""A run launched with an older DeepSpeed JSON trains the experts its "moe" block names.

accelerate hands every process of a launch the DeepSpeed file as ACCELERATE_DEEPSPEED_CONFIG_FILE;
`moetune train` loads its config with that block (tests/config/test_legacy_deepspeed.py tests the
reading), so the run, its saved config.yaml and `moetune print-config --deepspeed-config` agree.
"""

import json

import yaml

from moetune.cli import main

from .conftest import read_metrics

MPT = "{d_model: 64, n_heads: 4, n_layers: 2, expansion_ratio: 2, max_seq_len: 256}"


def test_a_launch_trains_the_experts_of_the_deepspeed_moe_block(tiny_run, tmp_path, monkeypatch, capsys):
    config, out = tiny_run
    ds = tmp_path / "deepspeed_moe_config.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": "auto",
                              "moe": {"enabled": True, "num_experts": 3, "k": 1}}))
    overrides = ["model.architecture=mpt", f"model.config_overrides={MPT}", "moe.upcycling.enabled=true",
                 "lora.target_modules=[Wqkv, out_proj]", "lora.modules_to_save=[wte]", "training.max_steps=2",
                 "training.save_steps=2", "training.eval_steps=2"]
    assert main(["print-config", "--config", str(config), "--deepspeed-config", str(ds), *overrides]) == 0
    planned = yaml.safe_load(capsys.readouterr().out)

    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds))
    assert main(["train", "--config", str(config), *overrides]) == 0
    err = capsys.readouterr().err
    assert 'read moe.upcycling.num_experts=3, moe.upcycling.top_k=1 from the "moe" block' in err
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved == planned
    assert (saved["moe"]["upcycling"]["num_experts"], saved["moe"]["upcycling"]["top_k"]) == (3, 1)
    usage = [r["expert_usage"] for r in read_metrics(out) if "expert_usage" in r]
    assert usage and all(len(layer) == 3 for step in usage for layer in step)
