"""ELMo character ids.

A token becomes ``max_characters_per_token`` ids: begin-of-word, its UTF-8 bytes
(truncated to ``max_characters_per_token - 2``), end-of-word, then padding.
``<S>`` and ``</S>`` get the special sentence characters. At prediction every id
is shifted by +1 so that 0 is the mask (the 262-row char embedding); this module
always returns shifted ids, the convention of the model modules.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from bilm.core.errors import InputError
from bilm.core.vocab import BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, read_tokens  # noqa: F401 (the tokens re-exported)

# Unshifted ids, as bilm-tf's UnicodeCharsVocabulary and the published weights use them.
BOS_CHAR = 256
EOS_CHAR = 257
BOW_CHAR = 258
EOW_CHAR = 259
PAD_CHAR = 260
N_CHARACTERS = 262  # 261 ids shifted by one, plus 0 for the mask

DEFAULT_MAX_CHARACTERS = 50


def token_to_char_ids(token: str, max_characters_per_token: int = DEFAULT_MAX_CHARACTERS) -> np.ndarray:
    """Shifted char ids (values 1..261) of one token, shape (max_characters_per_token,)."""
    if max_characters_per_token < 3:
        raise InputError(f"max_characters_per_token must be >= 3, got {max_characters_per_token}")
    ids = np.full(max_characters_per_token, PAD_CHAR, dtype=np.int32)
    ids[0] = BOW_CHAR
    if token == BOS_TOKEN or token == EOS_TOKEN:
        ids[1] = BOS_CHAR if token == BOS_TOKEN else EOS_CHAR
        ids[2] = EOW_CHAR
    else:
        encoded = token.encode("utf-8", "ignore")[: max_characters_per_token - 2]
        ids[1 : 1 + len(encoded)] = np.frombuffer(encoded, dtype=np.uint8)
        ids[1 + len(encoded)] = EOW_CHAR
    return ids + 1


def char_id_table(tokens: Sequence[str], max_characters_per_token: int = DEFAULT_MAX_CHARACTERS,
                  dtype: type = np.int32) -> np.ndarray:
    """Shifted char ids of many tokens at once, (len(tokens), max_characters_per_token) ``dtype``
    (int32; int16 holds them too, every id being below 262).

    Row ``i`` equals ``token_to_char_ids(tokens[i])``; built with numpy from the concatenated
    UTF-8 bytes instead of one small array per token.
    """
    if max_characters_per_token < 3:
        raise InputError(f"max_characters_per_token must be >= 3, got {max_characters_per_token}")
    n, width = len(tokens), max_characters_per_token
    encoded = [t.encode("utf-8", "ignore")[: width - 2] for t in tokens]
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=n)
    table = np.full((n, width), PAD_CHAR + 1, dtype=dtype)
    table[:, 0] = BOW_CHAR + 1
    flat = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    rows = np.repeat(np.arange(n), lengths)
    cols = 1 + np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    table[rows, cols] = flat.astype(dtype) + 1
    table[np.arange(n), lengths + 1] = EOW_CHAR + 1
    for i, token in enumerate(tokens):
        if token == BOS_TOKEN or token == EOS_TOKEN:
            table[i] = token_to_char_ids(token, width)
    return table


class CharIdMapper:
    """Turns token lists into padded char-id arrays, caching each token's row.

    Tokens are looked up once in a dict; the ids of a whole batch are gathered with
    one numpy fancy-index, so no per-character Python work is done for tokens seen
    before. Row 0 of the table is the all-zero mask row used for padding positions.
    """

    def __init__(self, max_characters_per_token: int = DEFAULT_MAX_CHARACTERS,
                 tokens: Iterable[str] = ()):
        self.max_characters_per_token = max_characters_per_token
        preload = list(dict.fromkeys((BOS_TOKEN, EOS_TOKEN, *tokens)))  # distinct, in order
        self._row_of: dict[str, int] = {token: row for row, token in enumerate(preload, start=1)}
        self._n_rows = 1 + len(preload)  # row 0: mask
        self._table = np.zeros((max(1024, 2 * self._n_rows), max_characters_per_token), dtype=np.int32)
        self._table[1:self._n_rows] = char_id_table(preload, max_characters_per_token)

    @classmethod
    def from_vocab_file(cls, path: str, max_characters_per_token: int = DEFAULT_MAX_CHARACTERS) -> "CharIdMapper":
        """Preload the cache with every token of a vocab file (one token per line, checked)."""
        return cls(max_characters_per_token, read_tokens(path))

    def __len__(self) -> int:
        return self._n_rows - 1

    @property
    def table(self) -> np.ndarray:
        """(n_rows, max_characters_per_token) shifted ids; row 0 is the mask row."""
        return self._table[: self._n_rows]

    def row(self, token: str) -> int:
        """Row of ``token`` in ``table``, computing its ids on first sight."""
        row = self._row_of.get(token)
        if row is None:
            if self._n_rows == len(self._table):
                self._table = np.concatenate([self._table, np.zeros_like(self._table)])
            row = self._n_rows
            self._table[row] = token_to_char_ids(token, self.max_characters_per_token)
            self._row_of[token] = row
            self._n_rows += 1
        return row

    def rows(self, tokens: Sequence[str]) -> list[int]:
        get = self._row_of.get
        out = []
        for token in tokens:
            row = get(token)
            out.append(row if row is not None else self.row(token))
        return out

    def batch_rows(self, sentences: Sequence[Sequence[str]], add_sentence_boundaries: bool = True) -> np.ndarray:
        """Rows of ``table`` for each position (n_sentences, max_len), int64, 0 = padding.

        With ``add_sentence_boundaries`` each sentence is wrapped in ``<S>`` .. ``</S>``
        (as bilm-tf's Batcher does); ``max_len`` counts them.
        """
        check_sentences(sentences)
        extra = 2 if add_sentence_boundaries else 0
        max_len = max((len(s) for s in sentences), default=0) + extra
        index = np.zeros((len(sentences), max_len), dtype=np.int64)
        bos, eos = self._row_of[BOS_TOKEN], self._row_of[EOS_TOKEN]
        for i, sentence in enumerate(sentences):
            rows = self.rows(sentence)
            if add_sentence_boundaries:
                rows = [bos, *rows, eos]
            index[i, : len(rows)] = rows
        return index

    def batch(self, sentences: Sequence[Sequence[str]], add_sentence_boundaries: bool = True) -> np.ndarray:
        """Char ids (n_sentences, max_len, max_characters_per_token), int32, 0 = padding."""
        rows = self.batch_rows(sentences, add_sentence_boundaries)  # may grow the table: index after
        return self._table[rows]


def check_sentences(sentences: Sequence[Sequence[str]]) -> None:
    """Raise a TypeError naming the position of the first thing that is not a token."""
    if isinstance(sentences, (str, bytes)):
        raise TypeError("expected a list of sentences (lists of str tokens), got a single string")
    for i, sentence in enumerate(sentences):
        if isinstance(sentence, (str, bytes)):
            raise TypeError(f"sentence {i} is a {type(sentence).__name__}, expected a list of str tokens")
        for j, token in enumerate(sentence):
            if not isinstance(token, str):
                raise TypeError(
                    f"sentence {i}, token {j} is a {type(token).__name__} ({token!r}), expected str")
