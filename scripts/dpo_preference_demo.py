"""DPO teaches a model a preferred answer style: validation preference accuracy before and after, through moetune.

    python scripts/dpo_preference_demo.py [--out outputs/dpo-demo] [--dpo-steps 40]

Two runs of ``moetune data`` + ``moetune train`` on a tiny Mixtral-shaped MoE (random init, 2 layers, hidden 64,
4 experts, CPU):

1. SFT: question/answer lines (``qa_jsonl``) all answered in the *terse* style (" refund mandate."); the adapter
   (attention LoRA, with the embeddings and lm_head trained in full, as a random model needs) is merged into the
   weights at the end (``post_training.merge_and_save``).
2. DPO on the merged model, a fresh attention LoRA, its reference the merged model (the adapter switched off):
   pairs (``preference``) on new questions whose chosen answer is in the *explained* style (" It is used to
   refund the mandate of a payment.") and whose rejected one is in the terse style the model learnt, over the
   same content words. 20% of the pairs are held out; moetune train evaluates them every ``--eval-steps`` steps.

The figure is moetune train's logged ``eval_rewards/accuracies``: the share of held-out pairs whose chosen
answer's implicit reward ``beta * log(policy / reference)`` beats the rejected one's. Before the first DPO step the
policy is its reference, every reward is 0 and no pair is won (ties count as lost, as in TRL); the script also
reports the accuracy of an untrained reward (a coin flip, 0.5) beside the trained model's own preference
(which answer the SFT model gives the higher per-token log-probability).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import textwrap
from pathlib import Path

from moetune.cli import main as moetune

CONTENT = ("payment refund mandate capture merchant customer webhook connector invoice currency ledger "
           "account balance transfer dispute").split()
ROLES = ("settle cancel record verify route retry".split())


def terse(rng: random.Random, words: list[str]) -> str:
    return f" {words[0]} {words[1]}."


def explained(rng: random.Random, words: list[str]) -> str:
    return f" It is used to {rng.choice(ROLES)} the {words[1]} of a {words[0]}."


def question(rng: random.Random) -> tuple[str, list[str]]:
    words = rng.sample(CONTENT, 2)
    return f"What does the {words[0]} {words[1]} do?", words


def write_data(root: Path, sft_samples: int, pairs: int, seed: int) -> None:
    rng = random.Random(seed)
    with (root / "sft.jsonl").open("w") as f:
        for _ in range(sft_samples):
            q, words = question(rng)
            f.write(json.dumps({"question": q, "answer": terse(rng, words).strip()}) + "\n")
    with (root / "pairs.jsonl").open("w") as f:
        for i in range(pairs):
            q, words = question(rng)
            # A number keeps every prompt unique, so the held-out pairs are new questions.
            f.write(json.dumps({"prompt": f"Question: {q} (#{i})\nAnswer:", "chosen": explained(rng, words),
                                "rejected": terse(rng, words)}) + "\n")


MODEL = """
  architecture: mixtral
  torch_dtype: float32
  attn_implementation: sdpa
  max_seq_length: 64"""

SFT = """
model:
  name: dpo-demo-sft{model}
  random_init: true
  tokenizer_vocab_size: 512
  config_overrides: {{num_hidden_layers: 2, hidden_size: 64, intermediate_size: 128, num_attention_heads: 4,
                     num_key_value_heads: 2, num_local_experts: 4, num_experts_per_tok: 2, max_position_embeddings: 128}}
lora: {{r: 8, lora_alpha: 16, lora_dropout: 0.0, modules_to_save: [embed_tokens, lm_head]}}
moe: {{use_auxiliary_loss: true, auxiliary_loss_weight: 0.01}}
data:
  output_path: {root}/sft.built.jsonl
  sources: [{{type: qa_jsonl, path: {root}/sft.jsonl}}]
validation: {{validation_split: 0.0}}
training:
  output_dir: {root}/sft
  max_steps: {sft_steps}
  per_device_train_batch_size: 16
  learning_rate: 3.0e-3
  lr_scheduler_type: cosine
  warmup_ratio: 0.05
  logging_steps: 25
  save_steps: 100000
  seed: {seed}
post_training: {{merge_and_save: true}}
logging: {{tensorboard: false}}
"""

DPO = """
model:
  name: {root}/sft/merged{model}
lora: {{r: 8, lora_alpha: 16, lora_dropout: 0.0}}
moe: {{use_auxiliary_loss: true, auxiliary_loss_weight: 0.01}}
data:
  output_path: {root}/pairs.built.jsonl
  sources: [{{type: preference, path: {root}/pairs.jsonl}}]
