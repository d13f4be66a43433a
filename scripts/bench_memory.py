"""Peak memory of one training step's LM loss: full float32 logits vs moetune's chunked loss.

    python scripts/bench_memory.py [--vocab 151936] [--seq 2048] [--batch 1] [--hidden 64] [--chunk 1024]
                                   [--labelled 1.0] [--bf16] [--train-lm-head]

A tiny Qwen3-MoE (random init, 2 layers, 4 experts, Qwen3's 151,936-entry vocabulary) runs one
forward and backward over ``--batch`` x ``--seq`` random tokens, three ways, each in a fresh
process so no allocation of one is seen by another:

* ``no loss``: the hidden states' sum, which leaves out the head; it measures the model alone;
* ``full logits``: ``model(...).logits`` then moetune's ``causal_lm_loss`` (today's path:
  the logits upcast to float32, ``F.cross_entropy``);
* ``chunked``: ``model.model(...)`` hidden states, then ``chunked_causal_lm_loss`` with ``model.lm_head``;
* ``trainer``: what moetune's trainer and evaluation call, ``forward_with_lm_loss`` (the whole model's
  forward with ``logits_to_keep=1``, its last hidden states into the chunked loss, 1,024 tokens a chunk).

The peak is the process's resident-set high-water mark (VmHWM), reset right before the step
through /proc/self/clear_refs, minus the resident set at that moment: what the step itself
added. The loss's share is each variant's step peak minus that of ``no loss``. As in LoRA
training, the embeddings and lm_head are frozen (``--train-lm-head`` trains lm_head too) and
the decoder layers train. ``--labelled`` is the share of positions with a label (the rest -100),
as in answer-only QA losses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

VARIANTS = ("no loss", "full logits", "chunked", "trainer")


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(variant: str, args) -> dict:
    """One training step of ``variant`` in this process: peak memory over the pre-step resident set."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from moetune.models.loss.chunked import chunked_causal_lm_loss, lm_loss_implementation
    from moetune.models.loss.lm_loss import causal_lm_loss, forward_with_lm_loss

    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    config = AutoConfig.for_model("qwen3_moe", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                  moe_intermediate_size=args.hidden, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=args.hidden // 4, num_experts=4, num_experts_per_tok=2,
                                  max_position_embeddings=args.seq, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.train()
    model.model.embed_tokens.requires_grad_(False)
    model.lm_head.requires_grad_(args.train_lm_head)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq))
    labels = tokens.clone()
    unlabelled = int(args.seq * (1 - args.labelled))
    labels[:, :unlabelled] = -100

    open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current resident set
    before = rss_kib("VmRSS")
    start = time.perf_counter()
    if variant == "full logits":
        loss = causal_lm_loss(model(input_ids=tokens).logits, labels, reduction="sum")
    elif variant == "trainer":
        _, loss = forward_with_lm_loss(model, {"input_ids": tokens, "use_cache": False}, labels)
    else:
        hidden = model.model(input_ids=tokens).last_hidden_state
        if variant == "chunked":
            loss, _ = chunked_causal_lm_loss(hidden, model.lm_head, labels, chunk_tokens=args.chunk)
        else:
            loss = hidden.float().sum() * 1e-3
    loss.backward()
    seconds = time.perf_counter() - start
    peak = rss_kib("VmHWM")
    return {"variant": variant, "step_peak_mib": (peak - before) / 1024, "loss": loss.item(), "seconds": seconds,
            "implementation": "full float32 logits" if variant == "full logits" else lm_loss_implementation("cpu")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=1024, help="chunk_tokens of the chunked loss")
    parser.add_argument("--labelled", type=float, default=1.0, help="share of positions with a label")
    parser.add_argument("--bf16", action="store_true", help="bf16 weights (logits in bf16, loss in float32)")
    parser.add_argument("--train-lm-head", action="store_true", help="lm_head trains too (default: frozen, as in LoRA)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return

    flags = [arg for arg in sys.argv[1:]]
    results = {}
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, *flags, "--child", variant], check=True, capture_output=True,
                             text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])

    logits_gib = args.batch * args.seq * args.vocab * 4 / 2**30
    print(f"vocab {args.vocab}, batch {args.batch} x seq {args.seq}, hidden {args.hidden}, "
          f"{'bf16' if args.bf16 else 'fp32'} weights, lm_head {'trained' if args.train_lm_head else 'frozen'}, "
          f"{args.labelled:.0%} of positions labelled, chunk {args.chunk} tokens; "
          f"one float32 copy of the logits: {logits_gib:.2f} GiB")
    model_only = results["no loss"]["step_peak_mib"]
    for variant in VARIANTS:
        r = results[variant]
        share = "" if variant == "no loss" else f"   loss's share {r['step_peak_mib'] - model_only:8,.0f} MiB"
        print(f"  {variant:12s} step peak {r['step_peak_mib']:8,.0f} MiB{share}   {r['seconds']:5.2f} s   "
              f"loss {r['loss']:.4f}")
    full = results["full logits"]["step_peak_mib"] - model_only
    for variant in ("chunked", "trainer"):
        ours = results[variant]["step_peak_mib"] - model_only
        print(f"  loss-related peak, {variant}: {full / max(ours, 1.0):.1f}x lower ({results[variant]['implementation']})")


if __name__ == "__main__":
    main()
