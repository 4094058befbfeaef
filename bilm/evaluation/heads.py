"""The small models trained on frozen biLM vectors, and the layer settings they read.

A setting picks the vectors: one layer (``0`` is the context-free token layer, its vector twice
as bilm-tf writes it), ``average`` (the layers' mean) or ``mix``: the ELMo paper's equation 1,
``gamma * sum_k softmax(s)_k * h_k`` (``bilm.modules.scalar_mix.ScalarMix``), trained with the head.

Heads: ``linear`` (classification: on the mean- and max-pooled vectors of the sentence;
tagging: on each token's vector), ``mlp`` (the same inputs, one hidden layer of ``MLP_HIDDEN``
ReLU units, dropout 0.2), and ``cnn``, the classifier of the article this project started from:
two convolutions of 64 filters of width 3 with max pooling (of 2) between them, a 64-unit dense
layer, dropout 0.5, softmax; global max pooling where it flattens, since sentences differ in
length, and "same" padding so a one-token sentence still has a position. For tagging the cnn keeps
every position (no pooling) and applies the dense layers to each token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from bilm.core.errors import InputError
from bilm.modules.scalar_mix import ScalarMix

HEADS = ("linear", "mlp", "cnn")
MLP_HIDDEN = 256
CNN_FILTERS, CNN_WIDTH, CNN_HIDDEN, CNN_DROPOUT = 64, 3, 64, 0.5
RANDOM_PREFIX = "random:"


@dataclass(frozen=True)
class Setting:
    """A layer setting as the user wrote it (``name``), what it reads (``layer``: an index,
    "average" or "mix") and whether it reads the random control's vectors."""
    name: str
    layer: Union[int, str]
    random: bool = False

    @property
    def key(self) -> str:
        return (RANDOM_PREFIX if self.random else "") + self.name


def parse_settings(text: str, n_layers: int, random: bool = False) -> list[Setting]:
    """``mix,0,1,top,average`` -> settings; a layer the model lacks is an error naming its layers."""
    settings = []
    for name in (part.strip() for part in text.split(",")):
        if not name:
            continue
        if name in ("mix", "average"):
            layer: Union[int, str] = name
        elif name == "top":
            layer = n_layers - 1
        elif name.isdigit():
            layer = int(name)
            if layer >= n_layers:
                raise InputError(f"--layers: layer {layer} does not exist (this biLM has layers 0-{n_layers - 1}: "
                                 "0 the token layer, then one per LSTM layer)")
        else:
            raise InputError(f"--layers: {name!r} is not a layer (give a comma list of mix, average, top, 0, 1, ...)")
        if any(s.name == name for s in settings):
            continue
        settings.append(Setting(name, layer, random))
    if not settings:
        raise InputError("--layers names no layer")
    return settings


def select_layers(layers: torch.Tensor, setting: Setting) -> torch.Tensor:
    """A fixed setting's vectors: (..., n_layers, dim) -> (..., dim), float32."""
    if setting.layer == "average":
        return layers.float().mean(dim=-2)
    if setting.layer == "mix":
        raise ValueError("the mix is learned with the head: ProbeNet applies it")
    return layers[..., setting.layer, :].float()


def mean_max_pool(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, D) with mask (B, T) -> (B, 2D): the mean and the max over each sentence's tokens."""
    m = mask.unsqueeze(-1)
    mean = (x * m).sum(1) / m.sum(1).clamp(min=1)
    return torch.cat([mean, x.masked_fill(~m, float("-inf")).amax(1)], dim=-1)


class LinearHead(nn.Module):
    def __init__(self, dim: int, n_classes: int):
        super().__init__()
        self.out = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.out(x)


class MLPHead(nn.Module):
    def __init__(self, dim: int, n_classes: int, hidden: int = MLP_HIDDEN, dropout: float = 0.2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_classes))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.net(x)


class CNNHead(nn.Module):
    """The article's Conv1D classifier (see the module's doc); ``per_token``: the tagging variant."""

    def __init__(self, dim: int, n_classes: int, per_token: bool = False):
        super().__init__()
        padding = CNN_WIDTH // 2
        self.per_token = per_token
        self.conv1 = nn.Conv1d(dim, CNN_FILTERS, CNN_WIDTH, padding=padding)
        self.conv2 = nn.Conv1d(CNN_FILTERS, CNN_FILTERS, CNN_WIDTH, padding=padding)
        self.dense = nn.Linear(CNN_FILTERS, CNN_HIDDEN)
        self.dropout = nn.Dropout(CNN_DROPOUT)
        self.out = nn.Linear(CNN_HIDDEN, n_classes)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        m = mask.unsqueeze(1).to(x.dtype)  # (B, 1, T): padding contributes nothing to a convolution
        h = torch.relu(self.conv1(x.transpose(1, 2) * m)) * m
        if self.per_token:
            h = (torch.relu(self.conv2(h)) * m).transpose(1, 2)  # (B, T, filters)
        else:
            h, m = F.max_pool1d(h, 2, ceil_mode=True), F.max_pool1d(m, 2, ceil_mode=True)
            h = torch.relu(self.conv2(h)).masked_fill(m == 0, float("-inf")).amax(-1)  # global max pooling
        return self.out(self.dropout(torch.relu(self.dense(h))))


class ProbeNet(nn.Module):
    """[scalar mix] -> [mean and max pooling] -> head. Fixed settings are applied to the vectors
    once before training (``select_layers``), so their net holds no mix."""

    def __init__(self, head: nn.Module, mix: Optional[ScalarMix] = None, pool: bool = False):
        super().__init__()
        self.mix = mix
        self.pool = pool
        self.head = head

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.mix is not None:  # x (..., n_layers, dim)
            x = self.mix(list(x.unbind(-2)))
        if self.pool:
            x = mean_max_pool(x, mask)
        return self.head(x, mask)

    def mix_weights(self) -> Optional[tuple[list[float], float]]:
        """The learned layer weights (normalized: softmax) and gamma, or None without a mix."""
        if self.mix is None:
            return None
        return torch.softmax(self.mix.weights.detach(), 0).tolist(), float(self.mix.gamma.detach())


def build_net(task: str, head: str, setting: Setting, n_layers: int, dim: int, n_classes: int) -> ProbeNet:
    mix = ScalarMix(n_layers) if setting.layer == "mix" else None
    pool = task == "classify" and head != "cnn"
    in_dim = 2 * dim if pool else dim
    if head == "linear":
        module: nn.Module = LinearHead(in_dim, n_classes)
    elif head == "mlp":
        module = MLPHead(in_dim, n_classes)
    elif head == "cnn":
        module = CNNHead(dim, n_classes, per_token=task == "tag")
    else:
        raise InputError(f"--head must be one of {', '.join(HEADS)}, got {head!r}")
    # Only a mix pools inside the net: fixed settings are pooled once, beforehand.
    return ProbeNet(module, mix, pool=pool and mix is not None)
