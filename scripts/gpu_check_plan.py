"""A scripts/gpu_check.py stage: ``moetune plan``'s memory against ``torch.cuda.max_memory_allocated``.

A Mixtral-8x7B-shaped model (every layer as wide as the real one: hidden 4096, 8 experts of 14,336, 32 heads
and 8 KV heads, vocabulary 32,000; 2 layers), bf16 weights under autocast, LoRA r 16 on q/k/v/o, gradient
checkpointing, sdpa, rows of 4,096 packed tokens, at micro-batches 1, 2 and 4: the plan's allocated bytes (model
states, activations, LM loss; the allowance is memory torch does not allocate) beside the peak torch allocated
over a training step (the second, when the optimizer's states exist), and their ratio. The goal is within 10%.
With ``--cpu`` the model is tiny and only the plan is recorded (there is no allocator to read).

Stage 8 of scripts/gpu_check.py. The stage uses only what gpu_check's ``Context`` offers: ``cpu``, ``put``,
``variant`` and ``summary``.
"""

from __future__ import annotations

import json

MIXTRAL_LAYERS = ("{num_hidden_layers: 2, hidden_size: 4096, intermediate_size: 14336, num_attention_heads: 32, "
                  "num_key_value_heads: 8, num_local_experts: 8, num_experts_per_tok: 2, vocab_size: 32000, "
                  "max_position_embeddings: 8192}")
TINY_LAYERS = ("{num_hidden_layers: 2, hidden_size: 64, intermediate_size: 128, num_attention_heads: 4, "
               "num_key_value_heads: 2, num_local_experts: 4, num_experts_per_tok: 2, vocab_size: 128, "
               "max_position_embeddings: 256}")
MICRO_BATCHES = (1, 2, 4)


def plan_config(batch: int, cpu: bool):
    from moetune.config import load_config

    return load_config(None, [
        "model.architecture=mixtral", "model.random_init=true", "model.torch_dtype=bfloat16", "model.attn_implementation=sdpa",
        f"model.max_seq_length={128 if cpu else 4096}", f"model.config_overrides={TINY_LAYERS if cpu else MIXTRAL_LAYERS}",
        "model.experts_implementation=grouped_mm", "lora.r=16", "lora.lora_dropout=0.05", "moe.freeze_router=false",
        "training.bf16=true", "training.gradient_checkpointing=true", "training.optim=adamw_torch_fused",
        f"training.per_device_train_batch_size={batch}"])


def measured_peak(config, batch: int) -> int:
    """torch.cuda.max_memory_allocated over a training step: built as moetune builds it, two steps of
    compute_losses + backward + AdamW under bf16 autocast, the peak of the second."""
    import torch

    from moetune.models.load.factory import build_model
    from moetune.models.loss.objective import compute_losses
    from moetune.train.optim import build_optimizer

    model = build_model(config, seed=0, gradient_checkpointing=True).to("cuda")
    model.train()
    optimizer = build_optimizer(model, config.training)
    tokens = config.model.max_seq_length
    generator = torch.Generator().manual_seed(0)
    samples = (tokens // 4, tokens // 4, tokens // 2)  # three packed samples per row, positions restarting
    batch_inputs = {
        "input_ids": torch.randint(3, 32000, (batch, tokens), generator=generator).cuda(),
        "position_ids": torch.cat([torch.arange(n) for n in samples]).expand(batch, -1).cuda(),
    }
    for _ in range(2):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compute_losses(model, batch_inputs, config).total
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del model, optimizer, loss
    torch.cuda.empty_cache()
    return peak


def stage_plan_memory(ctx) -> None:
    """The stage: for each micro-batch, the plan's parts and allocated total, the measured peak, the ratio."""
    from moetune.plan.gpus import GIB
    from moetune.plan.launch import Launch
    from moetune.plan.report import make_plan

    lines = []
    for batch in MICRO_BATCHES:
        with ctx.variant("micro_batches", f"batch {batch}") as entry:
            config = plan_config(batch, ctx.cpu)
            plan = make_plan(config, launch=Launch(), gpu=None, remedies=False)
            s = plan.states
            entry.update(planned_gib={"weights": s.weights / GIB, "gradients": s.gradients / GIB,
                                      "optimizer": s.optimizer / GIB,
                                      "activations": plan.activations.at(batch, True) / GIB,
                                      "loss": plan.loss.at(batch) / GIB, "allocated": plan.allocated() / GIB})
            if ctx.cpu:
                entry["max_memory_allocated_gib"] = None
                lines.append(f"batch {batch}: planned {plan.allocated() / GIB:.3f} GiB (CPU: nothing measured)")
                continue
            peak = measured_peak(config, batch)
            entry.update(max_memory_allocated_gib=peak / GIB, ratio_planned_to_measured=plan.allocated() / peak)
            lines.append(f"batch {batch}: planned {plan.allocated() / GIB:.2f} GiB, measured {peak / GIB:.2f} GiB "
                         f"(ratio {plan.allocated() / peak:.3f})")
    ctx.summary = "; ".join(lines)


if __name__ == "__main__":  # alone: python scripts/gpu_check_plan.py [--cpu]
    import contextlib
    import sys
    from types import SimpleNamespace

    results: dict = {}

    @contextlib.contextmanager
    def variant(group, name):
        entry = results.setdefault(group, {}).setdefault(name, {})
        yield entry

    context = SimpleNamespace(cpu="--cpu" in sys.argv, put=results.__setitem__, variant=variant, summary="")
    stage_plan_memory(context)
    print(json.dumps(results, indent=2))
    print(context.summary)
