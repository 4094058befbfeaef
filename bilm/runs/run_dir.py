"""The checkpoints of a run directory: named by step, the newest valid one found on resume
(one that does not load is renamed ``*.corrupt`` and reported, so pruning never counts it as one
of the kept), the last K kept, ``best.pt``, and what killed writes left behind."""
from __future__ import annotations

import glob
import os
import re
import shutil
import warnings
from typing import Any, Optional, Sequence

from bilm.core.atomic import atomic_path
from bilm.runs.checkpoint import CheckpointError, CheckpointRefused, load_checkpoint

_NAME = re.compile(r"step-(\d+)\.pt$")
BEST_NAME = "best.pt"


def checkpoint_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"step-{step:08d}.pt")


def checkpoint_step(path: str) -> int:
    """The step in a ``step-N.pt`` name."""
    return int(_NAME.search(path).group(1))


def list_checkpoints(directory: str) -> list[str]:
    """Checkpoint files in ``directory``, oldest first."""
    paths = [p for p in glob.glob(os.path.join(directory, "step-*.pt")) if _NAME.search(p)]
    return sorted(paths, key=lambda p: int(_NAME.search(p).group(1)))


def remove_stale_temporaries(directory: str) -> list[str]:
    """Delete ``*.tmp*`` files that killed checkpoint writes left behind (call with the run lock held)."""
    stale = glob.glob(os.path.join(directory, "*.tmp*"))
    for path in stale:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
    return stale


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
        except CheckpointRefused:
            raise  # not damage: an older one would silently stand in for it
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


def best_checkpoint_path(directory: str) -> str:
    """``checkpoints/best.pt``: the checkpoint with the lowest heldout perplexity, apart from pruning."""
    return os.path.join(directory, BEST_NAME)


def keep_as_best(path: str) -> str:
    """Make ``best.pt`` beside ``path`` the checkpoint ``path``: a hard link (no second copy on disk;
    pruning ``path`` later leaves it), or a copy where the file system has no links. Atomic."""
    best = best_checkpoint_path(os.path.dirname(path))
    with atomic_path(best) as tmp:
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
    return best
