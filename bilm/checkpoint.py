"""Checkpoint files: written atomically, the newest valid one found on resume, the last K kept.

A checkpoint is one ``torch.save`` file ``step-00001234.pt`` holding the model, the
optimizer, the step, the resolved config, and per-rank state (data-reader positions,
RNG states, carried LSTM states).
"""
from __future__ import annotations

import glob
import os
import re
import warnings
from typing import Any, Optional

import torch

_NAME = re.compile(r"step-(\d+)\.pt$")
REQUIRED_KEYS = ("format", "step", "config", "model")
FORMAT = "bilm-checkpoint-1"


class CheckpointError(ValueError):
    """An unreadable or incompatible checkpoint; the message names the file."""


def checkpoint_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"step-{step:08d}.pt")


def list_checkpoints(directory: str) -> list[str]:
    """Checkpoint files in ``directory``, oldest first."""
    paths = [p for p in glob.glob(os.path.join(directory, "step-*.pt")) if _NAME.search(p)]
    return sorted(paths, key=lambda p: int(_NAME.search(p).group(1)))


def save_checkpoint(payload: dict[str, Any], path: str) -> None:
    """Temporary file, flush to disk, then rename: a crash leaves the old files intact."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **payload}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str, map_location: Any = "cpu") -> dict[str, Any]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated zip, bad pickle, ...: all mean "unreadable"
        raise CheckpointError(f"{path}: unreadable checkpoint, truncated or corrupt ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a bilm checkpoint")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return payload


def load_latest_valid(directory: str, map_location: Any = "cpu") -> tuple[Optional[str], Optional[dict]]:
    """The newest checkpoint that loads; unreadable ones are reported and skipped."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as e:
            warnings.warn(f"skipping {e}", stacklevel=2)
    return None, None


def prune_checkpoints(directory: str, keep: int) -> None:
    for path in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        os.remove(path)


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` whose error lists the mismatched keys and shapes and names the file."""
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
    model.load_state_dict(state)
