"""DPO throughput and peak memory: moetune's trainer against TRL's DPOTrainer, like-for-like.

    python scripts/bench_dpo.py [--pairs 256] [--hidden 128] [--layers 2] [--experts 4] [--batch 4] [--repeats 5]
    python scripts/bench_dpo.py --bf16                       # bf16 weights and autocast, gradient checkpointing

Both train the same tiny Mixtral-shaped MoE (random init, built by moetune: sdpa attention, the same experts
kernel; LoRA r 16 on q/k/v/o, aux loss weight 0.001) for one epoch over the same preference pairs (prompts and
completions of spread lengths, built by ``moetune data`` from a generated JSONL), with the same tokens, batch size,
optimizer (unfused AdamW), schedule, clipping, beta (0.1, sigmoid loss) and reference (the policy with its
adapter switched off, one extra forward per step without gradients):

- moetune: ``moetune.train.loop.train`` on the built dataset, the run users start with ``moetune train``;
- TRL 1.16: ``DPOTrainer.train()`` on the base model with the same ``LoraConfig`` (so its reference is the
  adapter switched off, as moetune's; given a PeftModel it would instead copy the adapter as a "ref" adapter).
  Its rows are moetune's token ids, taken from moetune's encoded pairs and handed to TRL as the
  ``prompt_ids``/``chosen_ids``/``rejected_ids`` columns its collator reads (TRL tokenizes text records itself;
  its tokenization is not timed either way), in the order moetune's loader drew them, sampled sequentially: both
  train the same batches (padding, and so speed and peak memory, depend on which pairs share a batch). Every TRL
  option that changes the work is set to what moetune's run does (``trl_config``): its defaults differ (bf16
  autocast and gradient checkpointing on, fused AdamW).

Figures, per run, each run in a fresh process with ``--threads`` torch threads (1), the trainers interleaved
``--repeats`` times (5), over one span: from the training loop's first loss computation (model, optimizer and data
already built) to the end of its last step (moetune: its final save is called; TRL: ``train()`` returns):

- tokens/s: the non-padding tokens of both sequences of every pair (prompt and completion: what the policy
  forwards), divided by the span's wall time; pairs/s the same with pairs; tokens per CPU second divided by the
  process's CPU time instead (steadier than wall time on a machine that other jobs share);
- peak memory: on CPU, the rise of the process's resident set: VmHWM, reset through /proc/self/clear_refs at
  the start (after ``malloc_trim`` has returned the free heap pages), minus the resident set at that moment; on a
  GPU, ``torch.cuda.max_memory_allocated``, reset there.

What still differs by design: moetune computes expert usage and its own balance loss from the captured routing
every step, TRL its entropy, token accuracy and logit means (host syncs) every step; TRL pads a batch to its
longest row, as moetune does. Needs TRL (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_train import (  # scripts/, beside this file: as the SFT bench
    peer_versions,
    run_in_fresh_process,
    trl_training_arguments,
)
from moetune.cli import main as moetune_cli
from moetune.config import load_config
from moetune.data.tokenizer import load_or_train_tokenizer
from moetune.run_dir import TOKENIZER_DIR

WORDS = ("payment amount currency refund capture authorize merchant customer connector webhook mandate "
         "router status error result option vec string self match let mut fn impl struct enum").split()
TRAINERS = {"moetune": "moetune (moetune train)", "trl": "TRL DPOTrainer (like-for-like)"}


def make_pairs(path: Path, pairs: int, seed: int = 0) -> list[str]:
    """Preference records whose prompts and completions spread from a few words to a few hundred tokens."""
    rng = random.Random(seed)
    texts = []
    with path.open("w") as f:
        for i in range(pairs):
            words = lambda mean: " ".join(rng.choices(WORDS, k=max(2, int(rng.lognormvariate(mean, 0.7)))))  # noqa: E731
            record = {"prompt": f"Question {i}: {words(3.2)}?\nAnswer:", "chosen": " " + words(3.0),
                      "rejected": " " + words(3.0)}
            texts += record.values()
            f.write(json.dumps(record) + "\n")
    return texts


def config_yaml(raw: Path, data: Path, out: Path, args) -> str:
    return f"""
