"""The published ELMo weight file as a file: its HDF5 opened with errors that name it, the
softmax dataset names, and the names a file holds. Which dataset is which parameter (and the
layout change between them) is ``bilm.modules.weight_file``'s table.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import h5py

from bilm.core.errors import InputError

SOFTMAX_WEIGHT, SOFTMAX_BIAS = "softmax/W", "softmax/b"  # datasets of softmax.hdf5 (export --include-softmax)


class WeightFileError(InputError):
    """A weight file that is missing, unreadable, or disagrees with its options."""


def open_weight_file(path: str, mode: str = "r") -> h5py.File:
    if mode == "r" and not os.path.exists(path):
        raise FileNotFoundError(f"weight file not found: {path}")
    try:
        return h5py.File(path, mode)
    except OSError as e:
        reason = str(e).splitlines()[0] if str(e) else repr(e)
        raise WeightFileError(f"{path} is not a readable HDF5 file ({reason})") from None


@contextmanager
def reading(path: str) -> Iterator[None]:
    """What the HDF5 library raises for a damaged file (OSError, RuntimeError, KeyError, TypeError,
    ...: it depends on where the damage is) as one ``WeightFileError`` naming the file."""
    try:
        yield
    except (WeightFileError, FileNotFoundError):
        raise
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise WeightFileError(f"{path}: damaged HDF5 file ({type(e).__name__}{': ' + reason if reason else ''})") \
            from None


def dataset_names(arrays) -> list[str]:
    if isinstance(arrays, h5py.Group):
        names: list[str] = []
        arrays.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        return names
    return list(arrays)
