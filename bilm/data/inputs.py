"""Input-file resolution: files, directories and globs -> the list of files to read.

Used by the reader (``bilm.data.shards``, shards named in a manifest or on the command line) and
by ``bilm prepare`` (its raw inputs).
"""
from __future__ import annotations

import glob
import os


def resolve_inputs(specs: list[str], what: str = "input") -> list[str]:
    """Files from files, directories (recursively, hidden files skipped) and globs, each named
    once; ``what`` names them in errors ("input", "shard")."""
    paths: list[str] = []
    for spec in map(os.fspath, specs):
        if os.path.isdir(spec):
            found = []
            for root, dirs, files in os.walk(spec):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found.extend(os.path.join(root, f) for f in sorted(files) if not f.startswith("."))
            if not found:
                raise FileNotFoundError(f"{what} directory {spec!r} contains no files")
        elif os.path.isfile(spec):
            found = [spec]
        else:
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not found:
                raise FileNotFoundError(f"no {what} files match {spec!r}")
        paths.extend(found)
    unique: dict[str, str] = {}  # the same file named twice (by a glob and by name) is read once
    for path in paths:
        unique.setdefault(os.path.realpath(path), path)
    return list(unique.values())
