"""One LSTM layer with projection and clips, run by one of three implementations (``LSTM_IMPLS``),
all with the same parameters and state dict (TensorFlow's conventions, so published weights
load and export without arithmetic)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from bilm.core.errors import InputError
from bilm.modules.lstm.cell import State, reference_cell
from bilm.modules.lstm.cudnn import cudnn_forward
from bilm.modules.lstm.fused import check_compile_mode, fused_layers, keep_mask

LSTM_IMPLS = ("fused", "reference", "cudnn")
# "exact": the fused path's name before it was renamed (it made "reference" look inexact); configs,
# checkpoints and callers that still say it get the fused path.
LSTM_IMPL_ALIASES = {"exact": "fused"}


def lstm_impl_name(impl: str) -> str:
    """The implementation ``impl`` names (an alias resolved); refuses an unknown one."""
    impl = LSTM_IMPL_ALIASES.get(impl, impl)
    if impl not in LSTM_IMPLS:
        raise InputError(f"lstm impl must be one of {LSTM_IMPLS}, got {impl!r}")
    return impl


class LstmWithProjection(nn.Module):
    """One layer. ``impl``: one of LSTM_IMPLS. ``compile``: torch.compile of the fused path's
    step, one of COMPILE_MODES (``auto``: on CUDA only); the other impls ignore it."""

    def __init__(self, input_dim: int, cell_dim: int, projection_dim: int,
                 cell_clip: Optional[float] = None, proj_clip: Optional[float] = None, impl: str = "fused",
                 compile: str = "auto"):
        super().__init__()
        impl = lstm_impl_name(impl)
        if impl == "cudnn" and (cell_clip is not None or proj_clip is not None):
            raise InputError(f"lstm impl 'cudnn' cannot clip (cell_clip={cell_clip}, proj_clip={proj_clip}): "
                             "use impl 'fused', or set both clips to 0/None in the options")
        self.input_dim, self.cell_dim, self.projection_dim = input_dim, cell_dim, projection_dim
        self.cell_clip, self.proj_clip, self.impl = cell_clip, proj_clip, impl
        # Not ``self.compile``: that would hide nn.Module.compile.
        self.compile_mode = check_compile_mode(compile)
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

    def forward(self, inputs: torch.Tensor, state: Optional[State] = None,
                mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, State]:
        """inputs (B, T, input_dim), mask (B, T) bool or None -> outputs (B, T, projection_dim), final state."""
        batch_size, n_steps, _ = inputs.shape
        h, c = state if state is not None else self.zero_state(batch_size, inputs)
        if n_steps == 0:
            return inputs.new_zeros(batch_size, 0, self.projection_dim), (h, c)
        if self.impl == "fused":
            keep = keep_mask(mask.unsqueeze(0)) if mask is not None else None
            out, h, c = fused_layers([self], inputs.transpose(0, 1).unsqueeze(0), h.unsqueeze(0), c.unsqueeze(0), keep)
            return out[0].transpose(0, 1).contiguous(), (h[0], c[0])
        if self.impl == "cudnn":
            return cudnn_forward(self, inputs, (h, c), mask)
        outputs = []
        for t in range(n_steps):  # reference: one plain cell call per step
            z = inputs[:, t] @ self.input_weight.t() + h @ self.state_weight.t() + self.bias
            h_new, c_new = reference_cell(z, c, self.cell_clip, self.proj_clip, self.projection_weight)
            if mask is not None:
                keep = mask[:, t].unsqueeze(-1)
                h = torch.where(keep, h_new, h)
                c = torch.where(keep, c_new, c)
                h_new = h_new * keep
            else:
                h, c = h_new, c_new
            outputs.append(h_new)
        return torch.stack(outputs, dim=1), (h, c)
