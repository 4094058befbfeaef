"""Pass 2: the external shuffle. Each bucket file (a random part of the corpus, small
enough for memory) is deduplicated, shuffled and counted in a worker; the main process
then deals the shuffled buckets, in order, into the shard files.

Lines spread at random over buckets, each bucket shuffled, the buckets concatenated: that
is a uniformly shuffled corpus, without ever holding more than a bucket in memory.
"""
from __future__ import annotations

import hashlib
import math
import os
from collections import Counter
from dataclasses import dataclass
from itertools import islice
from typing import IO, Iterator

import numpy as np

from data_tools.vocab_builder import TokenCounts

from bilm.core.errors import InputError

COUNT_CHUNK_LINES = 4096  # tokens are counted a few thousand lines at a time (bounded lists)
MAX_SPLIT_DEPTH = 3


@dataclass(frozen=True)
class BucketTask:
    index: int
    path: str
    seed: int
    dedup: bool
    count: bool  # count tokens (when pass 1 could not: it does not know the duplicates)
    max_bytes: int  # a bigger bucket is first cut into parts that fit


@dataclass
class BucketResult:
    index: int
    path: str  # the shuffled lines
    lines: int = 0
    duplicates: int = 0
    counts: tuple[list[str], np.ndarray] | None = None  # TokenCounts.partial, with task.count


def shuffle_bucket(task: BucketTask) -> BucketResult:
    """Write ``task.path + '.shuffled'``; the input bucket file is removed."""
    result = BucketResult(task.index, task.path + ".shuffled")
    counts: Counter = Counter()
    with open(result.path, "w", encoding="utf-8") as out:
        for part_index, part in enumerate(_parts(task.path, task.max_bytes, task.seed, task.dedup, depth=0)):
            _shuffle_part(part, task, part_index, out, result, counts)
            os.remove(part)
    if task.count:
        result.counts = TokenCounts.pack(counts)
    return result


def _shuffle_part(path: str, task: BucketTask, part_index: int, out: IO[str], result: BucketResult,
                  counts: Counter) -> None:
    with open(path, "rb") as f:
        lines = f.read().decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if task.dedup:
        unique = list(dict.fromkeys(lines))
        result.duplicates += len(lines) - len(unique)
        lines = unique
    order = np.random.default_rng([task.seed, task.index, part_index]).permutation(len(lines))
    lines = [lines[i] for i in order.tolist()]
    result.lines += len(lines)
    for start in range(0, len(lines), COUNT_CHUNK_LINES):
        text = "\n".join(lines[start:start + COUNT_CHUNK_LINES]) + "\n"
        if task.count:
            counts.update(text.split())
        out.write(text)


def _parts(path: str, max_bytes: int, seed: int, dedup: bool, depth: int) -> Iterator[str]:
    """``path`` itself if it fits in memory, else the parts it is cut into (recursively).

    Copies of a line go to the same part (by hash) when deduplicating; otherwise parts are
    drawn at random.
    """
    size = os.path.getsize(path)
    if size <= max_bytes or depth >= MAX_SPLIT_DEPTH:
        yield path
        return
    n_parts = math.ceil(size / max_bytes) + 1
    part_paths = [f"{path}.{depth}.{i}" for i in range(n_parts)]
    files = [open(p, "wb") for p in part_paths]
    rng = np.random.default_rng([seed, depth, size])
    with open(path, "rb") as f:
        while chunk := list(islice(f, 65536)):
            if dedup:
                person = b"part-%d" % depth  # a fresh hash per depth: the parent's lines all share one
                targets = [int.from_bytes(hashlib.blake2b(line.rstrip(b"\n"), digest_size=8, person=person)
                                          .digest(), "little") % n_parts for line in chunk]
            else:
                targets = rng.integers(0, n_parts, size=len(chunk)).tolist()
            for line, target in zip(chunk, targets):
                files[target].write(line if line.endswith(b"\n") else line + b"\n")
    for f in files:
        f.close()
    os.remove(path)
    for part in part_paths:
        yield from _parts(part, max_bytes, seed, dedup, depth + 1)


@dataclass
class ShardInfo:
    path: str  # relative to the output directory
    sentences: int = 0
    tokens: int = 0


class ShardWriter:
    """Deals lines into ``shard-NNNNN.txt`` files: ``lines_per_shard`` consecutive lines per
    shard, or round-robin over ``num_shards`` shards (every shard gets a random sample)."""

    def __init__(self, root: str, subdir: str, lines_per_shard: int | None = None,
                 num_shards: int | None = None):
        if (lines_per_shard is None) == (num_shards is None):
            raise InputError("give exactly one of lines_per_shard and num_shards")
        self._root, self._subdir = root, subdir
        self._lines_per_shard, self._num_shards = lines_per_shard, num_shards
        os.makedirs(os.path.join(root, subdir), exist_ok=True)
        self.shards: list[ShardInfo] = []
        self._files: list[IO[bytes]] = []
        self._written = 0

    def _open_next(self) -> None:
        info = ShardInfo(f"{self._subdir}/shard-{len(self.shards):05d}.txt")
        self.shards.append(info)
        self._files.append(open(os.path.join(self._root, info.path), "wb"))

    def _write_to(self, shard: int, lines: list[bytes]) -> None:
        data = b"".join(lines)
        self._files[shard].write(data)
        self.shards[shard].sentences += len(lines)
        self.shards[shard].tokens += data.count(b" ") + len(lines)  # lines are single-space separated

    def write(self, lines: list[bytes]) -> None:
        """Append lines (UTF-8, each ending in a newline)."""
        if self._num_shards is not None:
            for shard in range(self._num_shards):
                part = lines[(shard - self._written) % self._num_shards::self._num_shards]
                if part:
                    while len(self.shards) <= shard:
                        self._open_next()
                    self._write_to(shard, part)
        else:
            start = 0
            while start < len(lines):
                if not self.shards or self.shards[-1].sentences >= self._lines_per_shard:
                    if self._files:
                        self._files[-1].close()
                    self._open_next()
                room = self._lines_per_shard - self.shards[-1].sentences
                self._write_to(len(self.shards) - 1, lines[start:start + room])
                start += room
        self._written += len(lines)

    def close(self) -> list[ShardInfo]:
        for f in self._files:
            f.close()
        return self.shards
