"""The command line: verbs, exit codes, error paragraphs, and the root shims."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moetune.cli import main
from moetune.config import load_config

ROOT = Path(__file__).resolve().parent.parent
VERBS = ["data", "train", "eval", "generate", "experts", "sweep", "upcycle", "validate", "print-config"]


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_validate_exit_codes(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("training:\n  output_dir: out\n")
    assert main(["validate", "--config", str(good)]) == 0
    assert "valid" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  learnin_rate: 1\n")
    assert main(["validate", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}:2: unknown key 'training.learnin_rate'.")
    assert "Did you mean training.learning_rate?" in err


def test_bad_config_prints_no_traceback_and_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  bf16: true\n  fp16: true\n")
    result = run("-m", "moetune", "train", "--config", str(bad))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "training.bf16 and training.fp16 are both true" in result.stderr


def test_print_config_applies_overrides_and_round_trips(tmp_path, capsys):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("training:\n  learning_rate: 1.0e-3\n")
    assert main(["print-config", "--config", str(config_file), "training.learning_rate=1e-4", "lora.r=32"]) == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["lora"]["r"] == 32
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(printed)
    assert load_config(resolved) == load_config(config_file, ["training.learning_rate=1e-4", "lora.r=32"])


def test_default_config_is_config_yaml_in_the_current_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["validate"]) == 2
    assert "Config file 'config.yaml' not found" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("lora:\n  r: 4\n")
    assert main(["validate"]) == 0


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_explains_itself(verb, capsys):
    with pytest.raises(SystemExit) as info:
        main([verb, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: moetune {verb}" in out
    assert "--config FILE" in out


def test_console_help_lists_every_verb():
    result = run("-m", "moetune", "--help")
    assert result.returncode == 0
    for verb in VERBS:
        assert verb in result.stdout


@pytest.mark.parametrize(("shim", "verb", "option"), [
    ("train_moe.py", "train", "--config FILE"),
    ("evaluate_moe.py", "eval", "--adapter-path DIR"),
    ("generate.py", "generate", "--prompts FILE"),
    ("prepare_dataset.py", "data", "--config FILE"),
])
def test_root_shims_are_the_verbs(shim, verb, option):
    result = run(shim, "--help")
    assert result.returncode == 0, result.stderr
    assert f"usage: moetune {verb}" in result.stdout
    assert option in result.stdout


def test_shim_reports_a_bad_override_with_exit_2():
    result = run("train_moe.py", "--config", "config.yaml", "lora.r=-1")
    assert result.returncode == 2
    assert "lora.r must be a positive integer, got -1." in result.stderr


LOG_LINES = """
import logging
from moetune.cli import _configure_logging

_configure_logging()
logging.getLogger("moetune.models").info("info line")
logging.getLogger("moetune.models").warning("warning line")
deepspeed = logging.getLogger("DeepSpeed")
deepspeed.addHandler(logging.StreamHandler())
deepspeed.setLevel(logging.INFO)
deepspeed.info("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
"""


@pytest.mark.parametrize("env, lines", [
    ({}, ["moetune: info line", "moetune: warning line"]),
    ({"RANK": "1"}, ["moetune: warning line"]),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, ["moetune: info line", "moetune: warning line", "Setting accelerator to CPU"]),
])
def test_log_lines_come_from_the_main_process_and_the_deepspeed_cpu_notice_only_under_deepspeed(env, lines):
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "ACCELERATE_USE_DEEPSPEED")}
    result = subprocess.run([sys.executable, "-c", LOG_LINES], capture_output=True, text=True, timeout=120,
                            env={**base, "PYTHONPATH": os.pathsep.join(sys.path), **env})
    assert result.returncode == 0, result.stderr
    assert [line.split(". If")[0] for line in result.stderr.splitlines()] == lines
