"""moe.expert_parallel.backend: deepspeed through the real trainer: an upcycled MPT trained by the DeepSpeed engine
(ZeRO-2, CPU), saved in the native mpt_moe layout, reloaded with moe.expert_parallel.backend: native, resumed exactly.

The training runs go through tests/train/deepspeed_moe_probe.py, which records the trained model's
logits (in the DeepSpeed layout) just before the final save: every reloaded artifact must reproduce them.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from moetune.cli import main
from moetune.config import load_config
from moetune.errors import ConfigError, UserError
from moetune.train.accelerator import check_deepspeed_moe_launch

from ..conftest import free_port
from .conftest import read_metrics, write_dataset

ROOT = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("deepspeed_moe_probe.py")
MPT = "{d_model: 64, n_heads: 4, n_layers: 2, expansion_ratio: 2, max_seq_len: 256}"
UPCYCLED_DEEPSPEED = [
    "model.architecture=mpt", f"model.config_overrides={MPT}", "moe.upcycling.enabled=true",
    "moe.upcycling.num_experts=4", "moe.upcycling.top_k=2", "moe.upcycling.expert_noise_std=0.01",
    "lora.target_modules=[Wqkv, out_proj]", "lora.modules_to_save=[wte]",
    "moe.expert_parallel.backend=deepspeed", "training.weight_decay=0.01", "training.max_steps=4", "training.save_steps=2",
    "training.eval_steps=4", "post_training.merge_and_save=true",
]

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="the optional deepspeed extra is not installed")


def launch(tmp_path, config, *overrides, processes=1):
    """`accelerate launch` the probe with DeepSpeed ZeRO-2 (deepspeed_moe_config.json) on CPU."""
    accelerate_config = tmp_path / f"accelerate{processes}.yaml"
    accelerate_config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
        f"deepspeed_config:\n  deepspeed_config_file: {ROOT / 'deepspeed_moe_config.json'}\n  zero3_init_flag: false\n"
        f"machine_rank: 0\nnum_machines: 1\nnum_processes: {processes}\nuse_cpu: false\n")
    # TORCHDYNAMO_DISABLE skips DeepSpeed's torch.compile of its gating (~30 s on CPU, same numbers).
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
                             "--main_process_port", str(free_port()), str(PROBE), str(config), *UPCYCLED_DEEPSPEED, *overrides],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def reloaded_logits(out: Path, ids: torch.Tensor, *overrides: str) -> dict[str, torch.Tensor]:
    """Logits of the final adapter on a native base (as `moetune eval` loads it) and of the merged model."""
    from transformers import AutoModelForCausalLM

    from moetune.eval.load import load_eval_tokenizer, load_tuned, resolve_tuned_model
    from moetune.models.families.mpt.modeling import MptMoeForCausalLM

    config = load_config(out / "config.yaml", list(overrides))
    tuned = resolve_tuned_model(config, None)
    adapter = load_tuned(config, tuned, load_eval_tokenizer(config, tuned))
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert isinstance(merged, MptMoeForCausalLM)
    with torch.no_grad():
        return {"adapter": adapter(input_ids=ids).logits, "merged": merged(input_ids=ids).logits}


def probe(out: Path, rank: int = 0) -> dict:
    return torch.load(Path(f"{out}-probes") / f"probe-rank{rank}.pt")


@needs_deepspeed
def test_zero2_run_trains_saves_native_files_that_reload_exactly_and_resumes(tiny_run, tmp_path):
    config, out = tiny_run
    result = launch(tmp_path, config)
    train = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
        assert 1.5 < r["aux_loss"] < 4.0  # top-2 over 4 experts: 2 when balanced
        assert len(r["expert_usage"]) == 2 and all(sum(layer) == pytest.approx(1.0, abs=1e-3) for layer in r["expert_usage"])
    assert train[-1]["lm_loss"] < train[0]["lm_loss"]
    assert "creating a new group named: ep_size_1" in result.stdout + result.stderr  # the engine set up the MoE groups

    # ZeRO got the trained experts in their own (moe) param group, with the weight decay of the group they
    # came from (this model trains no bias or norm, so there is no no_decay group).
    assert probe(out)["optimizer_groups"] == [("decay", False, 0.01), ("ep_size_1", True, 0.01)]

    # Checkpoints and the final adapter are in the native layout; the engine's own files keep DeepSpeed's.
    for folder in (out / "checkpoint-4", out):
        adapter = load_file(folder / "adapter_model.safetensors")
        assert not [k for k in adapter if "deepspeed" in k or ".wg." in k]
        assert {f"base_model.model.transformer.blocks.{i}.ffn.{name}.weight" for i in (0, 1)
                for name in ("router", "experts.3.up_proj", "experts.0.down_proj")} <= adapter.keys()
        adapter_config = json.loads((folder / "adapter_config.json").read_text())
        assert set(adapter_config["modules_to_save"]) == {"wte", "transformer.blocks.0.ffn.router",
                                                          "transformer.blocks.1.ffn.router", "experts.0", "experts.1",
                                                          "experts.2", "experts.3"}
    assert (out / "checkpoint-4" / "pytorch_model" / "layer_1_expert_3_mp_rank_00_model_states.pt").is_file()

    # What the trained DeepSpeed model computed, the native reloads compute (run config, then backend native).
    trained = probe(out)["logits"]
    for overrides in ([], ["moe.expert_parallel.backend=native"]):
        for kind, logits in reloaded_logits(out, probe(out)["ids"], *overrides).items():
            assert torch.allclose(logits, trained, atol=1e-5), (kind, overrides, (logits - trained).abs().max())

    # Resume from checkpoint-2: the same losses for steps 3-4 and the same final model.
    launch(tmp_path, config, f"training.resume_from_checkpoint={out / 'checkpoint-2'}")
    resumed = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]  # steps 1-2 kept from the first run, 3-4 trained again
    for again, first in zip(resumed[2:], train[2:], strict=True):
        assert again["loss"] == pytest.approx(first["loss"], rel=1e-5), first["step"]
    assert torch.allclose(probe(out)["logits"], trained, atol=1e-5)


# The lora case also recomputes the blocks (gradient checkpointing), all-to-all included, in the backward pass.
@needs_deepspeed
@pytest.mark.parametrize(("expert_training", "checkpointing"), [("full", False), ("lora", True)])
def test_two_processes_with_expert_parallelism_gather_every_expert_into_the_saved_files(tiny_run, tmp_path,
                                                                                       expert_training, checkpointing):
    config, out = tiny_run
    # Enough rows that 4 steps x 2 micro-batches x 4 rows per rank stay inside the first epoch.
    write_dataset(Path(yaml.safe_load(config.read_text())["data"]["output_path"]), samples=480)
    # gloo: without it Accelerate sees no distributed backend on a CPU-only machine and counts one process.
    settings = ["moe.expert_parallel.size=2", f"moe.expert_training={expert_training}",
                f"training.gradient_checkpointing={str(checkpointing).lower()}", "training.ddp_backend=gloo"]
    launch(tmp_path, config, *settings, processes=2)
    ranks = [probe(out, rank) for rank in (0, 1)]
    assert [r["ep_rank"] for r in ranks] == [0, 1]
    assert ("ep_size_2", True, 0.01) in ranks[0]["optimizer_groups"]
    train = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]

    # Each rank resumes its own experts (and their optimizer state) from the engine's files: the same losses.
    launch(tmp_path, config, *settings, f"training.resume_from_checkpoint={out / 'checkpoint-2'}", processes=2)
    resumed = [r for r in read_metrics(out) if "loss" in r]
    for again, first in zip(resumed[2:], train[2:], strict=True):
        assert again["loss"] == pytest.approx(first["loss"], rel=1e-5), first["step"]
    assert torch.allclose(probe(out)["logits"], ranks[0]["logits"], atol=1e-5)

    # Each rank trained two of the four experts of each layer; the adapter has all four, in DeepSpeed's order
    # (global expert = 2 * rank + local offset), under the native names.
    adapter = load_file(out / "adapter_model.safetensors")
    for layer in (0, 1):
        for rank in (0, 1):
            for key, trained in ranks[rank]["local_experts"][layer].items():
                offset = int(key.split(".")[1])
                native = key.replace(f"deepspeed_experts.{offset}.", f"experts.{2 * rank + offset}.")
                native = native.replace("modules_to_save.default.", "").replace(".default.", ".")
                assert torch.equal(adapter[f"base_model.model.transformer.blocks.{layer}.ffn.{native}"], trained), key
        first, third = (adapter[f"base_model.model.transformer.blocks.{layer}.ffn.experts.{e}.up_proj."
                                f"{'lora_B.' if expert_training == 'lora' else ''}weight"] for e in (0, 2))
        assert not torch.equal(first, third)  # two ranks' experts, not one rank's saved twice

    # Both ranks computed the same logits together; the native reloads, in one process, compute them too.
    assert torch.allclose(ranks[0]["logits"], ranks[1]["logits"], atol=1e-6)
    for kind, logits in reloaded_logits(out, ranks[0]["ids"], "moe.expert_parallel.backend=native").items():
        assert torch.allclose(logits, ranks[0]["logits"], atol=1e-5), (kind, (logits - ranks[0]["logits"]).abs().max())


def test_deepspeed_backend_outside_a_deepspeed_launch_says_how_to_launch(tiny_run, capsys):
    config, out = tiny_run
    assert main(["train", "--config", str(config), *UPCYCLED_DEEPSPEED]) == 2
    err = capsys.readouterr().err
    assert "moe.expert_parallel.backend: deepspeed needs the run launched under DeepSpeed" in err
    assert "accelerate launch --config_file accelerate_config.yaml" in err and "Traceback" not in err
    assert not out.exists()  # refused before anything was written


def fake_accelerator(zero_stage: int, processes: int, **ds_config):
    plugin = SimpleNamespace(zero_stage=zero_stage, deepspeed_config=ds_config)
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=processes)


@pytest.mark.parametrize(("accelerator", "error", "message"), [
    (fake_accelerator(3, 1), UserError, "cannot run under ZeRO-3: DeepSpeed does not support its MoE layers"),
    (fake_accelerator(2, 1, use_data_before_expert_parallelism=True), UserError, "use_data_before_expert_parallelism"),
    (fake_accelerator(2, 3), ConfigError, r"moe.expert_parallel.size \(2\) must divide the number of processes \(3\)"),
])
def test_launches_deepspeed_moe_cannot_run_are_refused(accelerator, error, message):
    config = load_config(None, UPCYCLED_DEEPSPEED + ["moe.expert_parallel.size=2"])
    with pytest.raises(error, match=message):
        check_deepspeed_moe_launch(config, accelerator)
    check_deepspeed_moe_launch(config, fake_accelerator(2, 4))  # ZeRO-2, 4 processes: 2 groups of 2


@pytest.mark.parametrize(("override", "message"), [
    ("moe.upcycling.top_k=1", r"moe.upcycling.top_k must be 2 with moe.expert_parallel.backend: deepspeed \(its top-1 gate scales"),
    ("moe.upcycling.router_jitter=0.1", r"moe.upcycling.router_jitter must be 0 or 0.01 with moe.expert_parallel.backend: deepspeed"),
])
def test_settings_deepspeed_computes_differently_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["moe.expert_parallel.backend=deepspeed", override])
