"""One run directory, one writer: `dalign run` holds `<run_dir>/.dalign.lock` while it works.

Two runs writing the same stage folders would interleave part files and checkpoints and mix
their rows. The lock is an advisory `flock` on the file: the kernel releases it when its holder
exits however it exits (SIGKILL included), so a lock left by a killed run is free to take, and
the file still names the killed holder, which the taker reports. The file holds the holder's
process id, host and start time, so that a refusal can say which process to wait for or stop.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".dalign.lock"


class RunLockError(RuntimeError):
    """The run directory is held by another running dalign process."""


class RunLock:
    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self._file = None
        self.previous: dict | None = None
        """What the file said when this process took the lock: the holder of a lock left behind."""

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")  # "a+": never truncate a file someone holds
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(handle)
            handle.close()
            who = (f"process {holder['pid']} on {holder['host']}, started {holder['started']}" if holder
                   else "another process")
            raise RunLockError(f"{self.path.parent} is in use by dalign {who}: wait for it to finish or stop it "
                               "(two runs on one directory would mix their stages' files)") from None
        self.previous = _read(handle)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
        handle.flush()
        self._file = handle
        if self.previous:
            print(f"[lock] took over {self.path}, left by process {self.previous.get('pid')} "
                  f"(started {self.previous.get('started')}), which is no longer running")
        return self

    def release(self) -> None:
        if self._file is not None:
            # Emptied before it is unlocked: a file that names no one was released, not left behind.
            self._file.seek(0)
            self._file.truncate()
            self._file.flush()
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(handle) -> dict | None:
    handle.seek(0)
    try:
        return json.loads(handle.read()) or None
    except ValueError:  # empty (released cleanly) or torn
        return None
