"""The bidirectional language model body: a shared token encoder and separate forward and backward LSTM stacks."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from bilm.core.errors import InputError
from bilm.modules.lstm import LstmStack, State, can_run_together, run_fused_stacks
from bilm.modules.token_encoder import CharCNNEncoder, WordEmbeddingEncoder
from bilm.core.options import BiLMOptions

BiState = dict[str, Optional[list[State]]]  # {"forward": per-layer states, "backward": ...}


def map_state(state: Optional[BiState], fn: Callable[[torch.Tensor], torch.Tensor]) -> Optional[BiState]:
    """``fn`` applied to every tensor of a BiState (h and c of every layer of both directions)."""
    if state is None:
        return None
    return {d: None if layers is None else [tuple(fn(t) for t in layer) for layer in layers]
            for d, layers in state.items()}


def zip_states(a: BiState, b: BiState, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> BiState:
    """``fn(ta, tb)`` for the matching tensors of two BiStates of the same structure."""
    return {d: [tuple(fn(ta, tb) for ta, tb in zip(layer_a, layer_b)) for layer_a, layer_b in zip(a[d], b[d])]
            for d in a}


class RowStates:
    """LSTM states carried from one batch to the next, row by row: the stateful inference of
    bilm-tf (its state variables) and of AllenNLP's ``Elmo``. Row k of a batch starts where row k
    of the previous batch ended; a larger batch gets zero states for its new rows, a smaller one
    leaves the rows beyond it as they were (a row that is all padding keeps its state too: the
    LSTM does not advance on masked steps)."""

    def __init__(self) -> None:
        self.state: Optional[BiState] = None

    def reset(self) -> None:
        self.state = None

    def get(self, batch_size: int) -> Optional[BiState]:
        if self.state is None:
            return None
        have = self.state["forward"][0][0].shape[0]
        if have < batch_size:  # grow with zero rows, as bilm-tf's zero-initialized state variables
            self.state = map_state(self.state, lambda t: torch.cat([t, t.new_zeros(batch_size - have, t.shape[1])]))
        return map_state(self.state, lambda t: t[:batch_size])

    def update(self, new_state: BiState, batch_size: int) -> None:
        new_state = map_state(new_state, torch.Tensor.detach)
        if self.state is None or self.state["forward"][0][0].shape[0] <= batch_size:
            self.state = new_state
            return
        self.state = zip_states(new_state, self.state, lambda new, old: torch.cat([new, old[batch_size:]]))


def reverse_padded(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse the first ``lengths[b]`` steps of each row of (B, T, ...), leaving padding in place
    (TF's reverse_sequence)."""
    n_steps = x.shape[1]
    steps = torch.arange(n_steps, device=x.device).unsqueeze(0)
    lengths = lengths.unsqueeze(1)
    index = torch.where(steps < lengths, lengths - 1 - steps, steps)
    index = index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index)


class BidirectionalLM(nn.Module):
    """Token encoder + forward and backward LSTM stacks (separate weights), as bilm-tf.

    The softmax is not here: it belongs to training (``bilm.modules.language_model``); inference needs only this.
    ``lstm_impl`` and ``lstm_compile`` are the stacks' ``impl`` and ``compile`` (``LstmStack``).
    """

    def __init__(self, options: BiLMOptions, dropout: float = 0.0, lstm_impl: str = "fused",
                 lstm_compile: str = "auto"):
        super().__init__()
        self.options = options
        dim = options.projection_dim
        if options.char_cnn is not None:
            self.token_encoder: nn.Module = CharCNNEncoder(options.char_cnn, dim)
        else:
            if not options.n_tokens_vocab:
                raise InputError("word-input mode (no 'char_cnn' in options) needs 'n_tokens_vocab'")
            self.token_encoder = WordEmbeddingEncoder(options.n_tokens_vocab, dim)
        self.forward_lstm = LstmStack(dim, options.lstm, dropout, lstm_impl, lstm_compile)
        self.backward_lstm = LstmStack(dim, options.lstm, dropout, lstm_impl, lstm_compile)

    @property
    def char_inputs(self) -> bool:
        return self.options.char_cnn is not None

    @property
    def n_layers(self) -> int:
        """Number of ELMo layers: the token layer plus one per LSTM layer."""
        return self.options.lstm.n_layers + 1

    def embed_tokens(self, inputs: torch.Tensor) -> torch.Tensor:
        """Char ids (B, T, C) or shifted token ids (B, T); 0 marks padding in both."""
        return self.token_encoder(inputs)

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor, state: Optional[BiState] = None
                ) -> tuple[list[torch.Tensor], BiState]:
        """ELMo layers of sentences padded at the end: inputs as ``embed_tokens``, mask (B, T) bool.

        Returns ``n_layers`` tensors (B, T, 2 * projection_dim) and the new LSTM states.
        """
        return self.contextualize(self.embed_tokens(inputs), mask, state)

    def contextualize(self, tokens: torch.Tensor, mask: torch.Tensor, state: Optional[BiState] = None
                      ) -> tuple[list[torch.Tensor], BiState]:
        """Token vectors (B, T, projection_dim) -> ELMo layers: the token layer (its vector twice,
        as bilm-tf) then each LSTM layer, forward and backward concatenated; zero where masked.
        The backward stack reads each row reversed within its length (TF's reverse_sequence)."""
        tokens = tokens * mask.unsqueeze(-1)
        lengths = mask.sum(dim=1)
        forward_out, backward_out, new_state = self.run_lstms(tokens, reverse_padded(tokens, lengths), state, mask, mask)
        layers = [torch.cat([tokens, tokens], dim=-1)]
        for fwd, bwd in zip(forward_out, backward_out):
            layers.append(torch.cat([fwd, reverse_padded(bwd, lengths)], dim=-1))
        return layers, new_state

    def run_lstms(self, forward_inputs: torch.Tensor, backward_inputs: torch.Tensor,
                  state: Optional[BiState] = None, forward_mask: Optional[torch.Tensor] = None,
                  backward_mask: Optional[torch.Tensor] = None
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor], BiState]:
        """Both LSTM stacks over their own inputs (B, T, projection_dim): the backward inputs are
        already reversed (training reads a reversed stream; inference reverses within lengths).
        Returns each stack's per-layer outputs and the new states. The one place both directions
        run, so an implementation may run them concurrently."""
        state = state or {"forward": None, "backward": None}
        stacks, inputs = [self.forward_lstm, self.backward_lstm], [forward_inputs, backward_inputs]
        if can_run_together(stacks, inputs):
            # Both directions in lock step: one batched matmul per time step serves both.
            (forward_out, forward_state), (backward_out, backward_state) = run_fused_stacks(
                stacks, inputs, [state["forward"], state["backward"]], [forward_mask, backward_mask])
        else:
            forward_out, forward_state = self.forward_lstm(forward_inputs, state["forward"], forward_mask)
            backward_out, backward_state = self.backward_lstm(backward_inputs, state["backward"], backward_mask)
        return forward_out, backward_out, {"forward": forward_state, "backward": backward_state}
