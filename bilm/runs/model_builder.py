"""The one place a ``LanguageModel`` is built from a run's config: for training (``TrainStep``), from
a checkpoint read back (``trained_model``: evaluate, export, score) and for the bilm-tf import."""
from __future__ import annotations

from bilm.modules.language_model import LanguageModel
from bilm.runs.config import Config


def build_model(cfg: Config, vocab_size: int, training: bool = True) -> LanguageModel:
    """The architecture ``cfg.model`` with ``vocab_size`` softmax rows. ``training``: the run's
    dropout and sparse softmax; else no dropout and a dense softmax (evaluation, export). The LSTM
    implementation and its compile mode come from ``cfg.train`` either way."""
    t = cfg.train
    return LanguageModel(cfg.model, vocab_size, dropout=t.dropout if training else 0.0, lstm_impl=t.lstm_impl,
                         lstm_compile=t.lstm_compile, sparse_softmax=t.sparse_softmax if training else False)
