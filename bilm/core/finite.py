"""Which of a model's weights hold NaN or inf: a diverged run's checkpoint can, and whatever is
computed from it (vectors, scores) then cannot be trusted. Said in one line by ``bilm evaluate``,
``bilm score``, ``bilm embed`` and ``bilm export``."""
from __future__ import annotations

from typing import Iterable

import torch

SHOWN = 3  # tensor names a line gives before "..."


def non_finite_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """The names of the tensors holding a NaN or an infinity (floating-point ones only)."""
    return [name for name, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def non_finite_weights(module: torch.nn.Module) -> str:
    """``""``, or ``"NaN or inf in N tensors (a, b, c, ...)"`` for ``module``'s parameters and buffers."""
    names = non_finite_tensors([*module.named_parameters(), *module.named_buffers()])
    if not names:
        return ""
    shown = ", ".join(names[:SHOWN]) + (", ..." if len(names) > SHOWN else "")
    return f"NaN or inf in {len(names)} tensor{'s' * (len(names) != 1)} ({shown})"


def non_finite_note(module: torch.nn.Module) -> str:
    """``""``, or ``"; its weights hold NaN or inf in N tensors (...)"``: to end a line about the model."""
    found = non_finite_weights(module)
    return f"; its weights hold {found}" if found else ""
