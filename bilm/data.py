"""Training batches for the biLM: a streaming, sharded, resumable reader.

``LMDataset`` reads shards (whitespace-tokenized text, one sentence per line: what
``bilm prepare`` writes) and yields batches packed exactly as bilm-tf's
``_get_batch``: each of the ``batch_size`` rows is a stream of sentences
``<S> w1 .. wn </S>`` (reversed, ``</S> wn .. w1 <S>``, for the backward LM); a batch is
the next ``unroll_steps`` inputs of every row, the targets are the next tokens, and a
sentence cut by the end of a batch continues in the same row of the next batch.

Each shard is encoded once into flat int arrays (sentences back to back with their
boundary tokens); a batch is then a few numpy gathers over positions in those arrays,
so no per-token Python work is done per batch.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain, count, islice
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from bilm.chars import BOS_TOKEN, DEFAULT_MAX_CHARACTERS, EOS_TOKEN, char_id_table, token_to_char_ids
from bilm.vocab import Vocabulary
from data_tools.inputs import resolve_inputs

MANIFEST_FORMAT = "bilm-data"
STATE_VERSION = 1

# Rows of every shard's char table: 0 is the all-zero mask row, then the sentence boundaries.
_MASK_ROW, _BOS_ROW, _EOS_ROW, _FIRST_WORD_ROW = 0, 1, 2, 3


# --------------------------------------------------------------------------- sources

def load_manifest(path: str | os.PathLike) -> dict:
    """Read a ``manifest.json`` written by ``bilm prepare``.

    Shard, vocabulary and tokenizer-model paths are resolved to absolute paths (the file
    stores them relative to its own directory); ``manifest["dir"]`` is that directory.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    base = os.path.dirname(os.path.abspath(path))
    manifest["dir"] = base
    for split in ("train", "heldout"):
        section = manifest.get(split)
        if section is None:
            raise ValueError(f"{path}: missing key '{split}'")
        shards = section.get("shards") if isinstance(section, dict) else None
        if not isinstance(shards, list) or not all(isinstance(s, str) for s in shards):
            raise ValueError(f"{path}: key '{split}.shards' must be a list of paths")
        section["shards"] = [os.path.join(base, s) for s in shards]
    for key in ("vocab", "vocab_counts"):
        if isinstance(manifest.get(key), str):
            manifest[key] = os.path.join(base, manifest[key])
    tokenizer = manifest.get("tokenizer")
    if isinstance(tokenizer, dict) and isinstance(tokenizer.get("model"), str):
        tokenizer["model"] = os.path.join(base, tokenizer["model"])
    return manifest


