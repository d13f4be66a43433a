"""One run at a time per output_dir: an exclusive lock on ``output_dir/.moetune.lock`` for the run's lifetime.

The lock is the filesystem's (flock through the ``filelock`` package), so the kernel drops it when
the holding process dies, SIGKILL included: a crashed run never leaves its folder locked. NFS v4 and
Lustre carry flock across nodes; where a filesystem has no flock at all, ``filelock`` falls back to a
marker file. The holder's pid and host go into ``.moetune-run.json`` beside it, so a second run
can say who holds the folder. Only the main process takes the lock.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from moetune.errors import UserError
from moetune.run_dir import LOCK_FILE, RUN_FILE


class RunLock:
    """The lock on one output_dir; :meth:`acquire` is a no-op while it is already held."""

    def __init__(self, output_dir: str | Path):
        self.root = Path(output_dir)
        self._lock: FileLock | None = None

    def acquire(self) -> None:
        """Take the lock or raise a UserError naming the run that holds it (pid, host)."""
        if self._lock is not None:  # a retry of the same run (auto_find_batch_size)
            return
        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.root / LOCK_FILE), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise UserError(f"training.output_dir {self.root} is in use by another moetune run ({self._holder()}). "
                            "Wait for it to finish, stop it, or pick another training.output_dir.") from None
        self._lock = lock
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        (self.root / RUN_FILE).write_text(json.dumps(record) + "\n")

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _holder(self) -> str:
        # The holder writes its record just after locking: give a run that started at the same moment a second.
        for _ in range(10):
            try:
                record = json.loads((self.root / RUN_FILE).read_text())
                return f"pid {record['pid']} on host {record['host']}, started {record['started']}"
            except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
                time.sleep(0.1)
        return "pid and host not recorded"
