"""Two CPU processes through `accelerate launch` (gloo): the same code path as multi-GPU training."""

import subprocess
import sys
from pathlib import Path

import torch
import yaml

from ..conftest import free_port
from .conftest import write_dataset

PROBE = Path(__file__).with_name("ddp_probe.py")


def test_two_processes_stay_in_sync_share_the_data_and_sum_expert_usage(tiny_run):
    config, out = tiny_run
    # Enough rows that 4 steps x 2 micro-batches x 4 rows per rank stay inside the first epoch.
    write_dataset(Path(yaml.safe_load(config.read_text())["data"]["output_path"]), samples=480)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               str(PROBE), str(config), "training.max_steps=4", "training.eval_steps=2", "training.save_steps=2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(Path(f"{out}-probes") / f"probe-rank{i}.pt") for i in range(2)]
    assert all(r["world_size"] == 2 for r in ranks)

    # Parameters are identical on both ranks after training.
    assert ranks[0]["params"].keys() == ranks[1]["params"].keys() and ranks[0]["params"]
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name

    # Each rank trained on its own shard: no row seen by both.
    assert len(ranks[0]["rows"]) == len(ranks[1]["rows"]) == 4 * 2 * 4
    assert not set(ranks[0]["rows"]) & set(ranks[1]["rows"])

    # The logged expert counts are the sum over both ranks of what each routed (one log line per step, 2 micro-batches each).
    for log_index, logged in enumerate(ranks[0]["logged_counts"]):
        window = slice(2 * log_index, 2 * log_index + 2)
        expected = sum(sum(r["local_counts"][window]) for r in ranks)
        assert torch.allclose(logged, expected), log_index
    assert torch.equal(ranks[0]["logged_counts"][0], ranks[1]["logged_counts"][0])
