"""What was trained before, as a model: a run's checkpoint (for evaluate, export) and published
weights loaded into a model being trained (``--init-weights``, ``--init-softmax``)."""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import h5py
import numpy as np
import torch

from bilm.checkpoint import (BEST_NAME, CheckpointError, best_checkpoint_path, load_checkpoint, load_latest_valid,
                             load_model_state)
from bilm.config import Config, config_from_dict
from bilm.errors import InputError
from bilm.model import LanguageModel
from bilm.options import BiLMOptions
from bilm.vocab import read_tokens
from bilm.weights import WeightFileError, load_weights, reading
from bilm.text import TextPipeline

SOFTMAX_WEIGHT, SOFTMAX_BIAS = "softmax/W", "softmax/b"  # datasets of softmax.hdf5 (export --include-softmax)


def resolve_checkpoint(path: str, mmap: bool = False, best: bool = False) -> tuple[str, dict]:
    """A checkpoint file, or a run directory (its newest valid checkpoint, or with ``best`` its
    ``best.pt``: the lowest heldout perplexity); ``mmap`` as in ``load_checkpoint``."""
    if best and not os.path.isdir(path):
        raise InputError(f"--best takes a run directory (it exports RUN/checkpoints/{BEST_NAME}), got the file {path}")
    if os.path.isdir(path):
        directory = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
        if best:
            found = best_checkpoint_path(directory)
            if not os.path.exists(found):
                raise FileNotFoundError(f"no {BEST_NAME} in {directory}: it is written at a checkpoint with the lowest "
                                        "heldout perplexity so far, so the run needs heldout data (see --eval-data)")
            return found, load_checkpoint(found, mmap=mmap)
        found, payload = load_latest_valid(directory, mmap=mmap)
        if payload is None:
            raise FileNotFoundError(f"no readable checkpoint in {directory}")
        return found, payload
    return path, load_checkpoint(path, mmap=mmap)


class Trained(NamedTuple):
    model: LanguageModel          # eval mode, CPU
    config: Config
    vocab: list[str]
    path: str                     # the checkpoint file it came from
    text_pipeline: Optional[TextPipeline]  # how raw text became its training tokens; None: not recorded


def model_from_checkpoint(path: str, best: bool = False) -> Trained:
    """The trained ``LanguageModel``, its config, vocab and text pipeline, from a checkpoint or run directory.

    The weights stay one copy, mapped from the checkpoint file: the model is built on the meta
    device and takes the checkpoint's tensors, and the optimizer state (as large as the model
    with Adagrad) is never read. Loading the file and then copying it into a fresh model held
    about three times the model (1.6 GB each for an 800k-word softmax)."""
    found, payload = resolve_checkpoint(path, mmap=True, best=best)
    try:
        cfg = config_from_dict(payload["config"], where=f"{found} (its config)")
    except ValueError as e:
        raise CheckpointError(str(e).replace("\n", "; ")) from None
    vocab = payload.get("vocab")
    if not isinstance(vocab, list) or not all(isinstance(t, str) for t in vocab):
        raise CheckpointError(f"{found}: checkpoint has no vocabulary (key 'vocab': a list of tokens)")
    with torch.device("meta"):
        model = LanguageModel(cfg.model, len(vocab), dropout=0.0, lstm_impl=cfg.train.lstm_impl,
                          lstm_compile=cfg.train.lstm_compile, sparse_softmax=False)
    load_model_state(model, {k: v.float() if v.is_floating_point() else v for k, v in payload["model"].items()},
                     found, assign=True)
    state = payload.get("text_pipeline")
    try:
        pipeline = TextPipeline.from_state(state) if state else None
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{found}: its text pipeline does not load ({e})") from None
    return Trained(model.eval(), cfg, vocab, found, pipeline)


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
