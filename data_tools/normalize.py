"""Text cleaning and tokenization: raw decoded text -> lists of tokens per line."""
from __future__ import annotations

import unicodedata
from typing import Protocol


def _control_table() -> dict[int, str | None]:
    """str.translate table: C0/C1 controls removed, the whitespace ones turned into a space.

    ``\\n`` stays (it separates lines); the byte-order mark U+FEFF is removed too.
    """
    table: dict[int, str | None] = {}
    for code in [*range(0x00, 0x20), *range(0x7F, 0xA0)]:
        if code != 0x0A:
            table[code] = " " if chr(code).isspace() else None
    table[0xFEFF] = None
    return table


_CONTROL = _control_table()


def clean_text(text: str, nfkc: bool) -> tuple[str, int]:
    """NFKC (optional) then control characters removed; returns (text, characters removed)."""
    if nfkc:
        text = unicodedata.normalize("NFKC", text)
    cleaned = text.translate(_CONTROL)
    return cleaned, len(text) - len(cleaned)


class Tokenizer(Protocol):
    name: str

    def tokenize(self, lines: list[str]) -> list[list[str]]:
        ...


class WhitespaceTokenizer:
    """The input is already tokenized: tokens are separated by (any Unicode) whitespace."""
    name = "whitespace"

    def tokenize(self, lines: list[str]) -> list[list[str]]:
        return [line.split() for line in lines]


class SentencePieceTokenizer:
    """Tokens are the pieces of a SentencePiece model (``▁`` marks a preceding space)."""
    name = "sentencepiece"

    def __init__(self, model_path: str):
        import sentencepiece

        self.model_path = model_path
        self._processor = sentencepiece.SentencePieceProcessor(model_file=model_path)

    def tokenize(self, lines: list[str]) -> list[list[str]]:
        # Collapse whitespace first so that no piece can contain a space the reader would split on.
        pieces = self._processor.encode([" ".join(line.split()) for line in lines], out_type=str)
        return [[p for p in line if p.strip()] for line in pieces]


def make_tokenizer(name: str, model_path: str | None = None) -> Tokenizer:
    if name == "whitespace":
        return WhitespaceTokenizer()
    if name == "sentencepiece":
        if model_path is None:
            raise ValueError("the sentencepiece tokenizer needs a model path")
        return SentencePieceTokenizer(model_path)
    raise ValueError(f"unknown tokenizer {name!r} (expected 'whitespace' or 'sentencepiece')")


def split_long(tokens: list[str], max_tokens: int) -> list[list[str]]:
    """``tokens`` cut into pieces of at most ``max_tokens`` (0: no limit)."""
    if max_tokens <= 0 or len(tokens) <= max_tokens:
        return [tokens]
    return [tokens[i:i + max_tokens] for i in range(0, len(tokens), max_tokens)]
