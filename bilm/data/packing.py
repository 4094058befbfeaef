"""Packing: which positions of which shard go where in a batch, for both directions.

A packer takes sentences from ``SentenceStream``s and lays them out in the ``batch_size`` rows
of ``unroll_steps`` columns of the next batch; it says where as ``Segments`` (no data is
copied here, ``bilm.data.dataset`` gathers the arrays). Every packer has the same interface,
``Packer``, and returns the same ``Packed``, so batch assembly has one path:

* ``RowPacker``: each row is a stream of sentences that continues from batch to batch (the
  LSTM states carry over). Training uses bilm-tf's rule (a row takes the next sentence of
  the stream when its current one runs out); evaluation deals sentences to rows round robin.
* ``SentencePacker`` (``per_sentence``): each row holds one sentence, padded; a group of
  ``batch_size`` sentences takes as many batches as its longest sentence needs, and the
  states are reset at the first.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from bilm.data.order import SentenceStream
from bilm.data.shards import ShardCache

# A batch of one direction is described by segments (row, first column, first source
# position, length, shard key): ``length`` inputs read from consecutive positions of a shard,
# going up (forward) or down (backward) from the first.
Segments = list[tuple[int, int, int, int, int]]


@dataclass(frozen=True)
class Packed:
    """The layout of one batch: segments of each direction, and whether every row's LSTM
    states are reset before it (positions no segment covers are padding)."""
    forward: Segments
    backward: Segments
    reset_state: bool


@runtime_checkable
class Packer(Protocol):
    """What batch assembly needs of a packer."""

    def fill(self) -> Packed | None:
        """The layout of the next batch; None when there is no more data (evaluation)."""

    def keys_in_use(self) -> set[int]:
        """Shards (plan indices) the next batches still read: not to be dropped from the cache."""

    def state_dict(self) -> dict:
        """The packer's keys of the dataset's state (positions only, JSON-serializable)."""

    def load_state_dict(self, state: dict) -> None:
        """Continue from the dataset's ``state`` (streams included)."""


class _Rows:
    """bilm-tf packing for one direction: ``batch_size`` rows that each concatenate sentences."""

    def __init__(self, stream: SentenceStream, cache: ShardCache, batch_size: int, unroll_steps: int,
                 backward: bool, round_robin: bool = False):
        self._stream, self._cache = stream, cache
        self._batch_size, self._unroll = batch_size, unroll_steps
        self.sign = -1 if backward else 1
        # Evaluation deals sentences to rows round robin (row i reads sentences i, i + B, ...), so
        # what precedes a sentence in its row, and so the perplexity, does not depend on
        # unroll_steps. Training keeps bilm-tf's rule: a row takes the next sentence when it runs out.
        self._queues: list[deque] | None = [deque() for _ in range(batch_size)] if round_robin else None
        self._dealt = 0
        # Per row: shard key and sentence of the current sentence, its next input position,
        # and how many of its tokens are left (bilm-tf's len(cur_stream[i])).
        self._key = [-1] * batch_size
        self._sentence = [-1] * batch_size
        self._next = [0] * batch_size
        self._left = [0] * batch_size

    def keys_in_use(self) -> set[int]:
        queued = {f[0] for q in self._queues for f in q} if self._queues is not None else set()
        return {k for k, left in zip(self._key, self._left) if left > 1} | {self._stream.open_key} | queued

    def _take(self, row: int) -> tuple[int, int, int, int] | None:
        if self._queues is None:
            return self._stream.next()
        queue = self._queues[row]
        while not queue:
            fetched = self._stream.next()
            if fetched is None:
                return None
            self._queues[self._dealt % self._batch_size].append(fetched)
            self._dealt += 1
        return queue.popleft()

    def fill(self) -> Segments:
        segments: Segments = []
        add = segments.append
        unroll, sign = self._unroll, self.sign
        key, sentence, nxt, left = self._key, self._sentence, self._next, self._left
        for i in range(self._batch_size):
            row_left = left[i]
            if row_left > unroll:  # the usual case: the current sentence fills the whole row
                add((i, 0, nxt[i], unroll, key[i]))
                nxt[i] += sign * unroll
                left[i] = row_left - unroll
                continue
            pos = 0
            while pos < unroll:
                if row_left <= 1:
                    fetched = self._take(i)
                    if fetched is None:
                        row_left = 0
                        break
                    key[i], sentence[i], start, end = fetched
                    row_left = end - start
                    nxt[i] = start if sign > 0 else end - 1
                # The last token of a sentence is only a target: take at most row_left - 1.
                n = row_left - 1 if row_left - 1 < unroll - pos else unroll - pos
                add((i, pos, nxt[i], n, key[i]))
                nxt[i] += sign * n
                row_left -= n
                pos += n
            left[i] = row_left
        return segments

    def state_dict(self) -> dict:
        state = {"stream": self._stream.state_dict(),
                 "rows": [[k, s, left] if left > 1 else [-1, -1, 0]
                          for k, s, left in zip(self._key, self._sentence, self._left)]}
        if self._queues is not None:
            state["dealt"] = self._dealt
            state["queues"] = [[[k, s] for k, s, _, _ in q] for q in self._queues]
        return state

    def load_state_dict(self, state: dict) -> None:
        self._stream.load_state_dict(state["stream"])
        if self._queues is not None:
            self._dealt = state["dealt"]
            for queue, saved in zip(self._queues, state["queues"]):
                queue.clear()
                for k, s in saved:
                    starts = self._cache.get(k).starts
                    queue.append((k, s, starts[s], starts[s + 1]))
        for i, (k, s, left) in enumerate(state["rows"]):
            self._key[i], self._sentence[i], self._left[i] = k, s, left
            if left > 1:
                starts = self._cache.get(k).starts
                start, end = starts[s], starts[s + 1]
                self._next[i] = end - left if self.sign > 0 else start + left - 1


