"""One process through DeepSpeed ZeRO-2 and ZeRO-3 on CPU, by the same code path as a multi-GPU launch.

DeepSpeed is the optional `deepspeed` extra (scripts/setup.sh installs it); its first use builds an
op (about 20-45 s, cached afterwards).
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from .conftest import read_metrics

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="the optional deepspeed extra is not installed")


@pytest.mark.parametrize(("ds_config", "stage"), [("deepspeed_moe_config.json", 2), ("configs/zero3.json", 3)])
def test_deepspeed_zero_on_cpu_trains_logs_and_saves_a_peft_adapter(tiny_run, tmp_path, ds_config, stage):
    config, out = tiny_run
    accelerate_config = tmp_path / "accelerate.yaml"
    accelerate_config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
        f"deepspeed_config:\n  deepspeed_config_file: {ROOT / ds_config}\n  zero3_init_flag: false\n"
        "machine_rank: 0\nnum_machines: 1\nnum_processes: 1\nuse_cpu: false\n")
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
                             "--main_process_port", str(29520 + stage), "-m", "moetune", "train", "--config", str(config),
                             "training.max_steps=4", "training.save_steps=4", "training.eval_steps=4"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    train = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(r["aux_loss"] > 1.0 and len(r["expert_usage"]) == 2 for r in train)
    assert (out / "checkpoint-4" / "pytorch_model").is_dir()  # the engine's own (optimizer) state
    adapter = load_file(out / "checkpoint-4" / "adapter_model.safetensors")
    lora_a = [v for k, v in adapter.items() if "q_proj.lora_A" in k]
    assert len(lora_a) == 2 and all(tuple(v.shape) == (8, 64) for v in lora_a)  # gathered, not ZeRO-3 shards
    if stage == 3:
        assert "ZeRO-3: MoE blocks gathered whole as leaf modules: MixtralSparseMoeBlock" in result.stderr
