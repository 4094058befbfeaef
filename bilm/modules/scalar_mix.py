"""ScalarMix: a task-specific weighted sum of ELMo layers (bilm-tf's ``weight_layers``)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from bilm.core.errors import InputError


class ScalarMix(nn.Module):
    """``gamma * sum_k softmax(w)_k * norm(layer_k)``, where ``norm`` is an optional layer norm
    computed over the masked (real) positions only, as bilm-tf does."""

    def __init__(self, n_layers: int, do_layer_norm: bool = False,
                 initial_weights: Optional[Sequence[float]] = None, initial_gamma: float = 1.0,
                 trainable: bool = True):
        super().__init__()
        if initial_weights is None:
            initial_weights = [0.0] * n_layers
        if len(initial_weights) != n_layers:
            raise InputError(f"initial_weights has {len(initial_weights)} values, expected {n_layers}")
        self.n_layers = n_layers
        self.do_layer_norm = do_layer_norm
        self.weights = nn.Parameter(torch.tensor([float(w) for w in initial_weights]), requires_grad=trainable)
        self.gamma = nn.Parameter(torch.tensor([float(initial_gamma)]), requires_grad=trainable)

    @staticmethod
    def _masked_layer_norm(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # bilm-tf: mean and variance over all unmasked positions and all dims, epsilon 1e-12.
        m = mask.unsqueeze(-1).to(x.dtype)
        n = m.sum() * x.shape[-1]
        mean = (x * m).sum() / n
        variance = (((x - mean) * m) ** 2).sum() / n
        return (x - mean) / torch.sqrt(variance + 1e-12)

    def forward(self, layers: Sequence[torch.Tensor], mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if len(layers) != self.n_layers:
            raise InputError(f"got {len(layers)} layers, this ScalarMix mixes {self.n_layers}")
        normed_weights = torch.softmax(self.weights, dim=0)
        if self.do_layer_norm and mask is None:
            raise InputError("do_layer_norm needs the mask")
        mixed = 0
        for weight, layer in zip(normed_weights, layers):
            mixed = mixed + weight * (self._masked_layer_norm(layer, mask) if self.do_layer_norm else layer)
        return self.gamma * mixed
