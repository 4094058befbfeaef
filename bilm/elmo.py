"""``Elmo``: ELMo representations as a module for downstream PyTorch models (AllenNLP's interface).

The biLM is frozen by default (``requires_grad=False``); each output representation is its
own trainable ``ScalarMix`` of the biLM layers, followed by dropout.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from bilm.chars import EOS_TOKEN, BOS_TOKEN, CharIdMapper
from bilm.modules.bilm import BiState
from bilm.modules.scalar_mix import ScalarMix
from bilm.weights import load_bilm

_BATCH_MAPPER = CharIdMapper()


def batch_to_ids(sentences: Sequence[Sequence[str]]) -> torch.Tensor:
    """Char ids (B, T, 50) for ``Elmo``, without sentence boundaries (``Elmo`` adds them)."""
    return torch.from_numpy(_BATCH_MAPPER.batch(sentences, add_sentence_boundaries=False))


class Elmo(nn.Module):
    def __init__(self, options_file: str, weight_file: str, num_output_representations: int,
                 dropout: float = 0.5, do_layer_norm: bool = False, requires_grad: bool = False,
                 stateful: bool = False, lstm_impl: str = "exact"):
        super().__init__()
        self.bilm = load_bilm(options_file, weight_file, lstm_impl)
        if not self.bilm.char_inputs:
            raise ValueError(f"{options_file}: Elmo needs a char-CNN model")
        for p in self.bilm.parameters():
            p.requires_grad_(requires_grad)
        self.scalar_mixes = nn.ModuleList(
            ScalarMix(self.bilm.n_layers, do_layer_norm) for _ in range(num_output_representations))
        self.dropout = nn.Dropout(dropout)
        self.stateful = stateful
        self._state: Optional[BiState] = None
        boundaries = CharIdMapper(self.bilm.options.char_cnn.max_characters_per_token, ())
        self.register_buffer("_bos", torch.from_numpy(boundaries.table[boundaries.row(BOS_TOKEN)]), False)
        self.register_buffer("_eos", torch.from_numpy(boundaries.table[boundaries.row(EOS_TOKEN)]), False)

    def reset_states(self) -> None:
        self._state = None

    def get_output_dim(self) -> int:
        return self.bilm.options.output_dim

    def forward(self, char_ids: torch.Tensor) -> dict[str, object]:
        """char_ids (B, T, 50) from ``batch_to_ids`` -> {"elmo_representations": [(B, T, D)] * n, "mask": (B, T)}."""
        mask = char_ids[..., 0] > 0
        lengths = mask.sum(dim=1)
        batch_size, n_steps, n_chars = char_ids.shape
        # Wrap each sentence in <S> .. </S>, then drop them from the outputs.
        with_boundaries = char_ids.new_zeros(batch_size, n_steps + 2, n_chars)
        with_boundaries[:, 0] = self._bos.to(char_ids.dtype)
        with_boundaries[:, 1:-1] = char_ids
        with_boundaries[torch.arange(batch_size), lengths + 1] = self._eos.to(char_ids.dtype)
        full_mask = with_boundaries[..., 0] > 0
        state = self._state if self.stateful and self._state is not None and \
            self._state["forward"][0][0].shape[0] == batch_size else None
        layers, new_state = self.bilm(with_boundaries, full_mask, state)
        if self.stateful:
            self._state = {d: [tuple(t.detach() for t in layer) for layer in s] for d, s in new_state.items()}
        layers = [layer[:, 1:-1] * mask.unsqueeze(-1) for layer in layers]
        return {"elmo_representations": [self.dropout(mix(layers, mask)) for mix in self.scalar_mixes],
                "mask": mask}
