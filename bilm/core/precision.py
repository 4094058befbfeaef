"""Precision of the matrix multiplies: "fp32", or "bf16" autocast. The same meaning everywhere
(training, evaluate, the embedder, ``Elmo``); what the code keeps in fp32 on purpose (the LSTM
cell state, the full softmax's log-sum-exp) stays so under autocast. Importing it is cheap."""
from __future__ import annotations

from bilm.core.errors import InputError

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    return precision


def autocast(device, precision: str):
    """bf16 autocast on ``device``'s type (a torch.device or its name) for "bf16"; for "fp32",
    autocast off (also inside an enclosing autocast: fp32 means fp32)."""
    import torch  # here: the command line imports PRECISIONS without torch

    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                          enabled=check_precision(precision) == "bf16")
