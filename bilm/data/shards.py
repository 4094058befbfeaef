"""Shards: finding them, splitting them among ranks, encoding them, and caching the encodings.

A shard is a text file of whitespace-tokenized sentences, one a line (what ``bilm prepare``
writes). Each shard is encoded once into flat int arrays (sentences back to back with their
boundary tokens), so that packing a batch is a few numpy gathers over positions in those arrays
and no per-token Python work is done per batch. ``rank_plan`` decides what each rank reads;
``ShardCache`` keeps the encoded shards of one rank (least recently used out, the next shard
encoded ahead in a thread).
"""
from __future__ import annotations

import os
import warnings
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain, count, islice
from typing import Sequence

import numpy as np

from bilm.core.chars import BOS_TOKEN, DEFAULT_MAX_CHARACTERS, EOS_TOKEN, char_id_table
from bilm.core.errors import InputError, not_utf8
from bilm.core.vocab import Vocabulary
from bilm.data.inputs import resolve_inputs

# Rows of every shard's char table: the sentence boundaries, then the shard's distinct words.
_BOS_ROW, _EOS_ROW, _FIRST_WORD_ROW = 0, 1, 2


def resolve_shards(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard paths from a glob, a directory (its files, recursively), a file, or a list of those;
    sorted per pattern, each file once."""
    patterns = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not patterns:
        raise InputError("no shard files given (empty list)")
    return resolve_inputs(patterns, what="shard")


@dataclass
class EncodedShard:
    """One shard (or a strided slice of it) as flat arrays.

    Sentence ``k`` occupies positions ``starts[k]:starts[k+1]`` as ``<S> w1 .. wn </S>``;
    reading those positions backwards gives the backward LM's ``</S> wn .. w1 <S>``.
    """
    path: str
    token_ids: np.ndarray  # int32 (n_positions,) vocabulary ids, OOV = <UNK>
    char_rows: np.ndarray  # int32 (n_positions,) rows of char_table; empty without char ids
    char_table: np.ndarray  # int16 (n_rows, max_characters_per_token): <S>, </S>, then words (ids < 262)
    starts: list[int]  # n_sentences + 1 offsets

    @property
    def n_sentences(self) -> int:
        return len(self.starts) - 1

    @property
    def nbytes(self) -> int:
        """Memory held: the arrays, and the offsets list (a list slot and an int object each)."""
        return self.token_ids.nbytes + self.char_rows.nbytes + self.char_table.nbytes + 36 * len(self.starts)


def encode_shard(path: str, vocab: Vocabulary, max_characters_per_token: int = DEFAULT_MAX_CHARACTERS,
                 line_offset: int = 0, line_stride: int = 1, chunk_lines: int = 1 << 16,
                 char_ids: bool = True) -> EncodedShard:
    """Encode lines ``line_offset, line_offset + line_stride, ...`` of ``path``; blank lines are
    skipped. Without ``char_ids`` the char table only has the two boundary rows and ``char_rows`` is empty."""
    # token -> row in this shard's table of distinct tokens; a missing token gets the next row.
    index: defaultdict[str, int] = defaultdict(count().__next__)
    words: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    # Strict UTF-8: bilm prepare writes valid UTF-8, so bytes that do not decode are damage (a
    # truncated or overwritten file), reported with the file and line rather than read as <UNK>s.
    try:
        with open(path, encoding="utf-8") as f:
            lines_iter = islice(f, line_offset, None, line_stride)
            while lines := list(islice(lines_iter, chunk_lines)):
                split = [line.split() for line in lines]
                flat = list(chain.from_iterable(split))
                words.append(np.array(list(map(index.__getitem__, flat)), dtype=np.int32))
                lengths.append(np.array(list(map(len, split)), dtype=np.int64))
    except UnicodeDecodeError:
        raise InputError(f"{not_utf8(path)}: a damaged shard? (bilm prepare writes UTF-8)") from None
    except OSError as e:
        raise type(e)(f"shard {path}: cannot read ({e.strerror or e})") from None
    distinct = list(index)
    word_rows = np.concatenate(words) if words else np.zeros(0, np.int32)
    sentence_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    sentence_lengths = sentence_lengths[sentence_lengths > 0]

    # int16: half the cache of int32 (the table dominates it), built as int16 (no int32 temporary).
    char_table = char_id_table([BOS_TOKEN, EOS_TOKEN] + (distinct if char_ids else []), max_characters_per_token,
                               dtype=np.int16)
    vocab_ids = vocab.encode(distinct).astype(np.int32)

    starts = np.zeros(len(sentence_lengths) + 1, dtype=np.int64)
    np.cumsum(sentence_lengths + 2, out=starts[1:])
    first, last = starts[:-1], starts[1:] - 1
    is_word = np.ones(int(starts[-1]), dtype=bool)
    is_word[first] = False
    is_word[last] = False
    token_ids = np.empty(len(is_word), dtype=np.int32)
    token_ids[is_word] = vocab_ids[word_rows]
    token_ids[first] = vocab.bos_id
    token_ids[last] = vocab.eos_id
    char_rows = np.empty(len(is_word) if char_ids else 0, dtype=np.int32)  # unused without char ids
    if char_ids:
        char_rows[is_word] = word_rows + _FIRST_WORD_ROW
        char_rows[first] = _BOS_ROW
        char_rows[last] = _EOS_ROW
    return EncodedShard(path, token_ids, char_rows, char_table, starts.tolist())


@dataclass(frozen=True)
class ShardSlice:
    """What one rank reads of one shard file: lines offset, offset + stride, ..."""
    path: str
    line_offset: int
    line_stride: int


def rank_plan(shards: list[str], rank: int, world_size: int) -> list[ShardSlice]:
    """The shard slices of one rank: whole shards, or every world_size-th line of all shards."""
    if len(shards) >= world_size:
        return [ShardSlice(p, 0, 1) for p in shards[rank::world_size]]
    return [ShardSlice(p, rank, world_size) for p in shards]


class ShardCache:
    """Encoded shards of one rank, shared by the forward and backward streams.

    Shards no longer read are kept (least recently used first out) while their memory stays
    under ``max_bytes``, so a corpus that fits is encoded once per run, not once per epoch.
    The budget counts each shard's char table: with a large vocabulary it outweighs the ids
    (docs/measurements.md, "shard-cache"). The next shard is encoded ahead in a thread (``prefetch``): it holds the GIL
    for most of its work, so it does not add throughput, but it runs while the trainer waits
    on the GPU, instead of stalling a step at every shard boundary.
    """

    def __init__(self, plan: list[ShardSlice], vocab: Vocabulary, max_characters_per_token: int,
                 max_bytes: int, char_ids: bool):
        self._plan = plan
        self._vocab = vocab
        self._max_chars = max_characters_per_token
        self._max_bytes = max_bytes
        self._char_ids = char_ids
        self._loaded: dict[int, EncodedShard] = {}  # insertion order = least recently used first
        self._pending: dict[int, Future] = {}
        self._executor: ThreadPoolExecutor | None = None

    def _encode(self, key: int) -> EncodedShard:
        part = self._plan[key]
        return encode_shard(part.path, self._vocab, self._max_chars, part.line_offset, part.line_stride,
                            char_ids=self._char_ids)

    def get(self, key: int) -> EncodedShard:
        shard = self._loaded.pop(key, None)
        if shard is None:
            pending = self._pending.pop(key, None)
            shard = pending.result() if pending is not None else self._encode(key)
            part = self._plan[key]
            if shard.n_sentences == 0 and part.line_stride == 1:
                warnings.warn(f"shard {part.path} has no sentences (only blank lines); skipped", stacklevel=2)
        self._loaded[key] = shard
        return shard

    def prefetch(self, key: int) -> None:
        if key in self._loaded or key in self._pending:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bilm-shard-prefetch")
        self._pending[key] = self._executor.submit(self._encode, key)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._pending.clear()

    @property
    def nbytes(self) -> int:
        """Memory of the encoded shards held (not counting one being encoded ahead)."""
        return sum(s.nbytes for s in self._loaded.values())

    def release(self, in_use: set[int]) -> None:
        """Drop shards outside ``in_use``, oldest first, until the cache fits its budget."""
        total = self.nbytes
        for key in list(self._loaded):
            if total <= self._max_bytes:
                break
            if key not in in_use:
                total -= self._loaded.pop(key).nbytes