model:
  name: bench-mixtral
  architecture: mixtral
  random_init: true
  torch_dtype: {"bfloat16" if args.bf16 else "float32"}
  attn_implementation: sdpa
  max_seq_length: {args.seq}
  tokenizer_vocab_size: {args.vocab}
  config_overrides: {{num_hidden_layers: {args.layers}, hidden_size: {args.hidden}, intermediate_size: {2 * args.hidden},
                     num_attention_heads: 4, num_key_value_heads: 2, num_local_experts: {args.experts},
                     num_experts_per_tok: 2, max_position_embeddings: {args.seq * 2}}}
lora: {{r: 16, lora_alpha: 32, lora_dropout: 0.0}}
moe: {{use_auxiliary_loss: true, auxiliary_loss_weight: 0.001, monitor: {{log_metrics: false}}}}
data:
  output_path: {data}
  packing: false
  sources: [{{type: preference, path: {raw}}}]
validation: {{validation_split: 0}}
training:
  objective: dpo
  dpo_beta: 0.1
  output_dir: {out}
  num_train_epochs: 1
  per_device_train_batch_size: {args.batch}
  bf16: {str(args.bf16).lower()}
  gradient_checkpointing: {str(args.bf16).lower()}
  learning_rate: 1.0e-4
  logging_steps: 10
  save_steps: 100000
  seed: 0
