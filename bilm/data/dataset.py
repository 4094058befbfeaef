"""The dataset: ``LMDataset`` turns shards into batches of tensors, and saves where it stands.

It resolves the source (shards or a manifest), gives each rank its part (``rank_plan``),
builds the sentence streams and the packer for the mode, and assembles each ``Packed``
layout into tensors with a few numpy gathers from the encoded shards. Its ``state_dict`` is
the streams' cursors and the packer's row positions (no data), checked against the
configuration on load so that a state only resumes the reader it was taken from.
"""
from __future__ import annotations

import os
import warnings
from itertools import chain, islice
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from bilm.core.chars import DEFAULT_MAX_CHARACTERS
from bilm.data.manifest import load_manifest
from bilm.data.order import SentenceStream
from bilm.data.packing import Packer, RowPacker, Segments, SentencePacker
from bilm.data.shards import ShardCache, rank_plan, resolve_shards
from bilm.core.errors import InputError
from bilm.core.vocab import Vocabulary

STATE_VERSION = 1


class LMDataset(IterableDataset):
    """Batches for the forward and backward LMs, as dicts of tensors::

        {"forward":  {"token_ids": int64 (B, T), "char_ids": int32 (B, T, C),
                      "next_token_ids": int64 (B, T), "mask": bool (B, T),
                      "all_valid": bool (every position holds data)},
         "backward": {same keys},
         "reset_state": bool (B,)}

    ``char_ids`` use the shifted convention of ``bilm.core.chars`` (0 = padding) and are left out
    when ``char_inputs`` is False. Positions with no data have token 0, next token 0, char
    ids 0 and mask False. ``reset_state`` marks rows whose LSTM states the consumer must zero
    before this batch (the first window of each group with ``per_sentence``; never otherwise).

    ``source``: a shard glob, directory, file, list of those, or a ``manifest.json`` (its
    train shards in train mode, heldout shards in eval mode, or ``split``).
    ``mode="train"``: endless, epoch after epoch, shard and line order shuffled from
    ``(seed, epoch)``; ``mode="eval"``: one pass in file order, final partial batch included.
    Shards are split among ``world_size`` ranks (each packs its own rows; the caller passes
    its ``rank``, the default is one process); with fewer shards than ranks, each rank takes
    every R-th line instead. One process must produce a rank's batches in order (each row
    continues in the next batch), so the dataset cannot be split among DataLoader workers.
    Encoded shards stay cached up to ``max_cache_bytes`` per rank (token ids, char tables
    and offsets; the shards being read are kept whatever their size).
    """

    def __init__(self, source: str | os.PathLike | Sequence[str | os.PathLike],
                 vocab: Vocabulary | str | os.PathLike | None, batch_size: int, unroll_steps: int, *,
                 max_characters_per_token: int = DEFAULT_MAX_CHARACTERS, char_inputs: bool = True,
                 mode: str = "train", split: str | None = None, per_sentence: bool = False,
                 seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool | None = None, max_cache_bytes: int = 256 * 2**20):
        if mode not in ("train", "eval"):
            raise InputError(f"mode must be 'train' or 'eval', got {mode!r}")
        if split not in (None, "train", "heldout"):
            raise InputError(f"split must be 'train' or 'heldout', got {split!r}")
        if batch_size < 1 or unroll_steps < 1:
            raise InputError(f"batch_size and unroll_steps must be >= 1, got {batch_size}, {unroll_steps}")
        self.manifest: dict | None = None
        if isinstance(source, (str, os.PathLike)) and os.fspath(source).endswith(".json"):
            self.manifest = load_manifest(source)
            split = split or ("train" if mode == "train" else "heldout")
            shards = self.manifest[split]["shards"]
            if not shards:
                raise InputError(f"{os.fspath(source)}: key '{split}.shards' is empty (no {split} data)")
            source = shards
        elif split is not None:
            raise InputError("split= is only meaningful with a manifest.json source")
        if vocab is None:
            if self.manifest is None or not isinstance(self.manifest.get("vocab"), str):
                raise InputError("vocab is required unless source is a manifest.json naming one")
            vocab = self.manifest["vocab"]
        self.vocab = vocab if isinstance(vocab, Vocabulary) else Vocabulary.from_file(vocab)

        self.shards = []
        for path in resolve_shards(source):
            if os.path.getsize(path) == 0:
                warnings.warn(f"shard {path} is empty; skipped", stacklevel=2)
            else:
                self.shards.append(path)
        if not self.shards:
            raise InputError(f"every shard of {source!r} is empty")

        if not 0 <= rank < world_size:
            raise InputError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.batch_size, self.unroll_steps = batch_size, unroll_steps
        self.max_characters_per_token = max_characters_per_token
        self.char_inputs, self.mode, self.per_sentence = char_inputs, mode, per_sentence
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle = (mode == "train") if shuffle is None else shuffle
        self.max_cache_bytes = max_cache_bytes
        self._live: _Batches | None = None
        self._pending_state: dict | None = None

    def __getstate__(self) -> dict:
        # Pickled (e.g. to copy a config): never the encoded shards of a live iteration.
        return {**self.__dict__, "_live": None}

    def __iter__(self) -> Iterator[dict]:
        """This rank's batches, from the state given to ``load_state_dict`` if any, else from the beginning."""
        info = get_worker_info()
        if info is not None:
            # Each worker would produce the whole of this rank's batches (see the class docstring), and
            # even one worker would keep the position out of the state_dict a checkpoint saves.
            raise RuntimeError(f"LMDataset cannot be split among {info.num_workers} DataLoader workers: "
                               "iterate it in the training process (num_workers=0)")
        if self._live is not None:
            self._live.close()  # a new iteration replaces the previous one
        batches = _Batches(self)
        if self._pending_state is not None:
            batches.load_state_dict(self._pending_state)
            self._pending_state = None
        self._live = batches
        return iter(batches)

    @property
    def epoch(self) -> int:
        """Epoch of the (forward) sentence stream of the iteration in this process."""
        if self._live is not None:
            return self._live.epoch
        return self._pending_state["epoch"] if self._pending_state else 0

    def state_dict(self) -> dict:
        """Where the iteration in this process stands, after the last batch it yielded.

        Small, JSON-serializable (cursors and per-row positions, no data). Only iteration in
        this process is tracked: to checkpoint it, prefetch no batches beyond the one trained
        on. Before any iteration: the state of the beginning (or the one loaded).
        """
        if self._live is not None:
            return self._live.state_dict()
        if self._pending_state is not None:
            return self._pending_state
        return _Batches(self).state_dict()

    def load_state_dict(self, state: dict) -> None:
        """The next iteration continues with the batch after the one ``state`` was taken at."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            got = state.get("version") if isinstance(state, dict) else state
            raise InputError(f"state_dict key 'version' must be {STATE_VERSION}, got {got!r}")
        config = state["config"]
        _check_config(config, self._config())
        self._pending_state = state
        if self._live is not None:
            self._live.close()
            self._live = None

    def state_differs(self, state: dict) -> list[str]:
        """The reader settings (``batch_size``, ``unroll_steps``, shards, ...) in which ``state`` differs
        from this reader's, as ``key old -> new``: a state that only another reader can continue."""
        saved = state.get("config") if isinstance(state, dict) else None
        saved = saved if isinstance(saved, dict) else {}  # a damaged state differs in every key
        return [f"{key} {saved.get(key)!r} -> {value!r}" for key, value in self._config().items()
                if saved.get(key) != value]

    def count_targets(self) -> int:
        """Tokens each direction predicts in one pass of this rank's part (its words and one
        sentence boundary per sentence), counted from the text: a progress bar's total."""
        total = 0
        for part in rank_plan(self.shards, self.rank, self.world_size):
            with open(part.path, encoding="utf-8", errors="replace") as f:
                for line in islice(f, part.line_offset, None, part.line_stride):
                    n = len(line.split())
                    total += n + 1 if n else 0
        return total

    def _config(self) -> dict:
        # "reader" and "n_readers" are the rank and world size (names kept: saved states use them).
        return {"reader": self.rank, "n_readers": self.world_size, "batch_size": self.batch_size,
                "unroll_steps": self.unroll_steps, "mode": self.mode, "per_sentence": self.per_sentence,
                "seed": self.seed, "shuffle": self.shuffle,
                "shards": [os.path.basename(p) for p in self.shards]}


