"""Benchmark the dataset builder: end-to-end MB/s of Rust source (walk + parse + write) and peak memory.

    python scripts/bench_data.py                       # the rust-src tree under /usr/src/rustc-*
    python scripts/bench_data.py --repo PATH --workers 2 --instructions
    python scripts/bench_data.py --pack                # then time what the trainer runs: split, tokenizer, pack

Memory is the peak of the summed resident set of this process and its worker processes, sampled
every 20 ms (the figure that matters on a machine with a memory limit), plus the main process alone.
The dataset goes to a temporary folder that is deleted afterwards.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from moetune.config import load_config
from moetune.data.build import build_dataset, stats_path_for


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", help="Rust repository to build from (default: the newest /usr/src/rustc-*).")
    parser.add_argument("--workers", type=int, default=0, help="data.num_workers (0 = one per core).")
    parser.add_argument("--instructions", action="store_true", help="Also emit instruction samples.")
    parser.add_argument("--max-seq-length", type=int, default=2048, help="model.max_seq_length (file chunk size).")
    parser.add_argument("--pack", action="store_true",
                        help="Also time load_splits, a trained 4,096-entry tokenizer and build_train_eval_datasets.")
    args = parser.parse_args()
    repo = args.repo or _default_repo()
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "bench.jsonl"
        config = load_config(None, [
            f"data.output_path={output}", f"data.num_workers={args.workers}", f"model.max_seq_length={args.max_seq_length}",
            f"data.sources=[{{type: rust_repo, path: {json.dumps(repo)}, instructions: {str(args.instructions).lower()}}}]",
        ])
        sampler = _PeakMemory()
        sampler.start()
        started = time.perf_counter()
        build_dataset(config)
        seconds = time.perf_counter() - started
        sampler.stop()
        # CPU time tells how much of the wall time was this build's own work on a shared machine.
        own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_main, cpu_workers = own.ru_utime + own.ru_stime, workers.ru_utime + workers.ru_stime
        stats = json.loads(stats_path_for(output).read_text())
        output_mb = output.stat().st_size / 1e6
        if args.pack:
            _bench_packing(output, args.max_seq_length)
    source_mb = stats["rust_bytes_scanned"] / 1e6
    print(f"\nrepo {repo}: {stats['rust_files_scanned']:,} files, {source_mb:.1f} MB of Rust source, "
          f"{stats['samples_total']:,} samples, {output_mb:.1f} MB written")
    print(f"{seconds:.1f} s  ->  {source_mb / seconds:.2f} MB/s of Rust source "
          f"({os.cpu_count()} cores, workers={args.workers or os.cpu_count()}, {platform.python_version()})")
    print(f"peak RSS: {sampler.peak_total / 2**20:.0f} MiB (all processes), {sampler.peak_main / 2**20:.0f} MiB (main)")
    print(f"CPU: {cpu_main:.1f} s main + {cpu_workers:.1f} s workers = {source_mb / (cpu_main + cpu_workers):.2f} MB per "
          f"CPU-second; load average over the last minute at the end: {os.getloadavg()[0]:.2f}")
    return 0


def _bench_packing(dataset: Path, max_seq_length: int) -> None:
    from moetune.data.dataloaders import build_train_eval_datasets
    from moetune.data.split import load_splits
    from moetune.data.tokenizer import load_or_train_tokenizer

    config = load_config(None, [f"data.output_path={dataset}", "model.random_init=true", "model.architecture=mixtral",
                                f"model.max_seq_length={max_seq_length}", "model.tokenizer_vocab_size=4096"])
    timings = {}
    started = time.perf_counter()
    train, _ = load_splits(config)
    timings["load_splits"] = time.perf_counter() - started
    started = time.perf_counter()
    tokenizer = load_or_train_tokenizer(config, (r.get("text") or r["prompt"] + r["completion"] for r in train))
    timings["train tokenizer"] = time.perf_counter() - started
    for run in ("tokenize + pack", "again, from the cache"):
        started = time.perf_counter()
        data = build_train_eval_datasets(config, tokenizer)
        timings[run] = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(min(1000, len(data.train))):
        data.train[i]
    timings["1,000 packed rows"] = time.perf_counter() - started
    print("\n" + "\n".join(f"{name}: {seconds:.2f} s" for name, seconds in timings.items()))
    print(json.dumps(data.stats))
    print(f"peak RSS of this process so far: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


def _default_repo() -> str:
    candidates = sorted(glob.glob("/usr/src/rustc-*"))
    if not candidates:
        sys.exit("No /usr/src/rustc-* found: `apt-get install rust-src`, or pass --repo PATH.")
    return candidates[-1]


class _PeakMemory(threading.Thread):
    """Samples the summed RSS of this process and its children until stopped."""

    def __init__(self, interval: float = 0.02):
        super().__init__(daemon=True)
        self.interval, self.peak_total, self.peak_main = interval, 0, 0
        self._done = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self._done.is_set():
            main_rss = me.memory_info().rss
            total = main_rss
            for child in me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass  # a worker that just exited
            self.peak_total, self.peak_main = max(self.peak_total, total), max(self.peak_main, main_rss)
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()


if __name__ == "__main__":
    sys.exit(main())
