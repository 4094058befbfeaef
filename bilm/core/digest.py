"""The sha256 of a file, read in blocks: what keys a cache entry or an ONNX file to the weights it came from."""
from __future__ import annotations

import hashlib


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()
