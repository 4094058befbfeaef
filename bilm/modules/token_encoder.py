"""Context-independent token representations: the char CNN (with highway and projection) or a word table."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bilm.core.options import CharCNNOptions


class Highway(nn.Module):
    """bilm-tf's highway: ``y = g * relu(x W_t + b_t) + (1 - g) * x`` with ``g = sigmoid(x W_c + b_c)``."""

    def __init__(self, dim: int, n_layers: int):
        super().__init__()
        self.carry = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_layers))
        self.transform = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_layers))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for carry, transform in zip(self.carry, self.transform):
            std = math.sqrt(1.0 / carry.in_features)
            nn.init.normal_(carry.weight, 0.0, std)
            nn.init.constant_(carry.bias, -2.0)  # start close to the identity, as bilm-tf does
            nn.init.normal_(transform.weight, 0.0, std)
            nn.init.zeros_(transform.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for carry, transform in zip(self.carry, self.transform):
            gate = torch.sigmoid(carry(x))
            x = gate * F.relu(transform(x)) + (1.0 - gate) * x
        return x


class CharCNNEncoder(nn.Module):
    """Char ids (B, T, C), 0 = mask, -> token vectors (B, T, output_dim).

    Char embedding, one convolution per filter width, max over character positions,
    then the activation (bilm-tf's order), highway layers, and a linear projection to
    ``output_dim`` unless the filters already have that width (bilm-tf writes no
    projection then).
    """

    def __init__(self, options: CharCNNOptions, output_dim: int):
        super().__init__()
        self.options = options
        # 262 rows: the 261 published chars shifted by one, row 0 the (zero, frozen) mask.
        self.char_embedding = nn.Embedding(262, options.embedding_dim, padding_idx=0)
        self.convolutions = nn.ModuleList(
            nn.Conv1d(options.embedding_dim, n_filters, kernel_size=width) for width, n_filters in options.filters)
        n_filters = options.n_filters
        self.highway = Highway(n_filters, options.n_highway) if options.n_highway > 0 else None
        self.projection = nn.Linear(n_filters, output_dim) if n_filters != output_dim else None
        self.output_dim = output_dim
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.uniform_(self.char_embedding.weight, -1.0, 1.0)
            self.char_embedding.weight[0].zero_()
        for conv in self.convolutions:
            if self.options.activation == "relu":
                nn.init.uniform_(conv.weight, -0.05, 0.05)  # bilm-tf (Kim et al. 2015) for relu
            else:  # bilm-tf's "glorot" for tanh: normal with std sqrt(1 / (width * char_dim))
                nn.init.normal_(conv.weight, 0.0, math.sqrt(1.0 / (conv.kernel_size[0] * conv.in_channels)))
            nn.init.zeros_(conv.bias)
        if self.projection is not None:
            nn.init.normal_(self.projection.weight, 0.0, math.sqrt(1.0 / self.projection.in_features))
            nn.init.zeros_(self.projection.bias)

    def forward(self, char_ids: torch.Tensor) -> torch.Tensor:
        batch_shape = char_ids.shape[:-1]
        flat = char_ids.reshape(-1, char_ids.shape[-1])
        if flat.shape[0] > 256:  # below that, the sort inside torch.unique costs more than it saves
            # A batch repeats its frequent words many times: run the CNN once per distinct
            # token (a fraction of the rows: docs/measurements.md, "char-cnn-distinct"), then
            # copy the rows out.
            distinct, inverse = torch.unique(flat, dim=0, return_inverse=True)
            x = self.encode_distinct(distinct)[inverse]
        else:
            x = self.encode_distinct(flat)
        return x.reshape(*batch_shape, self.output_dim)

    def encode_distinct(self, char_ids: torch.Tensor) -> torch.Tensor:
        """Char ids (N, C) -> token vectors (N, output_dim)."""
        chars = self.char_embedding(char_ids.long()).transpose(1, 2)  # (N, E, C) for Conv1d
        activation = torch.relu if self.options.activation == "relu" else torch.tanh
        # max() rather than amax(): its backward routes the gradient through the saved argmax
        # instead of comparing every position with the maximum (a third of a CPU step).
        pooled = [activation(conv(chars).max(dim=-1).values) for conv in self.convolutions]
        x = torch.cat(pooled, dim=-1)
        if self.highway is not None:
            x = self.highway(x)
        if self.projection is not None:
            x = self.projection(x)
        return x


class WordEmbeddingEncoder(nn.Module):
    """Word-input mode: token ids shifted by +1 (0 = mask) -> vectors from a (V + 1, dim) table."""

    def __init__(self, vocab_size: int, output_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size + 1, output_dim, padding_idx=0)
        self.output_dim = output_dim
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # bilm-tf's "embedding" variable has no initializer of its own: TF's default, glorot
        # uniform over its [V, dim] shape (our row 0, the mask, is not part of it).
        vocab_size, dim = self.embedding.weight.shape[0] - 1, self.embedding.weight.shape[1]
        bound = math.sqrt(6.0 / (vocab_size + dim))
        with torch.no_grad():
            nn.init.uniform_(self.embedding.weight, -bound, bound)
            self.embedding.weight[0].zero_()

    def forward(self, shifted_token_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(shifted_token_ids.long())
