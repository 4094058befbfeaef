"""The corpus manifest, ``manifest.json``: the one module that writes and reads it.

``bilm prepare`` (``data_tools/prepare.py``) writes it with ``write_manifest``; ``bilm train``,
``bilm evaluate`` and ``LMDataset`` read it with ``load_manifest``. The file names its format and
format version: a reader refuses a version newer than the one it knows (rather than misreading
it) and reads a file with no version as version 1. Paths inside the file are relative to its
directory, so a prepared corpus can be moved as a whole; ``load_manifest`` makes them absolute.
"""
from __future__ import annotations

import json
import os

from bilm.core.atomic import atomic_open
from bilm.core.errors import InputError, read_json

MANIFEST_FORMAT = "bilm-data"
# The version this bilm writes and the newest it reads. Raise it when a change to the file
# would make an older bilm misread it; a manifest without "format_version" is version 1.
MANIFEST_VERSION = 1


def write_manifest(path: str | os.PathLike, fields: dict) -> dict:
    """Write ``fields`` to ``path`` after the format and format version; returns what was written.

    The file appears whole or not at all (written beside it, then renamed): a manifest is the
    sign that everything it names has been written.
    """
    path = os.fspath(path)
    manifest = {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, **fields}
    with atomic_open(path) as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return manifest


def load_manifest(path: str | os.PathLike) -> dict:
    """Read a ``manifest.json`` written by ``bilm prepare``.

    Shard, vocabulary and tokenizer-model paths are resolved to absolute paths (the file
    stores them relative to its own directory); ``manifest["dir"]`` is that directory, ``manifest["path"]``
    the file (for messages).
    """
    path = os.fspath(path)
    manifest = read_json(path)
    if not isinstance(manifest, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InputError(f"{path}: key 'format_version' must be a positive integer, got {version!r}")
    if version > MANIFEST_VERSION:
        raise InputError(f"{path}: format version {version} is newer than this bilm reads "
                         f"({MANIFEST_VERSION}); upgrade bilm")
    base = os.path.dirname(os.path.abspath(path))
    manifest["dir"], manifest["path"] = base, path
    for split in ("train", "heldout"):
        section = manifest.get(split)
        if section is None:
            raise InputError(f"{path}: missing key '{split}'")
        shards = section.get("shards") if isinstance(section, dict) else None
        if not isinstance(shards, list) or not all(isinstance(s, str) for s in shards):
            raise InputError(f"{path}: key '{split}.shards' must be a list of paths")
        section["shards"] = [os.path.join(base, s) for s in shards]
    for key in ("n_train_tokens", "n_train_sentences", "n_heldout_tokens", "n_heldout_sentences"):
        value = manifest.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise InputError(f"{path}: key '{key}' must be a count (an integer >= 0), got {value!r}")
    for key in ("vocab", "vocab_counts"):
        if isinstance(manifest.get(key), str):
            manifest[key] = os.path.join(base, manifest[key])
    tokenizer = manifest.get("tokenizer")
    if isinstance(tokenizer, dict) and isinstance(tokenizer.get("model"), str):
        tokenizer["model"] = os.path.join(base, tokenizer["model"])
    return manifest
