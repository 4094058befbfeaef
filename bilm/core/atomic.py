"""Outputs that appear whole or not at all: write under a temporary name beside the final one,
flush to disk, rename. The one place bilm does this (checkpoints, configs, manifests, exports,
embeddings, vocabularies).

A process killed at any moment (``kill -9``, a dead node) leaves at the final path either the
previous file or none, never a truncated one that loads: ``os.replace`` is atomic within a file
system. What it leaves under the temporary name (``PATH.tmpPID``) the next writer of ``PATH``
removes (``remove_stale``).
"""
from __future__ import annotations

import glob
import os
import re
import shutil
from contextlib import contextmanager
from typing import IO, Iterator

_TMP = re.compile(r"\.tmp(\d+)$")


def temporary_name(path: str) -> str:
    """Where ``path`` is written before it is renamed into place (this process's own name)."""
    return f"{path}.tmp{os.getpid()}"


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def fsync_path(path: str, recursive: bool = True) -> None:
    """Flush a file, or a directory (its names; with ``recursive`` its files too), to disk."""
    if recursive and os.path.isdir(path):
        for name in os.listdir(path):
            fsync_path(os.path.join(path, name))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse to fsync a directory: the rename still orders the data
        if not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(path: str) -> list[str]:
    """Delete what killed writers of ``path`` left (``PATH.tmpPID`` of processes that are gone)."""
    stale = []
    for candidate in glob.glob(glob.escape(path) + ".tmp*"):
        match = _TMP.search(candidate)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            _remove(candidate)
            stale.append(candidate)
    return stale


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields the temporary name to write ``path`` under (a file, or a directory to fill, which can
    replace only a missing or empty directory); when the block completes it is flushed to disk and
    renamed to ``path``; when it fails it is removed."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    tmp = temporary_name(path)
    remove_stale(path)
    _remove(tmp)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    try:
        fsync_path(directory, recursive=False)  # the rename itself reaches the disk
    except OSError:
        pass


@contextmanager
def atomic_open(path: str, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """``open(path, mode)`` whose file appears at ``path`` only when the block completes."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
