"""Checkpoint files: written atomically, the newest valid one found on resume, the last K kept,
and the lock that keeps two runs out of one run directory.

A checkpoint is one ``torch.save`` file ``step-00001234.pt`` holding the model, the
optimizer, the step, the resolved config, and per-rank state (data-reader positions,
RNG states, carried LSTM states). A write goes to ``step-N.pt.tmpPID`` first and is
renamed when complete: a killed write leaves the previous checkpoints intact, and its
temporary file is removed at the next start. A checkpoint that does not load is renamed
``*.corrupt`` and reported, so pruning never counts it as one of the kept.
"""
from __future__ import annotations

import errno
import fcntl
import glob
import os
import re
import shutil
import socket
import time
import warnings
import zipfile
from typing import Any, Optional, Sequence

import torch

from bilm.errors import CheckpointWriteError, RunDirectoryLocked  # noqa: F401  (raised here, caught by the CLI)

_NAME = re.compile(r"step-(\d+)\.pt$")
REQUIRED_KEYS = ("format", "step", "config", "model")
FORMAT = "bilm-checkpoint-1"


class CheckpointError(ValueError):
    """An unreadable or incompatible checkpoint; the message names the file."""


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


def checkpoint_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"step-{step:08d}.pt")


def checkpoint_step(path: str) -> int:
    """The step in a ``step-N.pt`` name."""
    return int(_NAME.search(path).group(1))


def list_checkpoints(directory: str) -> list[str]:
    """Checkpoint files in ``directory``, oldest first."""
    paths = [p for p in glob.glob(os.path.join(directory, "step-*.pt")) if _NAME.search(p)]
    return sorted(paths, key=lambda p: int(_NAME.search(p).group(1)))


def save_checkpoint(payload: dict[str, Any], path: str) -> None:
    """Temporary file, flush to disk, then rename: a crash leaves the old files intact.

    A failed write (a full disk, a quota) removes its partial file and raises
    ``CheckpointWriteError`` naming the path, the reason and the free space."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {reason} ({_free_space(directory)} free); "
                                   "the previous checkpoints are intact") from None


def _free_space(directory: str) -> str:
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB"):
        if free < 1024:
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return f"{free:.1f} TB"


def remove_stale_temporaries(directory: str) -> list[str]:
    """Delete ``*.tmp*`` files that killed checkpoint writes left behind (call with the run lock held)."""
    stale = glob.glob(os.path.join(directory, "*.tmp*"))
    for path in stale:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
    return stale


def load_checkpoint(path: str, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """The checkpoint's payload. ``mmap``: its tensors map the file instead of being read into
    memory, so those never used (the optimizer state, for evaluate and export) cost nothing and
    the rest are read on first use (pages of the file: a writer renames a new file into place,
    never rewrites one, so the mapping stays valid)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    mmap = mmap and zipfile.is_zipfile(path)  # only torch.save's (default) zip format maps
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as e:  # truncated zip, bad pickle, ...: all mean "unreadable"
        raise CheckpointError(f"{path}: unreadable checkpoint, truncated or corrupt ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a bilm checkpoint")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return payload


def load_latest_valid(directory: str, map_location: Any = "cpu", set_aside_corrupt: bool = False,
                      mmap: bool = False) -> tuple[Optional[str], Optional[dict]]:
    """The newest checkpoint that loads; unreadable ones are reported and skipped. With
    ``set_aside_corrupt`` (one process, holding the run lock) they are renamed ``*.corrupt``,
    so that pruning neither counts nor keeps them."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path, map_location, mmap)
        except FileNotFoundError:
            continue  # set aside by another rank meanwhile
        except CheckpointError as e:
            if set_aside_corrupt:
                os.replace(path, path + ".corrupt")
                warnings.warn(f"skipping {e}; renamed it to {os.path.basename(path)}.corrupt", stacklevel=2)
            else:
                warnings.warn(f"skipping {e}", stacklevel=2)
    return None, None


def deepspeed_dir(directory: str) -> str:
    return os.path.join(directory, "deepspeed")


def prune_checkpoints(directory: str, keep: int, protect: Sequence[str] = ()) -> list[str]:
    """Delete all but the newest ``keep`` checkpoints and those in ``protect``; returns the deleted ones
    (the training strategy then deletes what it kept beside them, e.g. DeepSpeed's ``deepspeed/step-N``)."""
    removed = list_checkpoints(directory)[:-keep] if keep > 0 else []
    removed = [p for p in removed if p not in protect]
    for path in removed:
        os.remove(path)
    return removed


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                     assign: bool = False) -> None:
    """``load_state_dict`` whose error lists the mismatched keys and shapes and names the file.
    ``assign``: the model takes the given tensors instead of copying them (for a model built on
    the meta device: no second copy of the weights)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(state)) if tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or mismatched:
        lines = [f"{source}: the checkpoint does not fit this model (another config?)"]
        if missing:
            lines.append("  missing keys: " + ", ".join(missing))
        if unexpected:
            lines.append("  unexpected keys: " + ", ".join(unexpected))
        if mismatched:
            lines.append("  shape mismatches: " + "; ".join(mismatched))
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state, assign=assign)


BEST_NAME = "best.pt"


def best_checkpoint_path(directory: str) -> str:
    """``checkpoints/best.pt``: the checkpoint with the lowest heldout perplexity, apart from pruning."""
    return os.path.join(directory, BEST_NAME)


def keep_as_best(path: str) -> str:
    """Make ``best.pt`` beside ``path`` the checkpoint ``path``: a hard link (no second copy on disk;
    pruning ``path`` later leaves it), or a copy where the file system has no links. Atomic."""
    best = best_checkpoint_path(os.path.dirname(path))
    tmp = f"{best}.tmp{os.getpid()}"
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, best)
    return best
