"""scripts/gpu_check.py: its CPU mode runs every stage at tiny shapes and reports values; a stage that
raises, crashes or hangs is reported FAILED with its error and the stages after it still run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def scripts(monkeypatch):
    """scripts/ leading sys.path, as Python sets it when it runs a script there: its modules import each other."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))


def test_cpu_mode_runs_every_stage_and_reports_values(tmp_path):
    # A fresh interpreter, as the script is meant to run: its stages are forked from a process that has
    # run no torch op yet (OpenMP's threads do not survive a fork).
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    stages = {s["number"]: s for s in report["stages"]}
    assert report["mode"] == "cpu (tiny shapes)" and sorted(stages) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert {n: s["status"] for n, s in stages.items()} == {1: "ok", 2: "ok", 3: "ok", 4: "ok", 5: "ok", 6: "skipped",
                                                           7: "ok", 8: "ok"}

    env = stages[1]["results"]
    assert env["versions"]["torch"] and set(env["imports"]) >= {"flash-attn", "bitsandbytes", "deepspeed", "datasets"}
    assert {"eager", "grouped_mm", "batched_mm"} <= set(env["experts_kernels_offered"])

    quickstart = stages[2]["results"]
    assert quickstart["steps"] == 10 and quickstart["last_lm_loss"] < quickstart["first_lm_loss"]
    assert quickstart["tokens_per_second"] > 0 and quickstart["peak_memory_gib"] > 0

    packed = stages[3]["results"]["checks"]
    assert packed["sdpa float32"]["status"] == "ok" and packed["sdpa float32"]["max_abs_loss_diff"] <= 1e-4
    assert packed["sdpa float32"]["control_without_restart"] > 0.1  # samples that see each other would show
    assert packed["sdpa bfloat16"]["status"] == "ok"
    assert packed["flash_attention_2 bfloat16"]["status"] == "skipped"

    kernels = stages[4]["results"]
    assert "gpt-oss-20b" not in kernels["not_measured"]
    for shape in ("mixtral-8x7b (tiny)", "qwen3-30b-a3b (tiny)", "gpt-oss-20b (tiny)"):
        assert set(kernels[shape]) == {"eager", "grouped_mm", "batched_mm"}
        for kernel, entry in kernels[shape].items():
            assert entry["status"] == "ok" and entry["tokens_per_second"] > 0 and len(entry["lm_losses"]) == 2
            if kernel != "eager":
                assert entry["loss_diff_vs_eager"]["step_1"] <= 1e-3

    runs = stages[5]["results"]["runs"]
    assert runs["bf16 LoRA"]["steps"] == runs["QLoRA 4-bit"]["steps"] == 3
    assert stages[5]["results"]["peak_memory_ratio_4bit_to_bf16"] > 0

    assert "CUDA GPU" in stages[6]["reason"] and stages[6]["results"]["dry_run_exit_code"] == 0
    assert "--num_processes 1" in stages[6]["results"]["dry_run_command"]
    plans = stages[7]["results"]["mixtral-8x7b (tiny)"]
    assert sorted(plans) == ["ESFT (2 experts per layer)", "attention LoRA", "expert LoRA"]
    assert all(p["status"] == "ok" and p["tokens_per_second"] > 0 and len(p["lm_losses"]) == 2 for p in plans.values())

    # Stage 8 plans the tiny shape at each micro-batch (in CPU mode there is no allocator to read).
    planned = [stages[8]["results"]["micro_batches"][f"batch {b}"] for b in (1, 2, 4)]
    assert [p["planned_gib"]["weights"] for p in planned] == [planned[0]["planned_gib"]["weights"]] * 3
    assert planned[0]["planned_gib"]["activations"] < planned[1]["planned_gib"]["activations"] < planned[2]["planned_gib"]["activations"]
    assert all(p["max_memory_allocated_gib"] is None for p in planned)

    markdown = (tmp_path / "gpu_report.md").read_text()
    assert "| 2 | quickstart on CUDA, bf16 | ok |" in markdown and "| 7 | expert LoRA and ESFT tokens/s | ok |" in markdown
    assert "===== stage 4" in (tmp_path / "gpu_check.log").read_text()


def test_a_failing_crashing_or_hanging_stage_never_stops_the_next(scripts, tmp_path, monkeypatch):
    import gpu_check

    def raises(ctx):
        ctx.put("measured", 1.5)
        raise ValueError("the kernel returned NaN\nsecond line")

    def crashes(ctx):
        os.kill(os.getpid(), signal.SIGKILL)

    def hangs(ctx):
        ctx.put("before the hang", True)
        time.sleep(60)

    def works(ctx):
        ctx.summary = "fine"

    Stage = gpu_check.Stage
    monkeypatch.setattr(gpu_check, "STAGES", [Stage(1, "raises", raises, 30), Stage(2, "crashes", crashes, 30),
                                              Stage(3, "hangs", hangs, 1), Stage(4, "works", works, 30)])
    assert gpu_check.main(["--out", str(tmp_path)]) == 1
    stages = json.loads((tmp_path / "gpu_report.json").read_text())["stages"]
    assert [s["status"] for s in stages] == ["FAILED", "FAILED", "FAILED", "ok"]
    assert stages[0]["error"].startswith("ValueError: the kernel returned NaN\nsecond line")
    assert stages[0]["results"] == {"measured": 1.5}
    assert "exit code -9" in stages[1]["error"]
    assert stages[2]["error"].startswith("timed out after 1 s") and stages[2]["results"] == {"before the hang": True}
    assert stages[3]["summary"] == "fine" and "| 4 | works | ok |" in (tmp_path / "gpu_report.md").read_text()


def test_a_slimmed_wheel_keeps_only_the_named_libraries_and_their_record_lines(scripts, tmp_path):
    import zipfile

    from gpu_check_wheels import keep_libraries

    wheel = tmp_path / "bitsandbytes-0.49.0-py3-none-manylinux_2_24_x86_64.whl"
    libraries = ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda124.so", "libbitsandbytes_cuda130.so"]
    record = "".join(f"bitsandbytes/{name},sha256=x,1\n" for name in ["__init__.py", *libraries])
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("bitsandbytes/__init__.py", "")
        for name in libraries:
            archive.writestr(f"bitsandbytes/{name}", name)
        archive.writestr("bitsandbytes-0.49.0.dist-info/RECORD", record)
    keep_libraries(wheel, ("_cpu", "_cuda13"))
    with zipfile.ZipFile(wheel) as archive:
        assert archive.namelist() == ["bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cpu.so",
                                      "bitsandbytes/libbitsandbytes_cuda130.so", "bitsandbytes-0.49.0.dist-info/RECORD"]
        assert archive.read("bitsandbytes/libbitsandbytes_cuda130.so") == b"libbitsandbytes_cuda130.so"
        assert archive.read("bitsandbytes-0.49.0.dist-info/RECORD").decode().splitlines() == [
            "bitsandbytes/__init__.py,sha256=x,1", "bitsandbytes/libbitsandbytes_cpu.so,sha256=x,1",
            "bitsandbytes/libbitsandbytes_cuda130.so,sha256=x,1"]
    assert not wheel.with_suffix(".slim").exists()
