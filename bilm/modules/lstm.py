"""The LSTM with projection and clipping of bilm-tf (TF's LSTMCell with num_proj), and a stack of them.

Parameters keep TensorFlow's conventions so the published weights load and export
without arithmetic: gate blocks in TF order (i, j, f, o), the forget-gate bias stored
without TF's implicit +1.0 (added in the step, as TF does).

Semantics of one step (``z = x W_ih + h W_hh + b``)::

    c = sigmoid(f + 1) * c_prev + sigmoid(i) * tanh(j);  c = clip(c, cell_clip)
    h = clip((sigmoid(o) * tanh(c)) W_proj, proj_clip)

Masked positions (``mask`` False) leave the state untouched and output zeros, like
TF's dynamic_rnn past a sequence's length.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from bilm.options import LstmOptions

FORGET_BIAS = 1.0
LSTM_IMPLS = ("exact", "reference")

State = tuple[torch.Tensor, torch.Tensor]  # (h: (B, projection_dim), c: (B, cell_dim))


def _clip(x: torch.Tensor, value: Optional[float]) -> torch.Tensor:
    return x if value is None else x.clamp(-value, value)


class LstmWithProjection(nn.Module):
    def __init__(self, input_dim: int, cell_dim: int, projection_dim: int,
                 cell_clip: Optional[float] = None, proj_clip: Optional[float] = None, impl: str = "exact"):
        super().__init__()
        if impl not in LSTM_IMPLS:
            raise ValueError(f"lstm impl must be one of {LSTM_IMPLS}, got {impl!r}")
        self.input_dim, self.cell_dim, self.projection_dim = input_dim, cell_dim, projection_dim
        self.cell_clip, self.proj_clip, self.impl = cell_clip, proj_clip, impl
        self.input_weight = nn.Parameter(torch.empty(4 * cell_dim, input_dim))
        self.state_weight = nn.Parameter(torch.empty(4 * cell_dim, projection_dim))
        self.bias = nn.Parameter(torch.empty(4 * cell_dim))
        # bilm-tf writes no projection when projection_dim == cell_dim.
        self.projection_weight = (nn.Parameter(torch.empty(projection_dim, cell_dim))
                                  if projection_dim != cell_dim else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # TF's default for the LSTMCell kernel: glorot uniform over the stacked [x, h] kernel.
        fan_in, fan_out = self.input_dim + self.projection_dim, 4 * self.cell_dim
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        nn.init.uniform_(self.input_weight, -bound, bound)
        nn.init.uniform_(self.state_weight, -bound, bound)
        nn.init.zeros_(self.bias)
        if self.projection_weight is not None:
            bound = math.sqrt(6.0 / (self.cell_dim + self.projection_dim))
            nn.init.uniform_(self.projection_weight, -bound, bound)

    def zero_state(self, batch_size: int, like: torch.Tensor) -> State:
        return (like.new_zeros(batch_size, self.projection_dim), like.new_zeros(batch_size, self.cell_dim))

    def _cell(self, z: torch.Tensor, c_prev: torch.Tensor) -> State:
        i, j, f, o = z.chunk(4, dim=-1)
        c = torch.sigmoid(f + FORGET_BIAS) * c_prev + torch.sigmoid(i) * torch.tanh(j)
        c = _clip(c, self.cell_clip)
        h = torch.sigmoid(o) * torch.tanh(c)
        if self.projection_weight is not None:
            h = h @ self.projection_weight.t()
        return _clip(h, self.proj_clip), c

    def forward(self, inputs: torch.Tensor, state: Optional[State] = None,
                mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, State]:
        """inputs (B, T, input_dim), mask (B, T) bool or None -> outputs (B, T, projection_dim), final state."""
        batch_size, n_steps, _ = inputs.shape
        h, c = state if state is not None else self.zero_state(batch_size, inputs)
        if self.impl == "exact":
            # All time steps' input projections in one matrix multiply.
            input_part = torch.addmm(self.bias, inputs.reshape(-1, self.input_dim), self.input_weight.t())
            input_part = input_part.view(batch_size, n_steps, -1)
        outputs = []
        for t in range(n_steps):
            if self.impl == "exact":
                z = torch.addmm(input_part[:, t], h, self.state_weight.t())
            else:  # reference: one plain cell call per step
                z = inputs[:, t] @ self.input_weight.t() + h @ self.state_weight.t() + self.bias
            h_new, c_new = self._cell(z, c)
            if mask is not None:
                keep = mask[:, t].unsqueeze(-1)
                h = torch.where(keep, h_new, h)
                c = torch.where(keep, c_new, c)
                h_new = h_new * keep
            else:
                h, c = h_new, c_new
            outputs.append(h_new)
        out = torch.stack(outputs, dim=1) if outputs else inputs.new_zeros(batch_size, 0, self.projection_dim)
        return out, (h, c)


class LstmStack(nn.Module):
    """``n_layers`` LSTMs; with skip connections, layer k >= 1 adds its input to its output (bilm-tf's
    ResidualWrapper). ``dropout`` (training only) drops each layer's input, as bilm-tf's DropoutWrapper."""

    def __init__(self, input_dim: int, options: LstmOptions, dropout: float = 0.0, impl: str = "exact"):
        super().__init__()
        self.options = options
        self.dropout = dropout
        dims = [input_dim] + [options.projection_dim] * (options.n_layers - 1)
        self.layers = nn.ModuleList(
            LstmWithProjection(d, options.dim, options.projection_dim, options.cell_clip, options.proj_clip, impl)
            for d in dims)

    def forward(self, inputs: torch.Tensor, state: Optional[list[State]] = None,
                mask: Optional[torch.Tensor] = None) -> tuple[list[torch.Tensor], list[State]]:
        """Returns every layer's output (B, T, projection_dim) and the new state of every layer."""
        outputs, new_state = [], []
        x = inputs
        for k, layer in enumerate(self.layers):
            if self.dropout > 0.0 and self.training:
                x = nn.functional.dropout(x, self.dropout, training=True)
            y, layer_state = layer(x, state[k] if state is not None else None, mask)
            if self.options.use_skip_connections and k > 0:
                y = y + x  # zero where masked: both terms are
            outputs.append(y)
            new_state.append(layer_state)
            x = y
        return outputs, new_state
