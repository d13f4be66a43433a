"""One process through DeepSpeed ZeRO-2 and ZeRO-3 on CPU, by the same code path as a multi-GPU launch.

DeepSpeed is the optional `deepspeed` extra (scripts/setup.sh installs it); its first use builds an
op (about 20-45 s, cached afterwards).
"""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import AutoTokenizer

from moetune.config import load_config
from moetune.models.load.factory import build_model
from moetune.models.trainable.counts import count_parameters

from ..conftest import free_port
from .conftest import read_metrics

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="the optional deepspeed extra is not installed")


def launch(config: Path, tmp_path: Path, ds_config: str, *overrides: str) -> subprocess.CompletedProcess:
    """`accelerate launch` one CPU process of `moetune train` under DeepSpeed, as the shipped configs set it."""
    stage = json.loads((ROOT / ds_config).read_text())["zero_optimization"]["stage"]
    accelerate_config = tmp_path / "accelerate.yaml"
    accelerate_config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
        f"deepspeed_config:\n  deepspeed_config_file: {ROOT / ds_config}\n"
        f"  zero3_init_flag: {'true' if stage == 3 else 'false'}\n"  # as configs/accelerate/zero3.yaml ships
        "machine_rank: 0\nnum_machines: 1\nnum_processes: 1\nuse_cpu: false\n")
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
                             "--main_process_port", str(free_port()), "-m", "moetune", "train", "--config", str(config),
                             *overrides], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def logged_parameter_counts(stderr: str) -> tuple[int, int]:
    found = re.search(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+)", stderr)
    return int(found[1].replace(",", "")), int(found[2].replace(",", ""))


def counted_in_one_process(config: Path, out: Path, *overrides: str) -> tuple[int, int]:
    """The parameter counts of the same model built without DeepSpeed (nothing partitioned)."""
    run = load_config(config, list(overrides))
    model = build_model(run, AutoTokenizer.from_pretrained(out / "tokenizer"), seed=run.training.seed,
                        gradient_checkpointing=run.training.gradient_checkpointing)
    return count_parameters(model)


@pytest.mark.parametrize(("ds_config", "stage"), [("deepspeed_moe_config.json", 2), ("configs/zero3.json", 3)])
def test_deepspeed_zero_on_cpu_trains_logs_and_saves_a_peft_adapter(tiny_run, tmp_path, ds_config, stage):
    config, out = tiny_run
    result = launch(config, tmp_path, ds_config,
                    "training.max_steps=4", "training.save_steps=4", "training.eval_steps=4")
    train = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(r["aux_loss"] > 1.0 and len(r["expert_usage"]) == 2 for r in train)
    assert (out / "checkpoint-4" / "pytorch_model").is_dir()  # the engine's own (optimizer) state
    adapter = load_file(out / "checkpoint-4" / "adapter_model.safetensors")
    lora_a = [v for k, v in adapter.items() if "q_proj.lora_A" in k]
    assert len(lora_a) == 2 and all(tuple(v.shape) == (8, 64) for v in lora_a)  # gathered, not ZeRO-3 shards
    # Under ZeRO-3 the weights load partitioned (zero3_init_flag); the logged counts are still the whole model's.
    assert logged_parameter_counts(result.stderr) == counted_in_one_process(config, out)
    if stage == 3:
        assert "ZeRO-3: MoE blocks gathered whole as leaf modules: MixtralSparseMoeBlock" in result.stderr


def test_zero3_upcycles_a_partitioned_dense_mpt_and_trains_it(tiny_run, tmp_path):
    # Each process loads only its shard of the dense weights; upcycling gathers them to copy whole FFNs.
    config, out = tiny_run
    mpt = ["model.architecture=mpt", "model.config_overrides={d_model: 64, n_heads: 4, n_layers: 2, max_seq_len: 128}",
           "moe.upcycling.enabled=true", "moe.upcycling.num_experts=4", "lora.target_modules=[Wqkv, out_proj]",
           "lora.modules_to_save=[]"]
    result = launch(config, tmp_path, "configs/zero3.json", *mpt, "training.max_steps=2", "training.eval_steps=2")
    assert "upcycled 2 of 2 MPT blocks into 4 experts each" in result.stderr
    assert "ZeRO-3: MoE blocks gathered whole as leaf modules: MoeFeedForward" in result.stderr
    train = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in train] == [1, 2] and all(r["aux_loss"] > 1.0 for r in train)
    assert logged_parameter_counts(result.stderr) == counted_in_one_process(config, out, *mpt)
    adapter = load_file(out / "adapter_model.safetensors")
    assert tuple(adapter["base_model.model.transformer.blocks.0.ffn.experts.3.up_proj.weight"].shape) == (256, 64)


@pytest.mark.parametrize(("ds_config", "stage", "offloaded"),
                         [("deepspeed_moe_config.json", 2, "optimizer state"),
                          ("configs/zero3.json", 3, "optimizer state and parameters")])
def test_cpu_offload_reaches_the_engine(tiny_run, tmp_path, ds_config, stage, offloaded):
    # The line is the engine's own answer (zero_cpu_offload, zero_offload_param) after prepare.
    config, out = tiny_run
    result = launch(config, tmp_path, ds_config, "advanced.use_cpu_offload=true",
                    "training.max_steps=2", "training.eval_steps=2")
    assert f"DeepSpeed ZeRO-{stage}: {offloaded} offloaded to CPU (advanced.use_cpu_offload)" in result.stderr
    train = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in train] == [1, 2] and all(r["grad_norm"] > 0 for r in train)


def test_dpo_under_zero3_switches_the_partitioned_adapter_off_for_its_reference(tmp_path):
    # The reference is the engine's own model with the adapter off: no copy, the weights stay partitioned.
    from .test_preference_runs import write_dpo_config, write_pairs

    write_pairs(tmp_path / "prefs.jsonl", pairs=16)
    config = write_dpo_config(tmp_path / "dpo.yaml", tmp_path)
    assert subprocess.run([sys.executable, "-m", "moetune", "data", "--config", str(config)],
                          capture_output=True, text=True).returncode == 0
    launch(config, tmp_path, "configs/zero3.json", "training.max_steps=2", "training.eval_steps=2",
           "training.gradient_accumulation_steps=1")
    train = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert train[0]["preference_loss"] == pytest.approx(0.6931471805599453, abs=1e-5)  # lora_B = 0: policy = reference
    assert train[1]["rewards/margins"] != 0.0 and all(r["aux_loss"] > 1.0 for r in train)
