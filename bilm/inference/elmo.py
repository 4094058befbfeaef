"""``Elmo``: ELMo representations as a module for downstream PyTorch models (AllenNLP's interface).

Same arguments, defaults and outputs as AllenNLP's ``Elmo``, so swapping the import keeps the
numbers: the biLM is frozen (``requires_grad=False``) and *stateful* (each batch row continues
from the LSTM states the same row ended the previous batch with, as AllenNLP and bilm-tf do);
each output representation is its own trainable ``ScalarMix`` of the biLM layers (computed
with the sentence boundaries, as AllenNLP does, then the boundaries are dropped), followed by
dropout 0.5. ``stateful=False`` starts every batch from zero states: the same sentence then
always gets the same vectors.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from bilm.core.chars import EOS_TOKEN, BOS_TOKEN, CharIdMapper
from bilm.core.errors import InputError
from bilm.modules.bidirectional import RowStates
from bilm.modules.scalar_mix import ScalarMix
from bilm.core.precision import autocast, check_precision
from bilm.modules.published import model_files
from bilm.modules.weight_file import load_bilm

_BATCH_MAPPER = CharIdMapper()


def batch_to_ids(sentences: Sequence[Sequence[str]]) -> torch.Tensor:
    """Char ids (B, T, 50) for ``Elmo``, without sentence boundaries (``Elmo`` adds them)."""
    return torch.from_numpy(_BATCH_MAPPER.batch(sentences, add_sentence_boundaries=False))


class Elmo(nn.Module):
    def __init__(self, options_file: Optional[str] = None, weight_file: Optional[str] = None,
                 num_output_representations: int = 1, requires_grad: bool = False, do_layer_norm: bool = False,
                 dropout: float = 0.5, vocab_to_cache: Optional[list[str]] = None,
                 keep_sentence_boundaries: bool = False, scalar_mix_parameters: Optional[list[float]] = None,
                 *, stateful: bool = True, lstm_impl: str = "fused", precision: str = "fp32"):
        """``options_file``/``weight_file`` as ``ElmoEmbedder`` takes them: paths or URLs, or a
        published model's name (or a model directory) alone, or nothing for ``original``.
        ``scalar_mix_parameters``: fixed, untrained mixing weights (AllenNLP's meaning).
        ``precision="bf16"`` runs the biLM under bf16 autocast (the representations are float32)."""
        super().__init__()
        self.precision = check_precision(precision)
        if vocab_to_cache is not None:
            raise InputError("vocab_to_cache is not supported: the char CNN runs once per distinct token of a "
                             "batch already; for a precomputed cache use ElmoEmbedder(token_embedding_file=...)")
        options_file, weight_file = model_files(options_file, weight_file)
        self.bilm = load_bilm(options_file, weight_file, lstm_impl)
        if not self.bilm.char_inputs:
            raise InputError(f"{options_file}: Elmo needs a char-CNN model")
        for p in self.bilm.parameters():
            p.requires_grad_(requires_grad)
        self.scalar_mixes = nn.ModuleList(
            ScalarMix(self.bilm.n_layers, do_layer_norm, initial_weights=scalar_mix_parameters,
                      trainable=scalar_mix_parameters is None)
            for _ in range(num_output_representations))
        self.dropout = nn.Dropout(dropout)
        self.keep_sentence_boundaries = keep_sentence_boundaries
        self.stateful = stateful
        self._states = RowStates()
        boundaries = CharIdMapper(self.bilm.options.char_cnn.max_characters_per_token, ())
        self.register_buffer("_bos", torch.from_numpy(boundaries.table[boundaries.row(BOS_TOKEN)]), False)
        self.register_buffer("_eos", torch.from_numpy(boundaries.table[boundaries.row(EOS_TOKEN)]), False)

    def reset_states(self) -> None:
        self._states.reset()

    def get_output_dim(self) -> int:
        return self.bilm.options.output_dim

    def forward(self, char_ids: torch.Tensor) -> dict[str, object]:
        """char_ids (..., T, 50) from ``batch_to_ids`` -> {"elmo_representations": [(..., T, D)] * n,
        "mask": (..., T)} (T + 2 with ``keep_sentence_boundaries``)."""
        leading = char_ids.shape[:-2]
        char_ids = char_ids.reshape(-1, *char_ids.shape[-2:])
        mask = char_ids[..., 0] > 0
        lengths = mask.sum(dim=1)
        batch_size, n_steps, n_chars = char_ids.shape
        # Wrap each sentence in <S> .. </S>, as AllenNLP's biLM does.
        with_boundaries = char_ids.new_zeros(batch_size, n_steps + 2, n_chars)
        with_boundaries[:, 0] = self._bos.to(char_ids.dtype)
        with_boundaries[:, 1:-1] = char_ids
        with_boundaries[torch.arange(batch_size), lengths + 1] = self._eos.to(char_ids.dtype)
        full_mask = with_boundaries[..., 0] > 0
        state = self._states.get(batch_size) if self.stateful else None
        with autocast(char_ids.device, self.precision):
            layers, new_state = self.bilm(with_boundaries, full_mask, state)
        layers = [layer.float() for layer in layers]
        if self.stateful:
            self._states.update(new_state, batch_size)
        representations = []
        for mix in self.scalar_mixes:
            mixed = mix(layers, full_mask)  # layer norm statistics over the boundaries too, as AllenNLP
            if not self.keep_sentence_boundaries:
                mixed = _without_boundaries(mixed, mask)
            representations.append(self.dropout(mixed).reshape(*leading, *mixed.shape[1:]))
        out_mask = full_mask if self.keep_sentence_boundaries else mask
        return {"elmo_representations": representations, "mask": out_mask.reshape(*leading, out_mask.shape[-1])}


def _without_boundaries(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T + 2, D) with <S> and </S> around each sentence -> (B, T, D), zero where the input
    ``mask`` (B, T) is False: past each sentence, as ``batch_to_ids`` left-aligns them."""
    return x[:, 1:-1] * mask.unsqueeze(-1).to(x.dtype)