class RowPacker:
    """Rows that continue their sentence streams from batch to batch, one stream per direction.

    The two directions read independent streams, as in bilm-tf (the same order without
    shuffling). ``round_robin`` (evaluation) deals sentences to rows in turn; otherwise a row
    takes the next sentence when its current one runs out. States are never reset.
    """

    def __init__(self, forward: SentenceStream, backward: SentenceStream, cache: ShardCache,
                 batch_size: int, unroll_steps: int, round_robin: bool):
        self._forward = _Rows(forward, cache, batch_size, unroll_steps, backward=False, round_robin=round_robin)
        self._backward = _Rows(backward, cache, batch_size, unroll_steps, backward=True, round_robin=round_robin)

    def fill(self) -> Packed | None:
        forward, backward = self._forward.fill(), self._backward.fill()
        if not forward and not backward:
            return None
        return Packed(forward, backward, reset_state=False)

    def keys_in_use(self) -> set[int]:
        return self._forward.keys_in_use() | self._backward.keys_in_use()

    def state_dict(self) -> dict:
        return {"forward": self._forward.state_dict(), "backward": self._backward.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._forward.load_state_dict(state["forward"])
        self._backward.load_state_dict(state["backward"])


class SentencePacker:
    """``per_sentence`` packing: each row holds one sentence, padded; a group of ``batch_size``
    sentences is emitted as ceil(longest / unroll_steps) windows, states reset on the first.
    Both directions read the same sentence in the same row (one stream)."""

    def __init__(self, stream: SentenceStream, cache: ShardCache, batch_size: int, unroll_steps: int):
        self._stream, self._cache = stream, cache
        self._batch_size, self._unroll = batch_size, unroll_steps
        self._group: list[tuple[int, int, int, int]] = []  # (key, sentence, start, end) per row
        self._window = self._n_windows = 0

    def keys_in_use(self) -> set[int]:
        return {g[0] for g in self._group} | {self._stream.open_key}

    def _set_windows(self) -> None:
        longest = max((end - start - 1 for _, _, start, end in self._group), default=0)
        self._n_windows = math.ceil(longest / self._unroll)

    def fill(self) -> Packed | None:
        if self._window >= self._n_windows:
            self._group = []
            while len(self._group) < self._batch_size and (fetched := self._stream.next()) is not None:
                self._group.append(fetched)
            if not self._group:
                return None
            self._window = 0
            self._set_windows()
        first = self._window * self._unroll
        forward: Segments = []
        backward: Segments = []
        for row, (key, _, start, end) in enumerate(self._group):
            n = min(end - start - 1 - first, self._unroll)
            if n > 0:
                forward.append((row, 0, start + first, n, key))
                backward.append((row, 0, end - 1 - first, n, key))
        new_group = self._window == 0
        self._window += 1
        return Packed(forward, backward, reset_state=new_group)

    def state_dict(self) -> dict:
        return {"groups": {"stream": self._stream.state_dict(), "window": self._window,
                           "group": [[key, sentence] for key, sentence, _, _ in self._group]}}

    def load_state_dict(self, state: dict) -> None:
        groups = state["groups"]
        self._stream.load_state_dict(groups["stream"])
        self._group = []
        for key, sentence in groups["group"]:
            starts = self._cache.get(key).starts
            self._group.append((key, sentence, starts[sentence], starts[sentence + 1]))
        self._set_windows()
        self._window = groups["window"]
