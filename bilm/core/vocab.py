"""The word vocabulary of the softmax: ``vocab.txt`` as bilm-tf reads it.

One token per line; a line may carry a tab-separated count (``vocab_counts.tsv``
is a valid vocabulary file too), only the first field is the token. The first
three lines must be ``<S>``, ``</S>``, ``<UNK>``, so their ids are 0, 1 and 2.
"""
from __future__ import annotations

import os
from itertools import repeat
from typing import Iterable, Sequence

import numpy as np

from bilm.core.errors import InputError, not_utf8

BOS_TOKEN = "<S>"
EOS_TOKEN = "</S>"
UNK_TOKEN = "<UNK>"

SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)


class VocabularyError(InputError):
    """A malformed vocabulary; the message names the file and line."""


def read_tokens(path: str | os.PathLike) -> list[str]:
    """The tokens of a vocabulary file, one per line (a tab and anything after it ignored, as in
    ``vocab_counts``-style files), checked: UTF-8, no whitespace inside a token, blank lines only at
    the end. Any order: a published ELMo vocabulary starts ``</S>``, ``<S>``, ``<UNK>``, which
    ``Vocabulary`` (``<S>``, ``</S>``, ``<UNK>`` first) would refuse."""
    path = os.fspath(path)
    tokens: list[str] = []
    blank_line = 0  # a blank line is only allowed at the end of the file
    with open(path, encoding="utf-8") as f:
        try:
            for number, line in enumerate(f, start=1):  # line by line: a vocabulary can have 800k lines
                token = line.rstrip("\r\n").split("\t", 1)[0]
                if not token.strip():
                    blank_line = blank_line or number
                    continue
                if blank_line:
                    raise VocabularyError(f"{path}, line {blank_line}: empty line inside the vocabulary")
                if token != token.strip() or len(token.split()) != 1:
                    raise VocabularyError(f"{path}, line {number}: token {token!r} contains whitespace")
                tokens.append(token)
        except UnicodeDecodeError:
            raise VocabularyError(not_utf8(path)) from None
    return tokens


class Vocabulary:
    """Token <-> id mapping with ``<S>``=0, ``</S>``=1, ``<UNK>``=2."""

    bos_id = 0
    eos_id = 1
    unk_id = 2

    def __init__(self, tokens: Iterable[str], source: str = "<vocabulary>"):
        self._tokens: list[str] = list(tokens)
        self.source = source
        for line, (expected, got) in enumerate(zip(SPECIAL_TOKENS, self._tokens), start=1):
            if got != expected:
                raise VocabularyError(f"{source}, line {line}: expected {expected!r} "
                                      f"(a vocabulary starts with <S>, </S>, <UNK>), got {got!r}")
        if len(self._tokens) < len(SPECIAL_TOKENS):
            raise VocabularyError(f"{source}, line {len(self._tokens) + 1}: expected "
                                  f"{SPECIAL_TOKENS[len(self._tokens)]!r}, got end of file")
        self._index: dict[str, int] = {}
        for i, token in enumerate(self._tokens):
            if token in self._index:
                raise VocabularyError(f"{source}, line {i + 1}: duplicate token {token!r} "
                                      f"(first on line {self._index[token] + 1})")
            self._index[token] = i

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Vocabulary":
        path = os.fspath(path)
        return cls(read_tokens(path), source=path)

    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, token: str) -> bool:
        return token in self._index

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} tokens from {self.source})"

    @property
    def tokens(self) -> list[str]:
        return self._tokens

    @property
    def token_to_id(self) -> dict[str, int]:
        return self._index

    def id_to_token(self, token_id: int) -> str:
        return self._tokens[token_id]

    def encode(self, tokens: Sequence[str]) -> np.ndarray:
        """Ids of ``tokens`` (int64); tokens outside the vocabulary become ``unk_id``."""
        # map(dict.get, ...) keeps the per-token loop in C.
        return np.fromiter(map(self._index.get, tokens, repeat(self.unk_id)),
                           dtype=np.int64, count=len(tokens))

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self._tokens[i] for i in ids]
