"""Everything shipped at the root and in configs/ is valid, and the docs match the code."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig

from moetune.config import load_config
from moetune.config.reference import render_reference, replace_reference

ROOT = Path(__file__).resolve().parent.parent
YAMLS = sorted(p for p in [ROOT / "config.yaml", *ROOT.glob("configs/**/*.yaml")])
ACCELERATE = [p for p in YAMLS if "compute_environment" in yaml.safe_load(p.read_text())]
MOETUNE = [p for p in YAMLS if p not in ACCELERATE and "sweep" not in p.stem]


@pytest.mark.parametrize("path", MOETUNE, ids=lambda p: str(p.relative_to(ROOT)))
def test_moetune_config_validates(path):
    load_config(path)


@pytest.mark.parametrize("path", [ROOT / "accelerate_config.yaml", *ACCELERATE], ids=lambda p: str(p.relative_to(ROOT)))
def test_accelerate_config_is_valid_and_its_deepspeed_file_exists(path):
    cluster = ClusterConfig.from_yaml_file(str(path))  # rejects unknown keys
    ds_file = (cluster.deepspeed_config or {}).get("deepspeed_config_file")
    if ds_file:
        assert (ROOT / ds_file).is_file(), f"{path.name} names {ds_file}, which does not exist"


@pytest.mark.parametrize("path", [ROOT / "deepspeed_moe_config.json", ROOT / "configs/zero3.json"], ids=lambda p: p.name)
def test_deepspeed_configs_take_batch_sizes_from_config_yaml(path):
    ds = json.loads(path.read_text())
    assert ds["train_micro_batch_size_per_gpu"] == "auto"
    assert ds["gradient_accumulation_steps"] == "auto"
    assert ds["bf16"]["enabled"] == "auto"
    assert ds["zero_optimization"]["stage"] in (2, 3)


def test_every_config_names_its_launch_command():
    for path in [*MOETUNE, *ACCELERATE]:
        first_lines = path.read_text().splitlines()[:6]
        assert first_lines[0].startswith("#"), f"{path} must start with a comment"
        assert any("moetune" in line or "train.sh" in line for line in first_lines), path


def test_production_config_matches_the_field_guide():
    c = load_config(ROOT / "config.yaml")
    assert c.model.name == "mistralai/Mixtral-8x7B-v0.1"
    assert (c.model.torch_dtype, c.model.attn_implementation, c.model.max_seq_length) == ("bfloat16", "flash_attention_2", 4096)
    assert (c.lora.r, c.lora.lora_alpha, c.lora.lora_dropout) == (16, 32, 0.05)
    assert c.lora.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    t = c.training
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps) == (1, 16)
    assert (t.learning_rate, t.min_learning_rate, t.lr_scheduler_type, t.warmup_ratio) == (2e-4, 1e-6, "cosine", 0.03)
    assert (t.weight_decay, t.optim, t.max_grad_norm, t.num_train_epochs) == (0.01, "adamw_torch_fused", 1.0, 3)
    assert t.gradient_checkpointing and t.bf16 and (t.save_steps, t.save_total_limit) == (100, 3)
    assert t.output_dir == "outputs/moe-hyperswitch-attn-lora"
    assert c.moe.use_auxiliary_loss and c.moe.auxiliary_loss_weight == 0.001 and not c.moe.freeze_router
    assert [(s.type, s.path) for s in c.data.sources] == [("rust_repo", "hyperswitch")]
    accelerate = yaml.safe_load((ROOT / "accelerate_config.yaml").read_text())
    assert accelerate["num_processes"] * t.per_device_train_batch_size * t.gradient_accumulation_steps == 64


def test_readme_config_reference_is_generated_from_the_code():
    readme = (ROOT / "README.md").read_text()
    assert replace_reference(readme) == readme, "run: python scripts/update_config_reference.py"
    assert "| `training.learning_rate` | float |" in render_reference()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci/run").read_text()
    command = "bash scripts/setup.sh && .venv/bin/python -m pytest -q -n auto --dist loadfile"
    assert command in readme and ci.strip().endswith(command)


def _train_sh(*args, **env):
    full_env = {**os.environ, "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}",
                "PYTHON": os.sys.executable, **env}
    return subprocess.run(["bash", "train.sh", *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120)


def test_train_sh_prints_effective_batch_and_launch_command():
    result = _train_sh("training.learning_rate=1e-4", DRY_RUN="1", NUM_GPUS="4", NUM_MACHINES="2", MACHINE_RANK="1",
                       MAIN_PROCESS_IP="10.1.2.3")
    assert result.returncode == 0, result.stderr
    assert "effective batch size = 1 per device x 16 accumulation x 8 processes = 128 sequences per step" in result.stdout
    assert "TensorBoard logs in outputs/moe-hyperswitch-attn-lora/runs" in result.stdout
    launch = result.stdout.strip().splitlines()[-1]
    for part in ("--num_processes 8", "--num_machines 2", "--machine_rank 1", "--main_process_ip 10.1.2.3",
                 "--config_file accelerate_config.yaml", "-m moetune train --config config.yaml training.learning_rate=1e-4"):
        assert part in launch


def test_train_sh_fails_clearly_on_gpu_count_and_bad_config():
    result = _train_sh(NUM_GPUS="4")
    assert result.returncode == 2
    assert "NUM_GPUS=4 but this machine has 0 GPU(s)" in result.stderr or "no GPU found" in result.stderr
    result = _train_sh("lora.r=0", DRY_RUN="1", NUM_GPUS="4")
    assert result.returncode == 2 and "lora.r must be a positive integer" in result.stderr


def test_train_sh_validates_the_deepspeed_file_its_accelerate_config_names(tmp_path: Path):
    # The launch hands that JSON to every process, whose config then takes its "moe" block: the
    # check before the launch must judge the same config, and name both places of a conflict.
    (tmp_path / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto",
                                                  "moe": {"num_experts": 3}}, indent=2))
    (tmp_path / "accelerate.yaml").write_text(f"distributed_type: DEEPSPEED\ndeepspeed_config:\n"
                                              f"  deepspeed_config_file: {tmp_path / 'ds.json'}\n")
    (tmp_path / "config.yaml").write_text("moe:\n  upcycling:\n    num_experts: 4\n")
    result = _train_sh(DRY_RUN="1", NUM_GPUS="4", CONFIG=str(tmp_path / "config.yaml"),
                       ACCELERATE_CONFIG=str(tmp_path / "accelerate.yaml"))
    assert result.returncode == 2
    assert f"{tmp_path / 'config.yaml'}:3" in result.stderr and f"{tmp_path / 'ds.json'}:4" in result.stderr
    (tmp_path / "config.yaml").write_text("moe:\n  upcycling:\n    num_experts: 3\n")
    result = _train_sh(DRY_RUN="1", NUM_GPUS="4", CONFIG=str(tmp_path / "config.yaml"),
                       ACCELERATE_CONFIG=str(tmp_path / "accelerate.yaml"))
    assert result.returncode == 0, result.stderr


def test_no_tracked_file_holds_merge_conflict_markers():
    # A merge resolved by hand once left its markers in the README, which no other test read line by line.
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    markers = ("<<<<<<< ", ">>>>>>> ")
    found = []
    for name in tracked:
        path = ROOT / name
        if path.suffix not in (".py", ".md", ".yaml", ".yml", ".toml", ".json", ".sh", ".txt", ".jinja") or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if line.startswith(markers) or line == "=======":
                found.append(f"{name}:{number}")
    assert not found, f"merge conflict markers at {found}"
