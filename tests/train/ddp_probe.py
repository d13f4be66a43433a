"""Run `moetune train` under `accelerate launch` and record, per rank, what the distributed checks need.

Writes ``<output_dir>-probes/probe-rank<i>.pt`` (beside the run folder, which holds only moetune's files) with the trainable parameters at the end, a hash of every
training row the rank saw, the expert counts it routed itself and the summed counts it logged.
Used by test_distributed.py; not part of moetune.
"""

import hashlib
import sys
from pathlib import Path

import torch

import moetune.train.loop as loop
from moetune.config import load_config

seen_rows: list[str] = []
local_counts: list[torch.Tensor] = []
logged_counts: list[torch.Tensor] = []

original_compute_losses = loop.compute_losses
original_counts = loop.expert_token_counts
original_summarize = loop.summarize_usage
original_save_final = loop.save_final


def probe_path(output_dir, rank: int) -> Path:
    folder = Path(f"{output_dir}-probes")
    folder.mkdir(exist_ok=True)
    return folder / f"probe-rank{rank}.pt"

def compute_losses(model, batch, config, reference=None):
    for row in batch["input_ids"]:
        seen_rows.append(hashlib.sha1(row.cpu().numpy().tobytes()).hexdigest())
    return original_compute_losses(model, batch, config, reference)


def expert_token_counts(*args, **kwargs):
    counts = original_counts(*args, **kwargs)
    local_counts.append(counts.detach().cpu())
    return counts


def summarize_usage(counts):
    logged_counts.append(counts.detach().cpu())
    return original_summarize(counts)


def save_final(accelerator, model, tokenizer, config):
    params = {n: p.detach().cpu().clone() for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
    torch.save({"params": params, "rows": seen_rows, "local_counts": local_counts, "logged_counts": logged_counts,
                "world_size": accelerator.num_processes},
               probe_path(config.training.output_dir, accelerator.process_index))
    original_save_final(accelerator, model, tokenizer, config)


loop.compute_losses, loop.expert_token_counts = compute_losses, expert_token_counts
loop.summarize_usage, loop.save_final = summarize_usage, save_final

if __name__ == "__main__":
    sys.exit(loop.train(load_config(sys.argv[1], sys.argv[2:])))