validation: {{validation_split: 0.2}}
training:
  objective: dpo
  dpo_beta: 0.1
  dpo_sft_weight: {sft_weight}
  output_dir: {root}/dpo
  max_steps: {dpo_steps}
  per_device_train_batch_size: 8
  per_device_eval_batch_size: 32
  learning_rate: {dpo_lr}
  lr_scheduler_type: constant
  logging_steps: {eval_steps}
  eval_steps: {eval_steps}
  save_steps: 100000
  seed: {seed}
logging: {{tensorboard: false}}
"""


def run(config: Path) -> None:
    for verb in ("data", "train"):
        if moetune([verb, "--config", str(config)]) != 0:
            raise SystemExit(f"moetune {verb} --config {config} failed")


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def held_out_pairs(dpo_config: Path) -> list[dict]:
    """The pairs moetune train held out for validation (its split, by prompt, seeded)."""
    from moetune.config import load_config
    from moetune.data.record_table import load_split_tables

    table = load_split_tables(load_config(dpo_config)).validation
    return [json.loads(line) for line in table["json"]]


def own_preference(root: Path, pairs: list[dict], adapter: Path | None = None) -> float:
    """The share of ``pairs`` whose chosen answer the model (the merged SFT model, with ``adapter`` when given) gives
    the higher mean log-probability per token: which style it would rather write, with no reference."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(root / "sft" / "merged")
    model = (PeftModel.from_pretrained(model, adapter) if adapter else model).eval()
    tokenizer = AutoTokenizer.from_pretrained(root / "sft" / "merged")
    wins = 0
    for record in pairs:
        prompt = len(tokenizer(record["prompt"])["input_ids"])
        means = []
        for side in ("chosen", "rejected"):
            ids = tokenizer(record["prompt"] + record[side])["input_ids"]
            with torch.no_grad():
                logps = model(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
            means.append(logps[prompt - 1:].gather(1, torch.tensor(ids[prompt:])[:, None]).mean().item())
        wins += means[0] > means[1]
    return wins / len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/dpo-demo"))
    parser.add_argument("--sft-samples", type=int, default=600)
    parser.add_argument("--sft-steps", type=int, default=150)
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--dpo-steps", type=int, default=30)
    parser.add_argument("--dpo-lr", type=float, default=2e-4)
    parser.add_argument("--eval-steps", type=int, default=2)
    parser.add_argument("--sft-weight", type=float, default=0.0,
                        help="training.dpo_sft_weight: the chosen answers' next-token loss beside DPO's (RPO)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = args.out.resolve()
    root.mkdir(parents=True, exist_ok=True)
    write_data(root, args.sft_samples, args.pairs, args.seed)
    fields = {**vars(args), "root": root, "model": MODEL}
    (root / "sft.yaml").write_text(textwrap.dedent(SFT.format(**fields)))
    (root / "dpo.yaml").write_text(textwrap.dedent(DPO.format(**fields)))
    if not (root / "sft" / "merged").is_dir():  # the SFT stage is kept between runs of the DPO stage
        run(root / "sft.yaml")
    shutil.rmtree(root / "dpo", ignore_errors=True)  # a run without checkpoints would append to its metrics
    run(root / "dpo.yaml")

    held_out = held_out_pairs(root / "dpo.yaml")
    evaluations = [r for r in read_metrics(root / "dpo") if "eval_rewards/accuracies" in r]
    print(f"\nSFT: {args.sft_steps} steps, last loss {read_metrics(root / 'sft')[-1]['loss']:.4f}")
    print(f"DPO: {args.dpo_steps} steps at learning rate {args.dpo_lr}, dpo_sft_weight {args.sft_weight}; "
          f"{len(held_out)} held-out pairs")
    print("preference accuracy on the held-out pairs (moetune train's eval_rewards/accuracies):")
    print("  step 0: 0.000 (the policy is its reference: every reward is 0, every pair a tie); a coin flip: 0.500")
    for record in evaluations:
        print(f"  step {record['step']}: {record['eval_rewards/accuracies']:.3f}, margin "
              f"{record['eval_rewards/margins']:.3f}, eval_loss {record['eval_loss']:.4f} ({record['eval_pairs']} pairs)")
    print("the model's own preference for the chosen style on the held-out pairs (higher mean log-probability):")
    print(f"  SFT model {own_preference(root, held_out):.3f}, after DPO {own_preference(root, held_out, root / 'dpo'):.3f}")


if __name__ == "__main__":
    main()
