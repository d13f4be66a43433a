"""SIGTERM / SIGINT during a run: before the loop they end the start-up with one line; in the loop they
save a checkpoint and stop at the next optimizer step.

A run stopped by a signal exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM), like a
process the signal killed, whether or not it had anything to save. This module imports no torch, so
the CLI can install the handlers before the slow imports of the training stack.
"""

from __future__ import annotations

import signal
from pathlib import Path

from moetune.errors import StoppedBySignal


class StopSignals:
    """SIGTERM / SIGINT handlers for one run; use as a context manager or call :meth:`restore`.

    Until ``in_loop`` is set, a signal raises :class:`~moetune.errors.StoppedBySignal` at once: nothing
    has been trained, so there is nothing to save. In the loop a signal only sets a flag that
    :meth:`requested` reads at the next optimizer step; a second signal stops at once. Every process
    must agree on the step, so the flag is summed across processes (one small all-reduce per step,
    only when there is more than one process).
    """

    def __init__(self):
        self.name: str | None = None
        self.in_loop = False
        self.resuming_from: Path | None = None  # named in the start-up message: it is left as it was
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def __enter__(self) -> StopSignals:
        return self

    def __exit__(self, *exc_info) -> None:
        self.restore()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if not self.in_loop:
            raise StoppedBySignal(signum, self._startup_message(name))
        if self.name is not None:
            raise KeyboardInterrupt
        self.name = name

    def _startup_message(self, name: str) -> str:
        if self.resuming_from is None:
            return f"{name} during start-up; nothing was trained, nothing to resume."
        return (f"{name} during start-up; nothing was trained and {self.resuming_from} is unchanged: resume from it "
                "again with the same training.resume_from_checkpoint.")

    @property
    def exit_code(self) -> int:
        """128 + the number of the signal received (SIGTERM when another process received it)."""
        return 128 + signal.Signals[self.name or "SIGTERM"].value

    def requested(self, accelerator) -> bool:
        flag = self.name is not None
        if accelerator.num_processes > 1:
            import torch

            votes = accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum")
            flag = votes.item() > 0
            self.name = self.name or ("SIGTERM" if flag else None)
        return flag

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
