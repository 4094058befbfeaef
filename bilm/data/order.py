"""Sentence order: which sentence a rank reads next, epoch after epoch, and how to resume there.

``SentenceStream`` walks one rank's shard slices (its ``rank_plan``) in file order, or shuffled (the
default in training) from the seed, the epoch and the direction; a small cursor restores any
position (see the class). It also tells the shard cache which shard to encode next, ahead of time.
"""
from __future__ import annotations

import numpy as np

from bilm.data.shards import ShardCache, ShardSlice


class SentenceStream:
    """One rank's sentences in epoch order.

    The cursor ``(epoch, shard_pos, line_pos)`` names the next sentence: the shard order is
    a permutation drawn from ``(seed, epoch)``, the line order within a shard one drawn from
    ``(seed, direction, epoch, shard_pos)``, so the cursor alone restores the position (no
    data in the state). Both directions visit the shards in the same order (each reads its
    own shuffle of the lines): they consume sentences at the same rate, so they are always
    in the same shard, and each shard is encoded once per epoch instead of twice.
    """

    def __init__(self, plan: list[ShardSlice], cache: ShardCache, seed: int, direction: int,
                 shuffle: bool, infinite: bool):
        self._plan, self._cache = plan, cache
        self._seed, self._direction = seed, direction
        self._shuffle, self._infinite = shuffle, infinite
        self.epoch = self.shard_pos = self.line_pos = 0
        self._shard_order = self._order_of_shards(0)
        self._key = -1  # plan index of the open shard, -1 when none is open
        self._line_order: list[int] | None = None
        self._starts: list[int] = []
        self._prefetch_at = -1  # line_pos at which the next shard starts encoding in the background
        self._epochs_without_data = 0

    def _order_of_shards(self, epoch: int) -> list[int]:
        if not self._shuffle:
            return list(range(len(self._plan)))
        rng = np.random.default_rng([self._seed, epoch])
        return rng.permutation(len(self._plan)).tolist()

    def _open(self) -> None:
        self._key = self._shard_order[self.shard_pos]
        shard = self._cache.get(self._key)
        self._prefetch_at = shard.n_sentences * 3 // 4  # late enough not to slow the shard's start
        self._starts = shard.starts
        if self._shuffle:
            rng = np.random.default_rng([self._seed, self._direction, self.epoch, self.shard_pos, 1])
            self._line_order = rng.permutation(shard.n_sentences).tolist()
        else:
            self._line_order = None

    @property
    def open_key(self) -> int:
        return self._key

    def next(self) -> tuple[int, int, int, int] | None:
        """(shard key, sentence index, start, end) of the next sentence; None at the end (eval)."""
        while True:
            if self._key < 0:
                if self.shard_pos >= len(self._plan):
                    if not self._infinite:
                        return None
                    self._epochs_without_data += 1
                    if self._epochs_without_data > 2:
                        raise RuntimeError(f"no sentences to read in {[p.path for p in self._plan]} "
                                           "(for this rank)")
                    self.epoch += 1
                    self.shard_pos = self.line_pos = 0
                    self._shard_order = self._order_of_shards(self.epoch)
                    continue
                self._open()
            if self.line_pos < len(self._starts) - 1:
                if self.line_pos == self._prefetch_at:
                    self._prefetch_next_shard()
                order = self._line_order
                sentence = order[self.line_pos] if order is not None else self.line_pos
                self.line_pos += 1
                self._epochs_without_data = 0
                return self._key, sentence, self._starts[sentence], self._starts[sentence + 1]
            self._key = -1
            self.shard_pos += 1
            self.line_pos = 0

    def _prefetch_next_shard(self) -> None:
        if self.shard_pos + 1 < len(self._plan):
            self._cache.prefetch(self._shard_order[self.shard_pos + 1])
        elif self._infinite and len(self._plan) > 1:
            self._cache.prefetch(self._order_of_shards(self.epoch + 1)[0])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "shard_pos": self.shard_pos, "line_pos": self.line_pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.shard_pos, self.line_pos = state["epoch"], state["shard_pos"], state["line_pos"]
        self._shard_order = self._order_of_shards(self.epoch)
        self._key = -1
        if self.shard_pos < len(self._plan):
            line_pos = self.line_pos
            self._open()
            self.line_pos = line_pos
