"""bilm-tf's checkpoint arrays into a ``LanguageModel`` and, for Adagrad, its optimizer state.

The arrays come from ``bilm.formats.bilmtf.split_tensors``: the weights in the published weight
file's names go through the same table as ``weights.hdf5`` (``load_weight_arrays``); the
accumulators have the same names and layouts, so they go through a twin of the body.
"""
from __future__ import annotations

import numpy as np

from bilm.formats.weights import SOFTMAX_BIAS, SOFTMAX_WEIGHT, WeightFileError
from bilm.modules.weight_file import load_weight_arrays


def load_bilmtf_state(model, optimizer, weights: dict[str, np.ndarray], accumulators: dict[str, np.ndarray],
                      step: int, source: str) -> None:
    """Copy bilm-tf weights (and, when ``optimizer`` is an Adagrad, its accumulators) into a ``LanguageModel``."""
    import torch


    carry = load_bilmtf_body(model, optimizer, weights, accumulators, step, source)
    softmax_w, softmax_b = softmax_arrays(weights, source)
    if softmax_w.shape != tuple(model.softmax.weight.shape):
        raise WeightFileError(f"{source}: 'lm/softmax/W' has shape {softmax_w.shape}, the model needs "
                              f"{tuple(model.softmax.weight.shape)} (vocabulary size x projection_dim): another vocab?")
    with torch.no_grad():
        model.softmax.weight.copy_(torch.from_numpy(np.asarray(softmax_w)))
        model.softmax.bias.copy_(torch.from_numpy(np.asarray(softmax_b)))
    if carry:
        for param, accumulator in zip((model.softmax.weight, model.softmax.bias),
                                      softmax_arrays(accumulators, f"{source} (Adagrad accumulators)")):
            optimizer.state[param]["sum"].copy_(torch.from_numpy(np.asarray(accumulator)))
            optimizer.state[param]["step"].fill_(float(step))


def softmax_arrays(arrays: dict[str, np.ndarray], source: str) -> tuple[np.ndarray, np.ndarray]:
    """``lm/softmax/W`` (vocabulary x dim) and ``lm/softmax/b`` of a split checkpoint, checked."""
    for name in (SOFTMAX_WEIGHT, SOFTMAX_BIAS):
        if name not in arrays:
            raise WeightFileError(f"{source}: no 'lm/{name}' variable")
    weight, bias = arrays[SOFTMAX_WEIGHT], arrays[SOFTMAX_BIAS]
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise WeightFileError(f"{source}: 'lm/{SOFTMAX_WEIGHT}' {weight.shape} and 'lm/{SOFTMAX_BIAS}' {bias.shape} "
                              "are not a softmax (rows x dim, one bias a row)")
    return weight, bias


def carries_adagrad_state(optimizer, source: str) -> bool:
    """Whether bilm-tf's Adagrad accumulators apply to ``optimizer`` (a warning when they do not)."""
    import torch

    if optimizer is None:
        return False
    if not isinstance(optimizer, torch.optim.Adagrad):
        import warnings
        warnings.warn(f"{source}: the optimizer is {type(optimizer).__name__}, not bilm-tf's Adagrad: "
                      "its state starts afresh (the accumulators are not carried over)", stacklevel=3)
        return False
    return True


def load_bilmtf_body(model, optimizer, weights: dict[str, np.ndarray], accumulators: dict[str, np.ndarray],
                     step: int, source: str) -> bool:
    """The char CNN (or word table) and LSTMs of bilm-tf into ``model.bilm``, and their Adagrad
    accumulators into ``optimizer``; True when the accumulators were carried."""
    import copy

    load_weight_arrays(model.bilm, weights, source, ignore=(SOFTMAX_WEIGHT, SOFTMAX_BIAS))
    if not carries_adagrad_state(optimizer, source):
        return False
    # The accumulators have the weights' names and layouts: load them into a twin of the body
    # through the same table, then move each into the optimizer state of its parameter.
    twin = copy.deepcopy(model.bilm)
    load_weight_arrays(twin, accumulators, f"{source} (Adagrad accumulators)", ignore=(SOFTMAX_WEIGHT, SOFTMAX_BIAS))
    initial = optimizer.param_groups[0]["initial_accumulator_value"]
    if twin.char_inputs:  # our row 0 is the mask: never updated, its accumulator stays initial
        twin.token_encoder.char_embedding.weight.data[0] = initial
    else:
        twin.token_encoder.embedding.weight.data[0] = initial
    for param, accumulator in zip(model.bilm.parameters(), twin.parameters()):
        state = optimizer.state[param]
        state["sum"].copy_(accumulator.detach())
        state["step"].fill_(float(step))
    return True
