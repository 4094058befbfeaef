"""A stack of LSTM layers as bilm-tf builds it (dropout on each layer's input, skip connections
from the second layer on), the same around every implementation (``_run_layers``); exact
stacks of one shape advance in lock step (``run_fused_stacks``: the forward and backward LMs)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from bilm.modules.lstm.cell import State
from bilm.modules.lstm.fused import fused_layers, keep_mask
from bilm.modules.lstm.layer import LstmWithProjection, lstm_impl_name
from bilm.core.options import LstmOptions


class LstmStack(nn.Module):
    """``n_layers`` LSTMs; with skip connections, layer k >= 1 adds its input to its output (bilm-tf's
    ResidualWrapper). ``dropout`` (training only) drops each layer's input, as bilm-tf's DropoutWrapper.
    ``impl`` and ``compile`` as ``LstmWithProjection``'s, for every layer."""

    def __init__(self, input_dim: int, options: LstmOptions, dropout: float = 0.0, impl: str = "fused",
                 compile: str = "auto"):
        super().__init__()
        self.options = options
        self.dropout = dropout
        self.impl = lstm_impl_name(impl)
        dims = [input_dim] + [options.projection_dim] * (options.n_layers - 1)
        self.layers = nn.ModuleList(
            LstmWithProjection(d, options.dim, options.projection_dim, options.cell_clip, options.proj_clip, impl,
                               compile)
            for d in dims)

    @property
    def compile_mode(self) -> str:
        return self.layers[0].compile_mode

    def forward(self, inputs: torch.Tensor, state: Optional[list[State]] = None,
                mask: Optional[torch.Tensor] = None) -> tuple[list[torch.Tensor], list[State]]:
        """Returns every layer's output (B, T, projection_dim) and the new state of every layer."""
        if self.impl == "fused":
            return run_fused_stacks([self], [inputs], [state], [mask])[0]
        return _run_layers(self, inputs,
                           lambda k, x: self.layers[k](x, state[k] if state is not None else None, mask))


def _run_layers(stack: LstmStack, x: torch.Tensor, run_layer: Callable[[int, torch.Tensor], tuple[torch.Tensor, State]]
                ) -> tuple[list[torch.Tensor], list[State]]:
    """The stack around the layers, for every implementation: layer k's input is dropped out
    (training only), ``run_layer(k, x)`` gives its output and new state, and from the second
    layer on its input is added to its output (skip connections); the output feeds layer k+1.
    x may be any layout ``run_layer`` reads ((B, T, F) for one stack, (D, T, B, F) for D stacks
    in lock step). Returns every layer's output and new state."""
    outputs, new_states = [], []
    for k in range(stack.options.n_layers):
        if stack.dropout > 0.0 and stack.training:
            x = nn.functional.dropout(x, stack.dropout, training=True)
        y, layer_state = run_layer(k, x)
        if stack.options.use_skip_connections and k > 0:
            y = y + x  # zero where masked: both terms are
        outputs.append(y)
        new_states.append(layer_state)
        x = y
    return outputs, new_states


def can_run_together(stacks: Sequence[LstmStack], inputs: Sequence[torch.Tensor]) -> bool:
    """Whether ``run_fused_stacks`` can advance these stacks in lock step: all fused, same
    architecture, mode, dropout and compile mode, inputs of one shape, dtype and device."""
    first = stacks[0]
    return (all(s.impl == "fused" for s in stacks)
            and all(s.options == first.options and s.dropout == first.dropout and s.training == first.training
                    and s.compile_mode == first.compile_mode
                    and s.layers[0].input_dim == first.layers[0].input_dim for s in stacks)
            and all(x.shape == inputs[0].shape and x.dtype == inputs[0].dtype and x.device == inputs[0].device
                    for x in inputs))


def run_fused_stacks(stacks: Sequence[LstmStack], inputs: Sequence[torch.Tensor],
                     states: Sequence[Optional[list[State]]], masks: Sequence[Optional[torch.Tensor]]
                     ) -> list[tuple[list[torch.Tensor], list[State]]]:
    """Run D fused stacks (e.g. the forward and backward LMs) in lock step: their layers' weights
    are stacked so each time step is one batched matmul for all of them. Each stack gets its own
    inputs (B, T, input_dim), state and mask (B, T) or None; all inputs share one shape
    (``can_run_together``). Returns, per stack, what ``LstmStack.forward`` returns."""
    first = stacks[0]
    options = first.options
    n_dirs = len(stacks)
    batch_size, n_steps, _ = inputs[0].shape
    # Time-major (D, T, B, features) throughout, so each step reads a contiguous slice.
    x = torch.stack(list(inputs)).transpose(1, 2).contiguous()
    keep = None
    if any(m is not None for m in masks):
        full = torch.stack([m if m is not None else torch.ones(batch_size, n_steps, dtype=torch.bool, device=x.device)
                            for m in masks])
        keep = keep_mask(full)

    def run_layer(k: int, x: torch.Tensor) -> tuple[torch.Tensor, State]:
        layers = [s.layers[k] for s in stacks]
        zero_h, zero_c = layers[0].zero_state(batch_size, x)
        h0 = torch.stack([st[k][0] if st is not None else zero_h for st in states])
        c0 = torch.stack([st[k][1] if st is not None else zero_c for st in states])
        if n_steps == 0:
            return x.new_zeros(n_dirs, 0, batch_size, options.projection_dim), (h0, c0)
        y, h, c = fused_layers(layers, x, h0, c0, keep)
        return y, (h, c)

    outputs, new_states = _run_layers(first, x, run_layer)
    return [([y[d].transpose(0, 1).contiguous() for y in outputs],
             [(h[d], c[d]) for h, c in new_states])
            for d in range(n_dirs)]
