"""The scripts/gpu_check.py stage of ``moetune plan`` (scripts/plan_gpu_stage.py) runs in gpu_check's CPU mode:
it plans the tiny shape at each micro-batch (nothing to measure without a GPU)."""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path
from types import SimpleNamespace

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "plan_gpu_stage.py"


def test_the_stage_plans_each_micro_batch_in_cpu_mode():
    spec = importlib.util.spec_from_file_location("plan_gpu_stage", SCRIPT)
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    results: dict = {}

    @contextlib.contextmanager
    def variant(group, name):
        yield results.setdefault(group, {}).setdefault(name, {})

    ctx = SimpleNamespace(cpu=True, put=results.__setitem__, variant=variant, summary="")
    stage.stage_plan_memory(ctx)
    planned = [results["micro_batches"][f"batch {b}"]["planned_gib"] for b in stage.MICRO_BATCHES]
    assert [p["weights"] for p in planned] == [planned[0]["weights"]] * 3  # the weights do not grow with the batch
    assert planned[0]["activations"] < planned[1]["activations"] < planned[2]["activations"]
    assert all(r["max_memory_allocated_gib"] is None for r in results["micro_batches"].values())
    assert "batch 4: planned" in ctx.summary