def resolve_shards(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard paths from a glob, a directory (its files, recursively), a file, or a list of those;
    sorted per pattern, each file once."""
    patterns = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not patterns:
        raise ValueError("no shard files given (empty list)")
    return resolve_inputs(patterns, what="shard")


# --------------------------------------------------------------------------- encoding

@dataclass
class EncodedShard:
    """One shard (or a strided slice of it) as flat arrays.

    Sentence ``k`` occupies positions ``starts[k]:starts[k+1]`` as ``<S> w1 .. wn </S>``;
    reading those positions backwards gives the backward LM's ``</S> wn .. w1 <S>``.
    """
    path: str
    token_ids: np.ndarray  # int32 (n_positions,) vocabulary ids, OOV = <UNK>
    char_rows: np.ndarray  # int32 (n_positions,) rows of char_table
    char_table: np.ndarray  # int32 (n_rows, max_characters_per_token); row 0 = mask
    starts: list[int]  # n_sentences + 1 offsets

    @property
    def n_sentences(self) -> int:
        return len(self.starts) - 1


def encode_shard(path: str, vocab: Vocabulary, max_characters_per_token: int = DEFAULT_MAX_CHARACTERS,
                 line_offset: int = 0, line_stride: int = 1, chunk_lines: int = 1 << 16,
                 char_ids: bool = True) -> EncodedShard:
    """Encode lines ``line_offset, line_offset + line_stride, ...`` of ``path``; blank lines are
    skipped. Without ``char_ids`` the char table only has its three fixed rows."""
    # token -> row in this shard's table of distinct tokens; a missing token gets the next row.
    index: defaultdict[str, int] = defaultdict(count().__next__)
    words: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines_iter = islice(f, line_offset, None, line_stride)
        while lines := list(islice(lines_iter, chunk_lines)):
            split = [line.split() for line in lines]
            flat = list(chain.from_iterable(split))
            words.append(np.array(list(map(index.__getitem__, flat)), dtype=np.int32))
            lengths.append(np.array(list(map(len, split)), dtype=np.int64))
    distinct = list(index)
    word_rows = np.concatenate(words) if words else np.zeros(0, np.int32)
    sentence_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    sentence_lengths = sentence_lengths[sentence_lengths > 0]

    char_table = np.zeros((_FIRST_WORD_ROW + (len(distinct) if char_ids else 0), max_characters_per_token),
                          dtype=np.int32)
    char_table[_BOS_ROW] = token_to_char_ids(BOS_TOKEN, max_characters_per_token)
    char_table[_EOS_ROW] = token_to_char_ids(EOS_TOKEN, max_characters_per_token)
    if char_ids:
        char_table[_FIRST_WORD_ROW:] = char_id_table(distinct, max_characters_per_token)
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
    char_rows = np.empty(len(is_word), dtype=np.int32)
    char_rows[is_word] = word_rows + _FIRST_WORD_ROW
    char_rows[first] = _BOS_ROW
    char_rows[last] = _EOS_ROW
    return EncodedShard(path, token_ids, char_rows, char_table, starts.tolist())


@dataclass(frozen=True)
class _ShardSlice:
    """What one reader reads of one shard file: lines offset, offset + stride, ..."""
    path: str
    line_offset: int
    line_stride: int


class _ShardCache:
    """Encoded shards of one reader, shared by the forward and backward streams.

    Shards no longer read are kept (least recently used first out) while the total stays
    under ``max_tokens`` positions, so a corpus that fits is encoded once per run, not once
    per epoch. The next shard is encoded ahead in a thread (``prefetch``): it holds the GIL
    for most of its work, so it does not add throughput, but it runs while the trainer waits
    on the GPU, instead of stalling a step at every shard boundary.
    """

    def __init__(self, plan: list[_ShardSlice], vocab: Vocabulary, max_characters_per_token: int,
                 max_tokens: int, char_ids: bool):
        self._plan = plan
        self._vocab = vocab
        self._max_chars = max_characters_per_token
        self._max_tokens = max_tokens
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

    def release(self, in_use: set[int]) -> None:
        """Drop shards outside ``in_use``, oldest first, until the cache fits its budget."""
        total = sum(len(s.token_ids) for s in self._loaded.values())
        for key in list(self._loaded):
            if total <= self._max_tokens:
                break
            if key not in in_use:
                total -= len(self._loaded.pop(key).token_ids)


# --------------------------------------------------------------------------- sentence order

class _SentenceStream:
    """One reader's sentences in epoch order.

    The cursor ``(epoch, shard_pos, line_pos)`` names the next sentence: the shard order is
    a permutation drawn from ``(seed, epoch)``, the line order within a shard one drawn from
    ``(seed, direction, epoch, shard_pos)``, so the cursor alone restores the position (no
    data in the state). Both directions visit the shards in the same order (each reads its
    own shuffle of the lines): they consume sentences at the same rate, so they are always
    in the same shard, and each shard is encoded once per epoch instead of twice.
    """

    def __init__(self, plan: list[_ShardSlice], cache: _ShardCache, seed: int, direction: int,
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
                                           "(for this rank / DataLoader worker)")
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


# --------------------------------------------------------------------------- packing

# A batch of one direction is described by segments (row, first column, first source
# position, length, shard key): ``length`` inputs read from consecutive positions of a shard,
# going up (forward) or down (backward) from the first.
_Segments = list[tuple[int, int, int, int, int]]


class _PackedRows:
    """bilm-tf packing for one direction: ``batch_size`` rows that each concatenate sentences."""

    def __init__(self, stream: _SentenceStream, cache: _ShardCache, batch_size: int, unroll_steps: int,
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

    def fill(self) -> _Segments:
        segments: _Segments = []
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


class _SentenceGroups:
    """``per_sentence`` packing: each row holds one sentence, padded; a group of ``batch_size``
    sentences is emitted as ceil(longest / unroll_steps) windows, states reset on the first."""

    def __init__(self, stream: _SentenceStream, cache: _ShardCache, batch_size: int, unroll_steps: int):
        self._stream, self._cache = stream, cache
        self._batch_size, self._unroll = batch_size, unroll_steps
        self._group: list[tuple[int, int, int, int]] = []  # (key, sentence, start, end) per row
        self._window = self._n_windows = 0

    def keys_in_use(self) -> set[int]:
        return {g[0] for g in self._group} | {self._stream.open_key}

    def _set_windows(self) -> None:
        longest = max((end - start - 1 for _, _, start, end in self._group), default=0)
        self._n_windows = math.ceil(longest / self._unroll)

    def fill(self) -> tuple[_Segments, _Segments, bool] | None:
        """Forward and backward segments, and whether this window starts a new group."""
        if self._window >= self._n_windows:
            self._group = []
            while len(self._group) < self._batch_size and (fetched := self._stream.next()) is not None:
                self._group.append(fetched)
            if not self._group:
                return None
            self._window = 0
            self._set_windows()
        first = self._window * self._unroll
        forward: _Segments = []
        backward: _Segments = []
        for row, (key, _, start, end) in enumerate(self._group):
            n = min(end - start - 1 - first, self._unroll)
            if n > 0:
                forward.append((row, 0, start + first, n, key))
                backward.append((row, 0, end - 1 - first, n, key))
        new_group = self._window == 0
        self._window += 1
        return forward, backward, new_group

    def state_dict(self) -> dict:
        return {"stream": self._stream.state_dict(), "window": self._window,
                "group": [[key, sentence] for key, sentence, _, _ in self._group]}

    def load_state_dict(self, state: dict) -> None:
        self._stream.load_state_dict(state["stream"])
        self._group = []
        for key, sentence in state["group"]:
            starts = self._cache.get(key).starts
            self._group.append((key, sentence, starts[sentence], starts[sentence + 1]))
        self._set_windows()
        self._window = state["window"]


# --------------------------------------------------------------------------- the dataset

class LMDataset(IterableDataset):
    """Batches for the forward and backward LMs, as dicts of tensors::

        {"forward":  {"token_ids": int64 (B, T), "char_ids": int32 (B, T, C),
                      "next_token_ids": int64 (B, T), "mask": bool (B, T)},
         "backward": {same keys},
         "reset_state": bool (B,)}

    ``char_ids`` use the shifted convention of ``bilm.chars`` (0 = padding) and are left out
    when ``char_inputs`` is False. Positions with no data have token 0, next token 0, char
    ids 0 and mask False. ``reset_state`` marks rows whose LSTM states the consumer must zero
    before this batch (the first window of each group with ``per_sentence``; never otherwise).

    ``source``: a shard glob, directory, file, list of those, or a ``manifest.json`` (its
    train shards in train mode, heldout shards in eval mode, or ``split``).
    ``mode="train"``: endless, epoch after epoch, shard and line order shuffled from
    ``(seed, epoch)``; ``mode="eval"``: one pass in file order, final partial batch included.
    Shards are split among ``world_size`` ranks and DataLoader workers (each packs its own
    rows); with fewer shards than readers, each reader takes every R-th line instead.
    Encoded shards stay cached up to ``max_cached_tokens`` positions per reader (about 8
    bytes each, plus a char table per shard).
    """

    def __init__(self, source: str | os.PathLike | Sequence[str | os.PathLike],
                 vocab: Vocabulary | str | os.PathLike | None, batch_size: int, unroll_steps: int, *,
                 max_characters_per_token: int = DEFAULT_MAX_CHARACTERS, char_inputs: bool = True,
                 mode: str = "train", split: str | None = None, per_sentence: bool = False,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None,
                 shuffle: bool | None = None, max_cached_tokens: int = 20_000_000):
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        if split not in (None, "train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        if batch_size < 1 or unroll_steps < 1:
            raise ValueError(f"batch_size and unroll_steps must be >= 1, got {batch_size}, {unroll_steps}")
        self.manifest: dict | None = None
        if isinstance(source, (str, os.PathLike)) and os.fspath(source).endswith(".json"):
            self.manifest = load_manifest(source)
            split = split or ("train" if mode == "train" else "heldout")
            shards = self.manifest[split]["shards"]
            if not shards:
                raise ValueError(f"{os.fspath(source)}: key '{split}.shards' is empty (no {split} data)")
            source = shards
        elif split is not None:
            raise ValueError("split= is only meaningful with a manifest.json source")
        if vocab is None:
            if self.manifest is None or not isinstance(self.manifest.get("vocab"), str):
                raise ValueError("vocab is required unless source is a manifest.json naming one")
            vocab = self.manifest["vocab"]
        self.vocab = vocab if isinstance(vocab, Vocabulary) else Vocabulary.from_file(vocab)

        self.shards = []
        for path in resolve_shards(source):
            if os.path.getsize(path) == 0:
                warnings.warn(f"shard {path} is empty; skipped", stacklevel=2)
            else:
                self.shards.append(path)
        if not self.shards:
            raise ValueError(f"every shard of {source!r} is empty")

        if rank is None or world_size is None:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = rank if rank is not None else (torch.distributed.get_rank() if distributed else 0)
            world_size = world_size if world_size is not None else (
                torch.distributed.get_world_size() if distributed else 1)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.batch_size, self.unroll_steps = batch_size, unroll_steps
        self.max_characters_per_token = max_characters_per_token
        self.char_inputs, self.mode, self.per_sentence = char_inputs, mode, per_sentence
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle = (mode == "train") if shuffle is None else shuffle
        self.max_cached_tokens = max_cached_tokens
        self._live: _Batches | None = None
        self._pending_state: dict | None = None

    def __getstate__(self) -> dict:
        # DataLoader workers get the dataset pickled (spawn): not the encoded shards of a live iteration.
        return {**self.__dict__, "_live": None}

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is None:
            return self.iterate()
        return self.iterate(worker_id=info.id, num_workers=info.num_workers)

    def iterate(self, worker_id: int = 0, num_workers: int = 1) -> Iterator[dict]:
        """The batches of DataLoader worker ``worker_id`` of ``num_workers`` on this rank.

        Starts from the state given to ``load_state_dict`` if any, else from the beginning.
        """
        reader = self.rank * num_workers + worker_id
        if self._live is not None:
            self._live.close()  # a new iteration replaces the previous one
        batches = _Batches(self, reader, self.world_size * num_workers)
        if self._pending_state is not None:
            batches.load_state_dict(self._pending_state)
            self._pending_state = None
        self._live = batches
        return iter(batches)

    def reader_plan(self, reader: int, n_readers: int) -> list[_ShardSlice]:
        """The shard slices of one reader: whole shards, or every n_readers-th line of all shards."""
        if len(self.shards) >= n_readers:
            return [_ShardSlice(p, 0, 1) for p in self.shards[reader::n_readers]]
        return [_ShardSlice(p, reader, n_readers) for p in self.shards]

    @property
    def epoch(self) -> int:
        """Epoch of the (forward) sentence stream of the iteration in this process."""
        if self._live is not None:
            return self._live.epoch
        return self._pending_state["epoch"] if self._pending_state else 0

    def state_dict(self) -> dict:
        """Where the iteration in this process stands, after the last batch it yielded.

        Small, JSON-serializable (cursors and per-row positions, no data). Only iteration in
        this process is tracked: use ``num_workers=0`` in the DataLoader (and no prefetching
        of batches beyond the one trained on) to checkpoint it. Before any iteration: the
        state of the beginning (or the one loaded).
        """
        if self._live is not None:
            return self._live.state_dict()
        if self._pending_state is not None:
            return self._pending_state
        return _Batches(self, self.rank, self.world_size).state_dict()

    def load_state_dict(self, state: dict) -> None:
        """The next iteration continues with the batch after the one ``state`` was taken at."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            got = state.get("version") if isinstance(state, dict) else state
            raise ValueError(f"state_dict key 'version' must be {STATE_VERSION}, got {got!r}")
        config = state["config"]
        _check_config(config, self._config(config["reader"], config["n_readers"]))
        self._pending_state = state
        if self._live is not None:
            self._live.close()
            self._live = None

    def _config(self, reader: int, n_readers: int) -> dict:
        return {"reader": reader, "n_readers": n_readers, "batch_size": self.batch_size,
                "unroll_steps": self.unroll_steps, "mode": self.mode, "per_sentence": self.per_sentence,
                "seed": self.seed, "shuffle": self.shuffle,
                "shards": [os.path.basename(p) for p in self.shards]}


class _Batches:
    """One iteration of an ``LMDataset`` by one reader; holds its state between batches."""

    def __init__(self, dataset: LMDataset, reader: int, n_readers: int):
        self._ds = dataset
        self._config = dataset._config(reader, n_readers)
        plan = dataset.reader_plan(reader, n_readers)
        self._cache = _ShardCache(plan, dataset.vocab, dataset.max_characters_per_token,
                                  dataset.max_cached_tokens, dataset.char_inputs)
        infinite = dataset.mode == "train"
        B, T = dataset.batch_size, dataset.unroll_steps
        self.n_batches = 0
        self._done = False
        if dataset.per_sentence:
            stream = _SentenceStream(plan, self._cache, dataset.seed, 0, dataset.shuffle, infinite)
            self._groups = _SentenceGroups(stream, self._cache, B, T)
            self._streams = [stream]
        else:
            # Independent readers for the two directions, as bilm-tf; the same order without shuffling.
            forward = _SentenceStream(plan, self._cache, dataset.seed, 0, dataset.shuffle, infinite)
            backward = _SentenceStream(plan, self._cache, dataset.seed, 1, dataset.shuffle, infinite)
            self._forward = _PackedRows(forward, self._cache, B, T, backward=False, round_robin=not infinite)
            self._backward = _PackedRows(backward, self._cache, B, T, backward=True, round_robin=not infinite)
            self._streams = [forward, backward]
        self._reset_none = torch.zeros(B, dtype=torch.bool)

    def __iter__(self) -> Iterator[dict]:
        while not self._done:
            batch = self._next_batch()
            if batch is None:
                self._done = True
                self.close()
                return
            self.n_batches += 1
            yield batch

    def close(self) -> None:
        self._cache.close()

    def _next_batch(self) -> dict | None:
        if self._ds.per_sentence:
            filled = self._groups.fill()
            if filled is None:
                return None
            forward, backward, new_group = filled
            reset = torch.full((self._ds.batch_size,), new_group, dtype=torch.bool)
            in_use = self._groups.keys_in_use()
        else:
            forward, backward = self._forward.fill(), self._backward.fill()
            if not forward and not backward:
                return None
            reset = self._reset_none.clone()
            in_use = self._forward.keys_in_use() | self._backward.keys_in_use()
        batch = {"forward": self._assemble(forward, 1), "backward": self._assemble(backward, -1),
                 "reset_state": reset}
        self._cache.release(in_use)
        return batch

    def _assemble(self, segments: _Segments, sign: int) -> dict[str, torch.Tensor]:
        B, T, C = self._ds.batch_size, self._ds.unroll_steps, self._ds.max_characters_per_token
        token_ids = np.zeros(B * T, dtype=np.int64)
        next_ids = np.zeros(B * T, dtype=np.int64)
        mask = np.zeros(B * T, dtype=bool)
        # Rows of the shards' char tables (row 0 of each is the all-zero mask row), gathered once
        # at the end: one table in the usual case, the shards' tables stacked when a batch spans two.
        char_rows = np.zeros(B * T, dtype=np.int64)
        char_tables: list[np.ndarray] = [np.zeros((1, C), dtype=np.int32)]  # replaced by the shards' tables
        if segments:
            flat = np.fromiter(chain.from_iterable(segments), dtype=np.int64, count=5 * len(segments))
            rows, cols, srcs, lengths, keys = flat.reshape(-1, 5).T
            offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            out = np.repeat(rows * T + cols, lengths) + offsets
            src = np.repeat(srcs, lengths) + sign * offsets
            mask[out] = True
            shard_keys = np.unique(keys)
            key_of = np.repeat(keys, lengths) if len(shard_keys) > 1 else None
            char_tables, first_row = [], 0
            for key in shard_keys.tolist():
                shard = self._cache.get(key)
                o, s = (out, src) if key_of is None else (out[key_of == key], src[key_of == key])
                token_ids[o] = shard.token_ids[s]
                next_ids[o] = shard.token_ids[s + sign]
                if self._ds.char_inputs:
                    char_rows[o] = shard.char_rows[s] + first_row
                    char_tables.append(shard.char_table)
                    first_row += len(shard.char_table)
        direction = {"token_ids": torch.from_numpy(token_ids.reshape(B, T))}
        if self._ds.char_inputs:
            table = char_tables[0] if len(char_tables) == 1 else np.concatenate(char_tables)
            direction["char_ids"] = torch.from_numpy(table[char_rows].reshape(B, T, C))
        direction["next_token_ids"] = torch.from_numpy(next_ids.reshape(B, T))
        direction["mask"] = torch.from_numpy(mask.reshape(B, T))
        return direction

    @property
    def epoch(self) -> int:
        return self._streams[0].epoch

    def state_dict(self) -> dict:
        state: dict[str, Any] = {"version": STATE_VERSION, "config": dict(self._config),
                                 "batches": self.n_batches, "done": self._done, "epoch": self.epoch}
        if self._ds.per_sentence:
            state["groups"] = self._groups.state_dict()
        else:
            state["forward"] = self._forward.state_dict()
            state["backward"] = self._backward.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        _check_config(state["config"], self._config)
        self.n_batches, self._done = state["batches"], state["done"]
        if self._ds.per_sentence:
            self._groups.load_state_dict(state["groups"])
        else:
            self._forward.load_state_dict(state["forward"])
            self._backward.load_state_dict(state["backward"])


def _check_config(saved: dict, current: dict) -> None:
    """A state only resumes the same reader of the same data and packing."""
    for key, value in current.items():
        if saved.get(key) != value:
            raise ValueError(f"state_dict key 'config.{key}' is {saved.get(key)!r}, "
                             f"but this reader has {value!r}")
