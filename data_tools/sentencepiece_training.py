"""Training a SentencePiece model on a bounded random sample of the corpus."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import numpy as np

from bilm.core.errors import InputError
from bilm.core.text import clean_text


def sample_lines(texts: Iterable[tuple[str, int]], max_lines: int, seed: int, nfkc: bool,
                 progress: Callable[[int], None] = lambda n: None,
                 split: Optional[Callable[[list[str]], list[list[str]]]] = None) -> tuple[list[str], int]:
    """A uniform random sample (reservoir) of at most ``max_lines`` non-empty cleaned lines (with
    ``split``, sentences) of the ``(decoded text, bytes read)`` blocks, and the number seen. Memory is
    bounded by the sample, not the corpus."""
    rng = np.random.default_rng([seed, 7])
    reservoir: list[str] = []
    seen = 0
    for block, read in texts:
        progress(read)
        text, _ = clean_text(block, nfkc)
        lines = [line for line in text.split("\n") if not line.isspace() and line]
        if split is not None:
            lines = [sentence for sentences in split(lines) for sentence in sentences]
        take = min(max_lines - len(reservoir), len(lines))
        reservoir.extend(lines[:take])
        seen += take
        rest = lines[take:]
        if rest:
            # Algorithm R, vectorized: the n-th line replaces slot j ~ U[0, n) if j < max_lines.
            slots = rng.integers(0, seen + np.arange(1, len(rest) + 1))
            for i in np.flatnonzero(slots < max_lines).tolist():
                reservoir[slots[i]] = rest[i]
            seen += len(rest)
    return reservoir, seen


def train_sentencepiece(lines: list[str], model_prefix: str, vocab_size: int, model_type: str,
                        character_coverage: float, threads: int) -> str:
    """Train on ``lines``; returns the path of the ``.model`` file."""
    import sentencepiece

    if not lines:
        raise InputError("cannot train a SentencePiece model: the corpus has no non-empty line")
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_prefix=model_prefix, vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage,
            hard_vocab_limit=False,  # a small corpus gets a smaller vocabulary instead of an error
            num_threads=max(1, threads), minloglevel=2)
    except RuntimeError as e:
        raise InputError(f"SentencePiece training failed: {e}") from None
    return model_prefix + ".model"
