"""Benchmark conversations: render + tokenize + mask speed against TRL, and the trainer's data memory at scale.

    .bench-venv/bin/python scripts/bench_chat_data.py speed --conversations 100000 --num-proc 2
    python scripts/bench_chat_data.py memory --records 1000000

``speed`` renders, tokenizes and masks the same generated multi-turn conversations (a fifth with a tool call)
with moetune (:func:`moetune.data.encode.encode`) and with TRL's own dataset preparation under
``assistant_only_loss`` (``SFTTrainer._prepare_dataset``, which swaps in TRL's training template with
``{% generation %}`` markers), in one run, on the same tokenizer: a byte-level BPE trained on the data with
the template's special tokens, its chat template the original one TRL ships (Qwen2.5's ChatML with tools,
and Llama 3). It reports conversations per second and how the two masks compare token by token. TRL is
not a moetune dependency: run this part from a venv that has it (``pip install trl`` beside moetune's).

``memory`` writes N generated conversation records as a built dataset and measures, in a fresh process, the
peak memory of what the trainer runs before step 1 (:func:`moetune.data.dataloaders.build_train_eval_datasets`:
read and split, tokenize, pack), sampled every 200 ms, and the time it takes: the process's RSS and its
anonymous part, and with the worker processes that tokenize (``data.num_workers``) their summed PSS.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

WORDS = ("refund payment capture authorise ledger balance currency merchant fee settle dispute chargeback invoice "
         "account transfer cents euro dollar void webhook idempotency key amount minor unit rounding").split()
TOOLS = [{"type": "function", "function": {"name": "get_payment", "description": "Look up a payment.",
                                           "parameters": {"type": "object", "properties": {"payment_id": {"type": "string"}},
                                                          "required": ["payment_id"]}}}]


def conversations(n: int, seed: int = 0, tools: bool = True):
    """``n`` generated conversations (system prompt, 2 to 4 turns; with ``tools`` a fifth end with a tool call and its
    answer), as dataset records."""
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choices(WORDS, k=k)).capitalize() + "."

    for i in range(n):
        messages = [{"role": "system", "content": "You are a payments assistant."}]
        for _ in range(rng.randint(2, 4)):
            messages += [{"role": "user", "content": text(rng.randint(6, 20))},
                         {"role": "assistant", "content": text(rng.randint(8, 40)), "train": True}]
        record = {"source": "chat", "kind": "conversation", "file": "generated.jsonl", "line": i + 1}
        if tools and i % 5 == 0:
            call = {"type": "function", "function": {"name": "get_payment", "arguments": {"payment_id": f"pay_{i}"}}}
            messages += [{"role": "user", "content": f"Status of pay_{i}?"},
                         {"role": "assistant", "content": "", "tool_calls": [call], "train": True},
                         {"role": "tool", "content": json.dumps({"status": "captured"})},
                         {"role": "assistant", "content": f"pay_{i} is captured.", "train": True}]
            record["tools"] = TOOLS
        record["messages"] = messages
        yield record


def speed(args) -> int:
    import datasets
    from trl import SFTConfig, SFTTrainer
    from trl.chat_template_utils import get_training_chat_template

    from moetune.data.encode import IGNORE_INDEX, encode
    from moetune.data.tokenizer import train_bpe_tokenizer

    datasets.disable_progress_bars()
    templates = Path(sys.modules["trl"].__file__).parent / "chat_templates"
    setups = {"qwen2_5 (ChatML, tools)": ("qwen2_5.jinja", ["<|im_start|>", "<|im_end|>"], None, "<|im_end|>", True),
              "llama3": ("llama3.jinja", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                         "<|begin_of_text|>", "<|eot_id|>", False)}
    print(f"{args.conversations:,} conversations, num_proc {args.num_proc}, {os.cpu_count()} cores")
    for name, (file, special, bos, eos, with_tools) in setups.items():
        records = list(conversations(args.conversations, tools=with_tools))
        tokenizer = train_bpe_tokenizer((json.dumps(r) for r in records[:2000]), 8000, special)
        tokenizer.bos_token, tokenizer.eos_token = bos, eos
        tokenizer.chat_template = (templates / file).read_text(encoding="utf-8")

        started = time.perf_counter()
        ours = encode(records, tokenizer, 1 << 20, num_proc=args.num_proc).dataset
        ours_seconds = time.perf_counter() - started

        plain = datasets.Dataset.from_list([{"messages": [{k: v for k, v in m.items() if k != "train"} for m in r["messages"]],
                                             "tools": json.dumps(r.get("tools")) if r.get("tools") else None}
                                            for r in records])
        stub = type("SFTTrainerState", (), {"_tokenizer": tokenizer, "completion_only_loss": False,
                                             "chat_template": get_training_chat_template(tokenizer)})()
        with tempfile.TemporaryDirectory() as tmp:
            config = SFTConfig(output_dir=tmp, assistant_only_loss=True, max_length=None, dataset_num_proc=args.num_proc,
                               shuffle_dataset=False, report_to=[], use_cpu=True, bf16=False)
            started = time.perf_counter()
            theirs = SFTTrainer._prepare_dataset(stub, plain, tokenizer, config, packing=False, formatting_func=None,
                                                 dataset_name="train")
            trl_seconds = time.perf_counter() - started
        same_ids = same_masks = 0
        differing: dict[str, int] = {}
        for a, b in zip(ours, theirs, strict=True):
            if a["input_ids"] != b["input_ids"]:
                continue
            same_ids += 1
            mine = [label != IGNORE_INDEX for label in a["labels"][1:]]  # moetune never trains a sample's first token
            trl = [label != -100 for label in b["labels"][1:]]
            if mine == trl:
                same_masks += 1
            for token, x, y in zip(a["input_ids"][1:], mine, trl, strict=True):
                if x != y:
                    key = f"{tokenizer.convert_ids_to_tokens(token)!r} trained by {'moetune' if x else 'TRL'} only"
                    differing[key] = differing.get(key, 0) + 1
        print(f"\n{name}: moetune {args.conversations / ours_seconds:,.0f} conversations/s ({ours_seconds:.1f} s), "
              f"TRL {args.conversations / trl_seconds:,.0f} conversations/s ({trl_seconds:.1f} s): "
              f"{trl_seconds / ours_seconds:.2f}x")
        print(f"  same input_ids: {same_ids:,}/{len(records):,}; of those, same mask: {same_masks:,}")
        for key, count in sorted(differing.items(), key=lambda kv: -kv[1])[:5]:
            print(f"  {count:,} tokens {key}")
    return 0


def memory(args) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        dataset = Path(tmp) / "all_data.jsonl"
        started = time.perf_counter()
        with dataset.open("w", encoding="utf-8") as f:
            for record in conversations(args.records, tools=True):
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        print(f"{args.records:,} records written ({dataset.stat().st_size / 2**30:.2f} GiB) in "
              f"{time.perf_counter() - started:.0f} s")
        child = subprocess.run([sys.executable, __file__, "_measure", str(dataset), str(args.max_seq_length)],
                               capture_output=True, text=True)
        sys.stdout.write(child.stdout)
        sys.stderr.write(child.stderr[-3000:])
        return child.returncode


def _measure(dataset: str, max_seq_length: str) -> int:
    """In a fresh process: the trainer's data preparation on ``dataset``, with its peak RSS."""
    import datasets
    import psutil

    from moetune.config import load_config
    from moetune.data.chat_templates import CHATML
    from moetune.data.dataloaders import build_train_eval_datasets
    from moetune.data.tokenizer import train_bpe_tokenizer

    datasets.disable_progress_bars()
    peak = {"rss": 0, "anon": 0, "pss_all": 0, "rss_all": 0}
    done = threading.Event()

    def sample() -> None:
        me = psutil.Process()
        while not done.is_set():
            rss = me.memory_info().rss
            anon = _rss_anon(me.pid)
            rss_all, pss_all = rss, me.memory_full_info().pss
            for child in me.children(recursive=True):
                try:
                    rss_all += child.memory_info().rss
                    pss_all += child.memory_full_info().pss
                except psutil.Error:
                    pass  # a worker that just exited
            for key, value in (("rss", rss), ("anon", anon), ("pss_all", pss_all), ("rss_all", rss_all)):
                peak[key] = max(peak[key], value)
            done.wait(0.2)

    tokenizer = train_bpe_tokenizer((json.dumps(r) for r in conversations(2000)), 8000, ["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = CHATML
    config = load_config(None, [f"data.output_path={dataset}", f"model.max_seq_length={max_seq_length}",
                                "validation.validation_split=0.01"])
    before = psutil.Process().memory_info().rss
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    started = time.perf_counter()
    data = build_train_eval_datasets(config, tokenizer)
    seconds = time.perf_counter() - started
    done.set()
    thread.join()
    s = data.stats
    print(f"split + tokenize + pack: {seconds:.0f} s; {s['train_records']:,} training records -> {s['train_samples']:,} "
          f"samples, {s['train_tokens']:,} tokens in {s['train_rows']:,} rows "
          f"(packing efficiency {s.get('train_packing_efficiency', 1):.2%})")
    print(f"peak RSS of this process {peak['rss'] / 2**30:.2f} GiB (before: {before / 2**30:.2f} GiB, libraries and "
          f"tokenizer loaded), of which anonymous {peak['anon'] / 2**30:.2f} GiB (the rest: pages of memory-mapped Arrow "
          f"files); with its worker processes: PSS {peak['pss_all'] / 2**30:.2f} GiB, RSS summed "
          f"{peak['rss_all'] / 2**30:.2f} GiB (shared pages counted in each)")
    return 0


def _rss_anon(pid: int) -> int:
    """Resident anonymous memory (RssAnon): what the process holds besides mapped files, which the kernel can drop."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "_measure":
        return _measure(sys.argv[2], sys.argv[3])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    fast = verbs.add_parser("speed", help="conversations/s, moetune against TRL (needs trl installed)")
    fast.add_argument("--conversations", type=int, default=100_000)
    fast.add_argument("--num-proc", type=int, default=2, help="processes for both (datasets' num_proc)")
    mem = verbs.add_parser("memory", help="peak RSS of the trainer's data preparation")
    mem.add_argument("--records", type=int, default=1_000_000)
    mem.add_argument("--max-seq-length", type=int, default=2048)
    args = parser.parse_args()
    return speed(args) if args.verb == "speed" else memory(args)


if __name__ == "__main__":
    sys.exit(main())
