"""Published weights loaded into a model being trained (``bilm train --init-weights``, ``--init-softmax``)."""
from __future__ import annotations

from typing import Optional

import h5py
import numpy as np
import torch

from bilm.core.errors import InputError
from bilm.formats.weights import SOFTMAX_BIAS, SOFTMAX_WEIGHT, WeightFileError, reading
from bilm.modules.weight_file import load_weights
from bilm.modules.language_model import LanguageModel
from bilm.core.options import BiLMOptions
from bilm.core.vocab import read_tokens


def load_pretrained(model: LanguageModel, weight_file: str, options_file: Optional[str] = None,
                    softmax_file: Optional[str] = None, softmax_vocab_file: Optional[str] = None,
                    vocab: Optional[list[str]] = None) -> dict:
    """Start ``model`` from published weights: char CNN, highway, projection and both LSTM stacks.

    The softmax is loaded from ``softmax_file`` when given, else left freshly initialized. When the
    training vocabulary differs from the one the softmax was trained with (``softmax_vocab_file``),
    rows are matched by token and new tokens keep their fresh rows.
    """
    if options_file is not None:
        published = BiLMOptions.from_file(options_file).to_dict()
        ours = model.options.to_dict()
        for d in (published, ours):
            d.get("char_cnn", {}).pop("n_characters", None)
            d.pop("n_tokens_vocab", None)
        if published != ours:
            raise InputError(f"{options_file} describes another architecture than the model being trained "
                             f"({_dict_diff(published, ours)})")
    load_weights(model.bilm, weight_file)
    report = {"weights": weight_file, "softmax_rows_loaded": 0}
    if softmax_file is None:
        return report
    try:
        f = h5py.File(softmax_file, "r")
    except OSError as e:
        raise WeightFileError(f"{softmax_file} is not a readable HDF5 file ({e})") from None
    with f, reading(softmax_file):
        for name in (SOFTMAX_WEIGHT, SOFTMAX_BIAS):
            if name not in f:
                raise WeightFileError(f"{softmax_file}: missing dataset '{name}'")
        weight, bias = f[SOFTMAX_WEIGHT][...], f[SOFTMAX_BIAS][...]
    if weight.ndim != 2 or weight.shape[1] != model.softmax.dim or bias.shape != (weight.shape[0],) \
            or not (np.issubdtype(weight.dtype, np.floating) and np.issubdtype(bias.dtype, np.floating)):
        raise WeightFileError(f"{softmax_file}: '{SOFTMAX_WEIGHT}' {weight.shape} {weight.dtype} / '{SOFTMAX_BIAS}' "
                              f"{bias.shape} {bias.dtype} do not fit projection_dim {model.softmax.dim} (float)")
    with torch.no_grad():
        if softmax_vocab_file is None or vocab is None:
            if weight.shape[0] != model.softmax.vocab_size:
                raise WeightFileError(f"{softmax_file}: {weight.shape[0]} rows, the training vocabulary has "
                                      f"{model.softmax.vocab_size}; pass the vocab the softmax was trained with")
            model.softmax.weight.copy_(torch.from_numpy(weight))
            model.softmax.bias.copy_(torch.from_numpy(bias))
            report["softmax_rows_loaded"] = weight.shape[0]
        else:
            old_row = {t: i for i, t in enumerate(read_tokens(softmax_vocab_file))}
            if len(old_row) != weight.shape[0]:
                raise WeightFileError(f"{softmax_vocab_file} has {len(old_row)} tokens, {softmax_file} has "
                                      f"{weight.shape[0]} rows")
            pairs = [(i, old_row[t]) for i, t in enumerate(vocab) if t in old_row]
            if pairs:
                new, old = (torch.tensor(x) for x in zip(*pairs))
                model.softmax.weight[new] = torch.from_numpy(weight)[old]
                model.softmax.bias[new] = torch.from_numpy(bias)[old]
            report["softmax_rows_loaded"] = len(pairs)
    return report


def _dict_diff(a: dict, b: dict, prefix: str = "") -> str:
    diffs = []
    for key in sorted(set(a) | set(b)):
        where = f"{prefix}{key}"
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            inner = _dict_diff(a[key], b[key], where + ".")
            if inner:
                diffs.append(inner)
        elif a.get(key) != b.get(key):
            diffs.append(f"{where}: file {a.get(key)!r} vs model {b.get(key)!r}")
    return "; ".join(diffs)
