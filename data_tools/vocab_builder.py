"""``vocab.txt`` and ``vocab_counts.tsv`` from token counts of the training split."""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from itertools import count
from typing import Iterable, Mapping

import numpy as np

from bilm.core.chars import BOS_TOKEN, EOS_TOKEN, UNK_TOKEN
from bilm.core.errors import InputError

SPECIALS = (BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)


class TokenCounts:
    """Token counts merged from many workers' partial counts.

    ``Counter.update`` with a mapping loops in Python; here each partial count arrives as
    (distinct tokens, counts) and is merged with one C-level dict pass and a numpy add.
    """

    def __init__(self) -> None:
        self._ids: defaultdict[str, int] = defaultdict(count().__next__)  # new token -> next id
        self._counts = np.zeros(1 << 16, dtype=np.int64)

    @staticmethod
    def partial(tokens: Iterable[str]) -> tuple[list[str], np.ndarray]:
        """What a worker sends: the distinct tokens of an iterable of tokens and their counts."""
        return TokenCounts.pack(Counter(tokens))

    @staticmethod
    def pack(counted: Counter) -> tuple[list[str], np.ndarray]:
        return list(counted), np.fromiter(counted.values(), dtype=np.int64, count=len(counted))

    def add(self, partial: tuple[list[str], np.ndarray]) -> None:
        tokens, counts = partial
        ids = np.fromiter(map(self._ids.__getitem__, tokens), dtype=np.int64, count=len(tokens))
        if len(self._ids) > len(self._counts):
            grown = np.zeros(max(2 * len(self._counts), len(self._ids)), dtype=np.int64)
            grown[: len(self._counts)] = self._counts
            self._counts = grown
        self._counts[ids] += counts  # ids are distinct within one partial count

    def __len__(self) -> int:
        return len(self._ids)

    def as_dict(self) -> dict[str, int]:
        return dict(zip(self._ids, self._counts[: len(self._ids)].tolist()))


@dataclass
class VocabReport:
    entries: list[tuple[str, int]]  # the whole vocabulary with counts, specials first
    distinct_tokens: int  # distinct training tokens (before min_count / max_vocab)
    eligible_tokens: int  # distinct tokens with count >= min_count
    train_oov_tokens: int  # training token occurrences that map to <UNK>

    @property
    def size(self) -> int:
        return len(self.entries)


def build_vocab(counts: Mapping[str, int], n_sentences: int, min_count: int = 1,
                max_vocab: int | None = None) -> VocabReport:
    """Specials, then tokens by descending count, ties by token (code point order).

    ``max_vocab`` is the size of the whole vocabulary, the three specials included.
    ``<S>`` and ``</S>`` are counted once per sentence, ``<UNK>`` once per dropped token.
    """
    if max_vocab is not None and max_vocab < len(SPECIALS) + 1:
        raise InputError(f"--max-vocab must be at least {len(SPECIALS) + 1} (the three special tokens "
                         f"and one word), got {max_vocab}")
    eligible = [(t, c) for t, c in counts.items() if c >= min_count and t not in SPECIALS]
    eligible.sort(key=lambda item: (-item[1], item[0]))
    kept = eligible if max_vocab is None else eligible[: max_vocab - len(SPECIALS)]
    total = sum(counts.values())
    unk = total - sum(c for _, c in kept)
    entries = [(BOS_TOKEN, n_sentences), (EOS_TOKEN, n_sentences), (UNK_TOKEN, unk), *kept]
    return VocabReport(entries, len(counts), len(eligible), unk)


def write_vocab(path: str, entries: list[tuple[str, int]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"{token}\n" for token, _ in entries)


def write_counts(path: str, entries: list[tuple[str, int]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"{token}\t{count}\n" for token, count in entries)


def oov_rate(counts: Mapping[str, int], vocabulary: set[str]) -> float | None:
    """Share of the token occurrences in ``counts`` outside ``vocabulary`` (None if no tokens)."""
    total = sum(counts.values())
    if total == 0:
        return None
    return sum(c for t, c in counts.items() if t not in vocabulary) / total


def long_tokens(counts: Mapping[str, int], max_bytes: int) -> tuple[int, int, list[str]]:
    """Tokens longer than ``max_bytes`` UTF-8 bytes: (types, occurrences, most frequent few)."""
    long = [(t, c) for t, c in counts.items() if len(t) * 4 > max_bytes and len(t.encode("utf-8")) > max_bytes]
    long.sort(key=lambda item: (-item[1], item[0]))
    return len(long), sum(c for _, c in long), [t for t, _ in long[:5]]


# A token that ends in punctuation after a word character ("However,", "time.") is what splitting
# raw text at whitespace leaves; tokenized text has few, most of them abbreviations ("U.S.", "No."),
# which the bare-word condition below leaves out: 0.15% of WikiText-2's tokens, 7.9% of the same
# text detokenized (benchmarks/prepare_formats.py's raw_paragraphs).
ATTACHED_PUNCTUATION = re.compile(r"\w[.,;:!?]+$")
UNTOKENIZED_SHARE = 0.02


def attached_punctuation(counts: Mapping[str, int]) -> tuple[float, list[str]]:
    """(share of token occurrences that are a word with punctuation attached, the word also occurring
    bare, e.g. "time," beside "time"; the most frequent few). Abbreviations ("U.S.") do not count."""
    total = sum(counts.values())
    found = [(t, c) for t, c in counts.items() if t[-1:] in ".,;:!?" and ATTACHED_PUNCTUATION.search(t)
             and t.rstrip(".,;:!?") in counts]
    found.sort(key=lambda item: (-item[1], item[0]))
    return (sum(c for _, c in found) / total if total else 0.0), [t for t, _ in found[:5]]