class _Batches:
    """One iteration of an ``LMDataset`` by one rank: packs, assembles, and holds its state between batches."""

    def __init__(self, dataset: LMDataset):
        self._ds = dataset
        self._config = dataset._config()
        plan = rank_plan(dataset.shards, dataset.rank, dataset.world_size)
        self._cache = ShardCache(plan, dataset.vocab, dataset.max_characters_per_token,
                                 dataset.max_cache_bytes, dataset.char_inputs)
        infinite = dataset.mode == "train"
        B, T = dataset.batch_size, dataset.unroll_steps
        self.n_batches = 0
        self._done = False
        # The forward stream's epoch is the dataset's.
        self._stream = SentenceStream(plan, self._cache, dataset.seed, 0, dataset.shuffle, infinite)
        self._packer: Packer
        if dataset.per_sentence:
            self._packer = SentencePacker(self._stream, self._cache, B, T)
        else:
            # Independent readers for the two directions, as bilm-tf; the same order without shuffling.
            backward = SentenceStream(plan, self._cache, dataset.seed, 1, dataset.shuffle, infinite)
            self._packer = RowPacker(self._stream, backward, self._cache, B, T, round_robin=not infinite)

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
        packed = self._packer.fill()
        if packed is None:
            return None
        in_use = self._packer.keys_in_use()
        batch = {"forward": self._assemble(packed.forward, 1), "backward": self._assemble(packed.backward, -1),
                 "reset_state": torch.full((self._ds.batch_size,), packed.reset_state, dtype=torch.bool)}
        self._cache.release(in_use)
        return batch

    def _assemble(self, segments: Segments, sign: int) -> dict:
        B, T, C = self._ds.batch_size, self._ds.unroll_steps, self._ds.max_characters_per_token
        token_ids = np.zeros(B * T, dtype=np.int64)
        next_ids = np.zeros(B * T, dtype=np.int64)
        mask = np.zeros(B * T, dtype=bool)
        # Rows left zero are the all-zero char ids of masked positions.
        char_ids = np.zeros((B * T, C) if self._ds.char_inputs else (0, C), dtype=np.int32)
        if segments:
            flat = np.fromiter(chain.from_iterable(segments), dtype=np.int64, count=5 * len(segments))
            rows, cols, srcs, lengths, keys = flat.reshape(-1, 5).T
            offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            out = np.repeat(rows * T + cols, lengths) + offsets
            src = np.repeat(srcs, lengths) + sign * offsets
            mask[out] = True
            shard_keys = np.unique(keys)
            key_of = np.repeat(keys, lengths) if len(shard_keys) > 1 else None
            for key in shard_keys.tolist():
                shard = self._cache.get(key)
                if key_of is None:
                    o, s = out, src
                else:
                    selected = key_of == key
                    o, s = out[selected], src[selected]
                token_ids[o] = shard.token_ids[s]
                next_ids[o] = shard.token_ids[s + sign]
                if self._ds.char_inputs:
                    char_ids[o] = shard.char_table[shard.char_rows[s]]
        direction = {"token_ids": torch.from_numpy(token_ids.reshape(B, T))}
        if self._ds.char_inputs:
            direction["char_ids"] = torch.from_numpy(char_ids.reshape(B, T, C))
        direction["next_token_ids"] = torch.from_numpy(next_ids.reshape(B, T))
        direction["mask"] = torch.from_numpy(mask.reshape(B, T))
        direction["all_valid"] = bool(mask.all())  # known here, on the CPU: the model need not ask the device
        return direction

    @property
    def epoch(self) -> int:
        return self._stream.epoch

    def state_dict(self) -> dict:
        state: dict[str, Any] = {"version": STATE_VERSION, "config": dict(self._config),
                                 "batches": self.n_batches, "done": self._done, "epoch": self.epoch}
        state.update(self._packer.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        _check_config(state["config"], self._config)
        self.n_batches, self._done = state["batches"], state["done"]
        self._packer.load_state_dict(state)


def _check_config(saved: dict, current: dict) -> None:
    """A state only resumes the same reader of the same data and packing."""
    for key, value in current.items():
        if saved.get(key) != value:
            raise InputError(f"state_dict key 'config.{key}' is {saved.get(key)!r}, "
                             f"but this reader has {value!r}")
