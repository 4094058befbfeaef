"""The lock that keeps two runs (or a run and an import) out of one run directory."""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import time

from bilm.core.errors import RunDirectoryLocked

LOCK_NAME = ".bilm-train.lock"


class RunLock:
    """An exclusive ``flock`` on ``out_dir/.bilm-train.lock``, held while a run trains.

    The operating system releases it when the process ends, however it ends, so a killed
    run never leaves a stale lock. The file names the holder (host and PID) for the message
    the next run shows."""

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, LOCK_NAME)
        self._file = None

    def acquire(self) -> "RunLock":
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                f.close()
                raise
            f.seek(0)
            holder = f.read().strip() or "unknown holder"
            f.close()
            raise RunDirectoryLocked(f"{os.path.dirname(self.path)} is in use by another bilm train ({holder}); "
                                     "wait for it to finish, or give this run another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