logging: {{tensorboard: false}}
"""


class Span:
    """Wall seconds, this process's CPU seconds and peak memory from :meth:`start` to :meth:`stop`: GPU allocations,
    or on CPU the resident set's rise."""

    def __init__(self):
        self.started = self.stopped = None

    def start(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        else:
            # Heap pages freed earlier (tokenisation, model building) stay resident and would absorb the span's first
            # allocations unseen, by a different amount in each trainer's process: give them back first.
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        self.baseline_kib = _status_kib("VmRSS")
        self.started = (time.perf_counter(), time.process_time())

    def stop(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.stopped = (time.perf_counter(), time.process_time())
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else \
            (_status_kib("VmHWM") - self.baseline_kib) / 1024
        self.figures = {"seconds": self.stopped[0] - self.started[0], "cpu_seconds": self.stopped[1] - self.started[1],
                        "peak_mib": peak}

    def starting(self, function):
        """``function`` that starts the span on its first call."""
        def first_call_starts(*args, **kwargs):
            if self.started is None:
                self.start()
            return function(*args, **kwargs)
        return first_call_starts

    def stopping(self, function):
        """``function`` that stops the span when it is called."""
        def call_stops(*args, **kwargs):
            self.stop()
            return function(*args, **kwargs)
        return call_stops


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def encoded_pairs(config, tokenizer) -> list[dict[str, list[int]]]:
    """moetune's token ids of every training pair, as TRL's collator reads them: a shared prompt, two completions."""
    from moetune.data.dataloaders import build_train_eval_datasets
    from moetune.data.preference_encode import prompt_length

    rows = []
    data = build_train_eval_datasets(config, tokenizer)
    for i in range(len(data.train)):
        pair = data.train[i]
        chosen, rejected = list(pair["chosen_input_ids"]), list(pair["rejected_input_ids"])
        prompt = prompt_length(pair["chosen_labels"])
        if prompt != prompt_length(pair["rejected_labels"]) or chosen[:prompt] != rejected[:prompt]:
            raise SystemExit(f"pair {i}: its sides tokenize the prompt differently; TRL needs one prompt")
        rows.append({"prompt_ids": chosen[:prompt], "chosen_ids": chosen[prompt:], "rejected_ids": rejected[prompt:]})
    return rows


def trl_config(config, out: Path):
    """DPOConfig with every option that changes the work set as moetune's run has it."""
    from trl import DPOConfig

    t = config.training
    return DPOConfig(
        **trl_training_arguments(config, out),
        activation_checkpointing=t.gradient_checkpointing, activation_checkpointing_kwargs={"use_reentrant": False},
        # DPO: the same beta and loss, the reference computed live, the router aux loss weighted alike; the rows are
        # already cut to model.max_seq_length by moetune's encoding, and drawn in moetune's order.
        beta=t.dpo_beta, loss_type=[t.dpo_loss], precompute_ref_log_probs=False,
        router_aux_loss_coef=config.moe.auxiliary_loss_weight, max_length=None, pad_to_multiple_of=None,
        train_sampling_strategy="sequential",
    )


def bench_moetune(config, order_file: Path) -> dict:
    """moetune's run; the pairs of each batch, in the order its loader drew them, go to ``order_file``."""
    from moetune.train import loop

    span, order = Span(), []

    def note_pairs(compute_losses):
        def noted(model, batch, *args, **kwargs):
            order.extend(batch["pair_index"].tolist())
            return compute_losses(model, batch, *args, **kwargs)
        return noted

    loop.compute_losses = span.starting(note_pairs(loop.compute_losses))  # the loop's first loss starts the span
    loop.save_final = span.stopping(loop.save_final)  # and its final save, after the last step, ends it
    loop.train(config)
    order_file.write_text(json.dumps(order))
    return span.figures


def bench_trl(config, pairs: list[dict], order_file: Path, out: Path) -> dict:
    """TRL's run on the pairs in moetune's order (``order_file``), drawn sequentially: the same batches, so neither
    trainer's speed or peak comes from a luckier grouping of long and short pairs."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOTrainer

    from moetune.models.load.factory import build_base_model

    tokenizer = load_or_train_tokenizer(config, None)
    torch.manual_seed(0)
    # The same base model, attention kernel (sdpa) and experts kernel as moetune's; TRL adds the adapter.
    model = build_base_model(config, tokenizer, seed=config.training.seed)
    lora = config.lora
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    placeholder = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}])
    trainer = DPOTrainer(model=model, args=trl_config(config, out), train_dataset=placeholder,
                         processing_class=tokenizer, peft_config=peft_config)
    order = json.loads(order_file.read_text())
    if sorted(order) != list(range(len(pairs))):
        raise SystemExit(f"{order_file}: moetune's run did not train each pair once")
    # moetune's token ids, in the columns TRL's collator reads, in moetune's order.
    trainer.train_dataset = Dataset.from_list([pairs[i] for i in order])
    span = Span()
    trainer.compute_loss = span.starting(trainer.compute_loss)  # the loop's first loss starts the span
    trainer.train()
    span.stop()
    return span.figures


def run_trainer(trainer: str, root: Path, rep: int, threads: int) -> dict:
    """One timed run of one trainer, in this (fresh) process, on the data and tokenizer the parent prepared."""
    config = load_config(root / "bench.yaml", [f"model.tokenizer={root / TOKENIZER_DIR}",
                                               f"training.output_dir={root / f'{trainer}-{rep}'}"])
    pairs = json.loads((root / "pairs.json").read_text())
    torch.set_num_threads(threads)
    order = root / "moetune-order.json"  # written by every moetune run, read by the TRL run that follows it
    run = bench_moetune(config, order) if trainer == "moetune" else bench_trl(config, pairs, order, root / f"trl-{rep}")
    tokens = sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)
    return {**run, "pairs": len(pairs), "tokens": tokens}


def compare(args, root: Path) -> None:
    texts = make_pairs(root / "pairs.jsonl", args.pairs)
    config_path = root / "bench.yaml"
    config_path.write_text(config_yaml(root / "pairs.jsonl", root / "prefs.built.jsonl", root / "unused", args))
    config = load_config(config_path)
    load_or_train_tokenizer(config, iter(texts), save_dir=root / TOKENIZER_DIR)
    if moetune_cli(["data", "--config", str(config_path)]) != 0:
        raise SystemExit("moetune data failed")
    tokenized = load_config(config_path, [f"model.tokenizer={root / TOKENIZER_DIR}"])
    (root / "pairs.json").write_text(json.dumps(encoded_pairs(tokenized, load_or_train_tokenizer(tokenized, None))))
    versions = peer_versions()
    if versions["trl"] == "not installed":
        raise SystemExit("TRL is not installed (pip install -e '.[bench]')")
    flags = [a for a in sys.argv[1:] if a != "--child"]
    runs: dict[str, list[dict]] = {t: [] for t in TRAINERS}
    for rep in range(args.repeats):
        for trainer in TRAINERS:
            run = run_in_fresh_process(__file__, flags, trainer, root, rep)
            runs[trainer].append(run)
            print(f"  run {rep + 1}: {TRAINERS[trainer]:32s} {run['tokens'] / run['seconds']:9,.0f} tokens/s "
                  f"{run['pairs'] / run['seconds']:7.2f} pairs/s   {run['tokens'] / run['cpu_seconds']:9,.0f} tokens per "
                  f"CPU second   peak {run['peak_mib']:8,.1f} MiB", flush=True)
    first = runs["moetune"][0]
    print(f"\nversions: {', '.join(f'{k} {v}' for k, v in versions.items())}; {args.threads} thread(s) a run; "
          f"{'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}")
    print(f"{first['pairs']} pairs ({first['tokens']:,} tokens), batch {args.batch} pairs, hidden {args.hidden}, "
          f"{args.layers} layers, {args.experts} experts, {'bf16 + checkpointing' if args.bf16 else 'fp32'}, "
          f"{args.repeats} interleaved runs each; peak memory: "
          f"{'max_memory_allocated' if torch.cuda.is_available() else 'rise of VmHWM over VmRSS during training'}")
    base = runs["moetune"]
    for trainer, measured in runs.items():
        wall, cpu = (speed_ratios(base, measured, key) for key in ("seconds", "cpu_seconds"))
        memory = [r["peak_mib"] / b["peak_mib"] for b, r in zip(base, measured, strict=True)]
        print(f"  {TRAINERS[trainer]:32s} median {statistics.median(r['tokens'] / r['seconds'] for r in measured):9,.0f} "
              f"tokens/s {statistics.median(r['pairs'] / r['seconds'] for r in measured):7.2f} pairs/s "
              f"{statistics.median(r['tokens'] / r['cpu_seconds'] for r in measured):9,.0f} tokens/CPU s   "
              f"peak {statistics.median(r['peak_mib'] for r in measured):8,.1f} MiB")
        if trainer != "moetune":
            print(f"    moetune / this, per round: speed (wall) median {statistics.median(wall):.2f}x "
                  f"(range {min(wall):.2f}-{max(wall):.2f}), speed (CPU time) median {statistics.median(cpu):.2f}x "
                  f"(range {min(cpu):.2f}-{max(cpu):.2f}); peak memory this / moetune median "
                  f"{statistics.median(memory):.2f}x (range {min(memory):.2f}-{max(memory):.2f})")


def speed_ratios(base: list[dict], measured: list[dict], seconds: str) -> list[float]:
    """moetune's tokens per ``seconds`` over the other trainer's, round by round."""
    return [(b["tokens"] / b[seconds]) / (r["tokens"] / r[seconds]) for b, r in zip(base, measured, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512, help="model.max_seq_length: the longest side of a pair")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--vocab", type=int, default=2048, help="entries of the BPE trained on the data")
    parser.add_argument("--bf16", action="store_true", help="bf16 weights and autocast, gradient checkpointing")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs of each trainer")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (CPU)")
    parser.add_argument("--child", choices=sorted(TRAINERS), help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rep", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_trainer(args.child, args.root, args.rep, args.threads)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        compare(args, Path(tmp))


if __name__ == "__main__":
    main()
