"""The LSTM cell of bilm-tf (TF's LSTMCell with num_proj), defined once: the gate layout, the
forget bias, the clips and the reference step. The fused path, the cuDNN reorder and the
reference layer all read them from here.

Semantics of one step (``z = x W_ih + h W_hh + b``)::

    c = sigmoid(f + 1) * c_prev + sigmoid(i) * tanh(j);  c = clip(c, cell_clip)
    h = clip((sigmoid(o) * tanh(c)) W_proj, proj_clip)
"""
from __future__ import annotations

from typing import Optional

import torch

State = tuple[torch.Tensor, torch.Tensor]  # (h: (B, projection_dim), c: (B, cell_dim))


# Order of the four gate blocks along the 4C dim of input_weight, state_weight and bias
# (TF's LSTMCell): i input gate, j new input (the tanh block), f forget gate, o output gate.
GATES = "ijfo"
# Added to the forget gate's pre-activation in the cell, never stored in the bias (as TF).
FORGET_BIAS = 1.0
# nn.LSTM's gate order (i, f, g, o), in our names: its g is our j.
TORCH_LSTM_GATES = "ifjo"
GATE_POSITIONS = tuple(GATES.index(g) for g in "ijfo")  # where i, j, f, o sit


def split_gates(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (..., 4C) in GATES order -> views of the blocks (i, j, f, o), whatever that order."""
    blocks = x.chunk(4, dim=-1)
    return tuple(blocks[k] for k in GATE_POSITIONS)  # type: ignore[return-value]


def gate_block(x: torch.Tensor, gate: str, gates: str = GATES) -> torch.Tensor:
    """The (..., C) view of one gate's block of x (..., 4C) laid out in ``gates`` order."""
    n_cells = x.shape[-1] // 4
    k = gates.index(gate)
    return x[..., k * n_cells:(k + 1) * n_cells]


def reorder_gates(w: torch.Tensor, gates: str) -> torch.Tensor:
    """w (4C, ...) from GATES order to ``gates`` order (a copy)."""
    blocks = w.chunk(4, dim=0)
    return torch.cat([blocks[GATES.index(g)] for g in gates], dim=0)


def plus_forget_bias(bias: torch.Tensor, gates: str = GATES) -> torch.Tensor:
    """``bias`` (..., 4C) in ``gates`` order with FORGET_BIAS added to the forget block. TF adds
    it in every step (as the reference cell does); adding it once to the bias is the same sum
    (up to float rounding, ~1e-7) and saves a pointwise op per step."""
    forget = torch.zeros(bias.shape[-1], dtype=bias.dtype, device=bias.device)
    gate_block(forget, "f", gates).fill_(FORGET_BIAS)
    return bias + forget


def clip(x: torch.Tensor, value: Optional[float]) -> torch.Tensor:
    """The cell and projection clips: clamp to [-value, value]; None means no clip."""
    return x if value is None else x.clamp(-value, value)


def clip_grad(grad: torch.Tensor, x: torch.Tensor, value: Optional[float]) -> torch.Tensor:
    """The gradient through ``clip(x.float(), value)``: passed where -value <= x <= value
    (bounds included, as torch.clamp does), zero elsewhere."""
    return grad if value is None else grad * (x.float().abs() <= value)


def reference_cell(z: torch.Tensor, c_prev: torch.Tensor, cell_clip: Optional[float], proj_clip: Optional[float],
                   projection_weight: Optional[torch.Tensor]) -> State:
    """The reference step, written as the semantics read (TF's LSTMCell): z (B, 4C) the
    pre-activations, FORGET_BIAS added here in every step."""
    i, j, f, o = z.chunk(4, dim=-1)  # TF's order, spelled out: the fused path's helpers are what this checks
    c = torch.sigmoid(f + FORGET_BIAS) * c_prev + torch.sigmoid(i) * torch.tanh(j)
    c = clip(c, cell_clip)
    h = torch.sigmoid(o) * torch.tanh(c)
    if projection_weight is not None:
        h = h @ projection_weight.t()
    return clip(h, proj_clip), c
