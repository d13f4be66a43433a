"""How scripts/gpu_check.py runs its stages: each in a forked process with a share of the time budget.

A crash, a hang or an out-of-memory in one stage never stops the next: the parent only waits, ends
the stage's process group when its time is up, and reads what the stage saved. A stage records its
values through :class:`Context` as it measures them, so one cut short still leaves what it measured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from gpu_check_report import write_report


class Skip(Exception):
    """The stage (or variant) cannot run here; the message says why."""


class CheckFailed(Exception):
    """The stage ran but a measured value is wrong."""


@dataclasses.dataclass
class Context:
    """What a stage sees: the mode, a scratch folder, its deadline, and the results it records."""

    cpu: bool
    work: Path
    deadline: float
    result_path: Path
    results: dict = dataclasses.field(default_factory=dict)
    summary: str = ""
    failures: list = dataclasses.field(default_factory=list)

    @property
    def device(self) -> str:
        return "cpu" if self.cpu else "cuda"

    def put(self, key: str, value) -> None:
        self.results[key] = value
        self.save()

    def save(self, **extra) -> None:
        tmp = self.result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"results": self.results, "summary": self.summary, "failures": self.failures,
                                   **extra}, default=str))
        tmp.replace(self.result_path)

    @contextlib.contextmanager
    def variant(self, group: str, name: str):
        """One measurement within a stage: its failure is recorded and the stage goes on with the next."""
        entry = self.results.setdefault(group, {}).setdefault(name, {})
        try:
            yield entry
            entry.setdefault("status", "ok")
        except Skip as skip:
            entry.update(status="skipped", reason=str(skip))
        except Exception as err:  # noqa: BLE001 - every failure is reported, none stops the stage
            from moetune.errors import OutOfMemory

            traceback.print_exc()
            if isinstance(err, OutOfMemory) or type(err).__name__ == "OutOfMemoryError":
                entry.update(status="out of memory", error=error_lines(err, 2))
            else:
                entry.update(status="FAILED", error=error_lines(err))
                self.failures.append(f"{group}: {name}")
        finally:
            free_memory()
            self.save()


@dataclasses.dataclass(frozen=True)
class Stage:
    number: int
    name: str
    run: Callable[[Context], None]
    cap_seconds: float  # on CUDA; the share of --budget it may take at most


def error_lines(err: BaseException, limit: int = 8) -> str:
    """The error's first lines and where it was raised."""
    lines = "".join(traceback.format_exception_only(type(err), err)).strip().splitlines()[:limit]
    frames = traceback.extract_tb(err.__traceback__)
    if frames:
        lines.append(f"  at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}")
    return "\n".join(lines)


def free_memory() -> None:
    """Collect garbage and return cached CUDA blocks, so the next measurement starts from what is live."""
    import gc

    gc.collect()
    torch = sys.modules.get("torch")  # never imported here just to free memory
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_stages(stages: list[Stage], out: Path, cpu: bool, budget: float, command: str) -> dict:
    """Every stage in turn, each with its share of ``budget`` seconds; ``gpu_report.json``/``.md`` in
    ``out`` are rewritten before and after each. Returns the report."""
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "gpu_check.log"
    log_path.write_text("")
    report = {"mode": "cpu (tiny shapes)" if cpu else "cuda", "command": command,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "stages": []}
    began = time.time()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for index, stage in enumerate(stages):
            left = budget - (time.time() - began)
            floor = 15 * (len(stages) - index - 1)  # a little for each later stage, so a slow one cannot starve them
            timeout = min(stage.cap_seconds if not cpu else budget, max(10.0, left - floor))
            report["stages"].append({"number": stage.number, "name": stage.name, "status": "running"})
            write_report(out, report)
            record = run_stage(stage, cpu, Path(tmp), log_path, timeout)
            report["stages"][-1] = record
            report["seconds"] = time.time() - began
            write_report(out, report)
            print(f"{stage.number}. {stage.name}: {record['status']} ({record['seconds']} s) "
                  f"{record.get('summary') or record.get('reason') or record.get('error', '')}", flush=True)
    return report


def run_stage(stage: Stage, cpu: bool, work: Path, log_path: Path, timeout: float) -> dict:
    """The stage in a forked process with ``timeout`` seconds; its record for the report."""
    result_path = work / f"stage-{stage.number}.json"
    ctx = Context(cpu=cpu, work=work / f"stage-{stage.number}", deadline=time.time() + timeout, result_path=result_path)
    ctx.work.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"\n===== stage {stage.number}: {stage.name} (timeout {timeout:.0f} s)\n")
    start = time.perf_counter()
    process = multiprocessing.get_context("fork").Process(target=_child, args=(stage, ctx, log_path))
    process.start()
    process.join(timeout)
    timed_out = process.is_alive()
    if timed_out:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            process.join(wait)
            if not process.is_alive():
                break
    record = {"number": stage.number, "name": stage.name, "seconds": round(time.perf_counter() - start, 1)}
    data = json.loads(result_path.read_text()) if result_path.is_file() else {}
    record.update(results=data.get("results", {}), summary=data.get("summary", ""))
    if timed_out:
        record.update(status="FAILED", error=f"timed out after {timeout:.0f} s (its share of --budget); the results "
                                             f"above are what it measured by then. Last lines of its log:\n{_log_tail(log_path)}")
    elif "status" not in data:
        record.update(status="FAILED", error=f"its process ended with exit code {process.exitcode} before reporting "
                                             f"(a crash in native code?). Last lines of its log:\n{_log_tail(log_path)}")
    else:
        record.update({k: data[k] for k in ("status", "error", "reason") if k in data})
    return record


def _child(stage: Stage, ctx: Context, log_path: Path) -> None:
    os.setpgrp()  # the parent can end this stage and everything it started (train.sh) at once
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as this process
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    status, extra = "ok", {}
    try:
        stage.run(ctx)
        if ctx.failures:
            status, extra = "FAILED", {"error": "failed: " + ", ".join(ctx.failures)}
    except Skip as skip:
        status, extra = "skipped", {"reason": str(skip)}
    except BaseException as err:  # noqa: BLE001 - reported, never raised into the parent
        traceback.print_exc()
        status, extra = "FAILED", {"error": error_lines(err)}
    ctx.save(status=status, **extra)
    log.flush()
    os._exit(0)


def _log_tail(log_path: Path, lines: int = 8) -> str:
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
