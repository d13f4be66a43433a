"""Peak memory of training ESFT-selected experts against training every routed expert in full.

    python scripts/bench_esft_memory.py [--experts 16] [--top-k 2] [--selected 2] [--hidden 256]
                                        [--expert-size 512] [--seq 256] [--batch 4] [--steps 3]

A tiny Qwen3-MoE (random init, 2 layers, ``--experts`` experts, top ``--top-k``) trains ``--steps``
AdamW steps on random tokens two ways, each in a fresh process so no allocation of one is seen by
the other:

* ``full``: every routed expert trains (``moe.expert_training: full``), everything else frozen;
* ``esft``: moetune's ESFT plan (:func:`moetune.models.trainable.esft.install_selection`) with ``--selected``
  experts per layer, everything else frozen.

The peak is the process's resident-set high-water mark (VmHWM), reset through
/proc/self/clear_refs once the model is built, minus the resident set at that moment: what
training added (gradients, optimizer state, activations, ESFT's per-step copy of the fused tensors).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench_memory import rss_kib  # the same peak-memory reading as the LM-loss benchmark

PLANS = ("full", "esft")


def measure(plan: str, args) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from moetune.models.layout import is_expert_parameter
    from moetune.models.trainable.esft import install_selection

    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen3_moe", vocab_size=512, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                  moe_intermediate_size=args.expert_size, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=args.hidden // 4, num_experts=args.experts,
                                  num_experts_per_tok=args.top_k, max_position_embeddings=args.seq)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.train()
    if plan == "full":
        for name, param in model.named_parameters():
            param.requires_grad_(is_expert_parameter(name))
    else:
        install_selection(model, [list(range(args.selected))] * config.num_hidden_layers)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tokens = torch.randint(0, 512, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))

    open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current resident set
    before = rss_kib("VmRSS")
    start = time.perf_counter()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(args.steps):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    peak = rss_kib("VmHWM")
    return {"plan": plan, "peak_mib": (peak - before) / 1024, "trainable": trainable, "loss": loss.item(),
            "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--selected", type=int, default=2, help="experts ESFT trains per layer")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--expert-size", type=int, default=512, help="moe_intermediate_size")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", choices=PLANS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return
    results = {}
    for plan in PLANS:
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", plan], check=True, capture_output=True,
                             text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        results[plan] = json.loads(out.stdout.strip().splitlines()[-1])
    expert_mib = 2 * args.experts * 3 * args.hidden * args.expert_size * 4 / 2**20
    print(f"qwen3_moe, 2 layers, {args.experts} experts top-{args.top_k}, hidden {args.hidden}, expert size "
          f"{args.expert_size}, fp32 (routed experts {expert_mib:.0f} MiB); batch {args.batch} x seq {args.seq}, "
          f"{args.steps} AdamW steps; ESFT trains {args.selected} experts per layer")
    for plan in PLANS:
        r = results[plan]
        print(f"  {plan:5s} peak {r['peak_mib']:7,.0f} MiB   trainable {r['trainable']:>11,}   {r['seconds']:5.2f} s   "
              f"loss {r['loss']:.4f}")
    print(f"  esft / full peak: {results['esft']['peak_mib'] / max(results['full']['peak_mib'], 1.0):.2f}")


if __name__ == "__main__":
    main()
