"""The training-time language model: the biLM body plus one softmax shared by both directions.

Knows nothing of ranks, devices or files: it takes a batch (``bilm.data`` format) and
the carried LSTM states, and returns losses and new states.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from bilm.modules.bidirectional import BiState, BidirectionalLM, map_state
from bilm.modules.softmax import SoftmaxLayer
from bilm.core.options import BiLMOptions

DIRECTIONS = ("forward", "backward")


@dataclass
class DirectionLoss:
    loss_sum: torch.Tensor  # summed negative log-likelihood over counted positions
    count: torch.Tensor     # number of counted positions

    @property
    def mean(self) -> torch.Tensor:
        return self.loss_sum / self.count.clamp(min=1)


def detach_state(state: Optional[BiState]) -> Optional[BiState]:
    """Truncated BPTT: keep the values, cut the graph."""
    return map_state(state, torch.Tensor.detach)


def reset_state_rows(state: Optional[BiState], rows: torch.Tensor) -> Optional[BiState]:
    """Zero the carried states of the batch rows where ``rows`` (B,) is True."""
    if state is None or not bool(rows.any()):
        return state
    keep = (~rows).unsqueeze(-1)
    return map_state(state, lambda t: t * keep.to(t.dtype))


def _all_valid(direction_batch: dict) -> bool:
    """Whether every position holds data. ``bilm.data`` says so in ``all_valid`` (known on the CPU);
    asking the mask on a GPU would wait for the device."""
    known = direction_batch.get("all_valid")
    return known if known is not None else bool(direction_batch["mask"].all())


class LanguageModel(nn.Module):
    """``BidirectionalLM`` + ``SoftmaxLayer`` (W [V, projection_dim], b [V], shared by both directions).

    Dropout as bilm-tf: on each LSTM layer's input (inside the stacks) and on the top LSTM
    output before the softmax. Loss = mean of the forward and backward mean losses.
    """

    def __init__(self, options: BiLMOptions, vocab_size: int, dropout: float = 0.1,
                 lstm_impl: str = "fused", sparse_softmax: bool = True, lstm_compile: str = "auto"):
        super().__init__()
        if options.char_cnn is None and options.n_tokens_vocab is None:
            options.n_tokens_vocab = vocab_size
        self.options = options
        self.dropout = dropout
        self.bilm = BidirectionalLM(options, dropout=dropout, lstm_impl=lstm_impl, lstm_compile=lstm_compile)
        self.softmax = SoftmaxLayer(vocab_size, options.projection_dim, sparse=sparse_softmax)

    def _inputs(self, direction_batch: dict) -> torch.Tensor:
        if self.bilm.char_inputs:
            return direction_batch["char_ids"]
        # Word inputs: ids shifted by one, 0 where there is no data.
        return (direction_batch["token_ids"] + 1) * direction_batch["mask"]

    def top_outputs(self, batch: dict, state: Optional[BiState]) -> tuple[dict[str, torch.Tensor], BiState]:
        """Top LSTM outputs of both directions (B, T, projection_dim) and the new states."""
        fwd, bwd = batch["forward"], batch["backward"]
        # One token-encoder call for both directions: the char CNN runs on the larger batch.
        tokens = self.bilm.embed_tokens(torch.cat([self._inputs(fwd), self._inputs(bwd)]))
        fwd_tokens, bwd_tokens = tokens.chunk(2)
        masks = [None if _all_valid(b) else b["mask"] for b in (fwd, bwd)]
        fwd_out, bwd_out, new_state = self.bilm.run_lstms(fwd_tokens, bwd_tokens, state, *masks)
        return {"forward": fwd_out[-1], "backward": bwd_out[-1]}, new_state

    def forward(self, batch: dict, state: Optional[BiState], n_negative_samples: int,
                generator: Optional[torch.Generator] = None
                ) -> tuple[torch.Tensor, dict[str, DirectionLoss], BiState]:
        """Sampled-softmax training loss. Returns (loss, per-direction losses, new detached states)."""
        top, new_state = self.top_outputs(batch, state)
        losses = {}
        for direction in DIRECTIONS:
            hidden = nn.functional.dropout(top[direction], self.dropout, self.training)
            b = batch[direction]
            loss_sum, count = self.softmax(hidden, b["next_token_ids"], b["mask"], n_negative_samples, generator)
            losses[direction] = DirectionLoss(loss_sum, count)
        loss = 0.5 * (losses["forward"].mean + losses["backward"].mean)
        return loss, losses, detach_state(new_state)

    @torch.no_grad()
    def evaluate(self, batch: dict, state: Optional[BiState]) -> tuple[dict[str, DirectionLoss], BiState]:
        """Full-softmax summed NLL and counts per direction (call in eval mode)."""
        top, new_state = self.top_outputs(batch, state)
        losses = {}
        for direction in DIRECTIONS:
            b = batch[direction]
            loss_sum, count = self.softmax.full_loss(top[direction], b["next_token_ids"], b["mask"])
            losses[direction] = DirectionLoss(loss_sum, count)
        return losses, new_state
