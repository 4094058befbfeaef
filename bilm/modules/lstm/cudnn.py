"""The cuDNN path (``lstm_impl: cudnn``): PyTorch's ``nn.LSTM(proj_size=...)`` (cuDNN on a GPU)
fed with the layer's parameters, reordered on the fly from the cell's gate layout. It cannot
clip, so the layer refuses ``cell_clip``/``proj_clip``. Masks must be right-padded (each row a
prefix of True); rows run packed to their lengths.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from bilm.core.errors import InputError
from bilm.modules.lstm.cell import TORCH_LSTM_GATES, State, plus_forget_bias, reorder_gates


def torch_lstm_params(layer: nn.Module) -> dict[str, torch.Tensor]:
    """Our parameters in nn.LSTM's layout: gate blocks from GATES order to nn.LSTM's
    (i, f, g=j, o) and the forget bias folded into the bias. Built per call, so gradients
    reach our parameters and the published-format export is unchanged."""
    def reorder(w: torch.Tensor) -> torch.Tensor:
        return reorder_gates(w, TORCH_LSTM_GATES)

    bias = plus_forget_bias(reorder(layer.bias), TORCH_LSTM_GATES)
    params = {"weight_ih_l0": reorder(layer.input_weight), "weight_hh_l0": reorder(layer.state_weight),
              "bias_ih_l0": bias, "bias_hh_l0": torch.zeros_like(bias)}
    if layer.projection_weight is not None:
        params["weight_hr_l0"] = layer.projection_weight
    return params

def cudnn_forward(layer: nn.Module, inputs: torch.Tensor, state: State, mask: Optional[torch.Tensor]
                  ) -> tuple[torch.Tensor, State]:
    batch_size, n_steps, _ = inputs.shape
    # A template on the meta device: it holds no memory and no parameters of its own.
    template = nn.LSTM(layer.input_dim, layer.cell_dim, batch_first=True, device="meta",
                       proj_size=layer.projection_dim if layer.projection_weight is not None else 0)
    params = torch_lstm_params(layer)
    h0, c0 = state
    with warnings.catch_warnings():
        # Per-call weights are never one flat cuDNN buffer, and oneDNN has no projection
        # kernel; both only mean a slower (still correct) path.
        warnings.filterwarnings("ignore", message=".*contiguous chunk of memory.*")
        warnings.filterwarnings("ignore", message=".*not supported with oneDNN.*")
        if mask is None:
            out, (h, c) = functional_call(template, params, (inputs, (h0.unsqueeze(0), c0.unsqueeze(0))))
            return out, (h[0], c[0])
        lengths = mask.sum(dim=1)
        steps = torch.arange(n_steps, device=mask.device)
        if not torch.equal(mask, steps.unsqueeze(0) < lengths.unsqueeze(1)):
            raise InputError("lstm impl 'cudnn' needs right-padded masks (each row True then False)")
        rows = (lengths > 0).nonzero().squeeze(1)  # empty rows: zero outputs, state unchanged
        packed = pack_padded_sequence(inputs[rows], lengths[rows].cpu(), batch_first=True, enforce_sorted=False)
        packed_out, (h, c) = functional_call(template, params, (packed, (h0[rows].unsqueeze(0), c0[rows].unsqueeze(0))))
        out_rows, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=n_steps)
    out = inputs.new_zeros(batch_size, n_steps, layer.projection_dim).index_copy(0, rows, out_rows)
    return out, (h0.index_copy(0, rows, h[0]), c0.index_copy(0, rows, c[0]))
