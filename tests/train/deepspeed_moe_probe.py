"""Run `moetune train` under `accelerate launch` and record what the trained DeepSpeed-MoE model computes.

Just before the final save, each rank writes ``<output_dir>-probes/probe-rank<i>.pt`` (beside the run folder, which holds only moetune's files): the logits of the
trained model (still in the DeepSpeed layout) on :data:`PROBE_IDS` (saved too), the trained weights
of the experts this rank holds (numbered as DeepSpeed numbers them locally) and the optimizer's param
groups as ZeRO got them. Used by test_deepspeed_moe_backend.py; not part of moetune.
"""

import sys
from pathlib import Path

import torch

import moetune.train.loop as loop
from moetune.config import load_config
from moetune.models.families.mpt.deepspeed_moe import DeepSpeedMoeFeedForward

PROBE_IDS = (torch.arange(2 * 24).reshape(2, 24) * 7) % 97 + 3  # any fixed ids inside the tiny vocabulary

original_save_final = loop.save_final



def probe_path(output_dir, rank: int) -> Path:
    folder = Path(f"{output_dir}-probes")
    folder.mkdir(exist_ok=True)
    return folder / f"probe-rank{rank}.pt"

def save_final(accelerator, model, tokenizer, config):
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    with torch.no_grad():  # every rank runs it: with expert parallelism the forward is collective
        logits = unwrapped(input_ids=PROBE_IDS).logits
    blocks = [m for m in unwrapped.modules() if isinstance(m, DeepSpeedMoeFeedForward)]
    local_experts = [{n: p.detach().clone() for n, p in block.moe.deepspeed_moe.experts.named_parameters() if p.requires_grad}
                     for block in blocks]
    torch.save({"ids": PROBE_IDS, "logits": logits, "local_experts": local_experts, "ep_rank": blocks[0].ep_rank,
                "optimizer_groups": [(g["name"], bool(g.get("moe")), g["weight_decay"]) for g in model.optimizer.param_groups]},
               probe_path(config.training.output_dir, accelerator.process_index))
    original_save_final(accelerator, model, tokenizer, config)


loop.save_final = save_final

if __name__ == "__main__":
    sys.exit(loop.train(load_config(sys.argv[1], sys.argv[2:])))
