"""A synthetic corpus with 1B-Word-Benchmark-like statistics, written fast with numpy.

What it imitates (Chelba et al. 2013, the corpus ELMo was trained on): about 800M training
tokens in 100 files ``news.en-000NN-of-00100``, one tokenized sentence per line; a
vocabulary of 793,471 words (``vocab.txt``, the three specials included) whose frequencies
follow Zipf's law; a long tail of rare types (hyphenated compounds, word-number mixes),
almost all seen once or twice, so they fall under ``--min-count 3`` as the benchmark's
0.28% out-of-vocabulary tokens did; sentence lengths like news text (lognormal, mean about
27 tokens, a long right tail).

    python benchmarks/corpus.py --out /tmp/corpus --tokens 10000000 [--vocab-size 793471]

Writes ``news.en-*`` (the corpus), ``vocab.txt`` (the full vocabulary: ``<S>``, ``</S>``,
``<UNK>``, then the Zipf types by rank) and, last, ``corpus.json`` (the parameters and
counts; its presence marks a complete corpus, which ``write_corpus`` then reuses).

Word ids are drawn in blocks through a precomputed CDF (``np.searchsorted``) and each
block's text is gathered from one byte string of all words, so the writer does no
per-token Python work (tens of millions of tokens a second; ``corpus.json`` records it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

MARKER = "corpus.json"
SPECIALS = ("<S>", "</S>", "<UNK>")
FILE_PATTERN = "news.en-{:05d}-of-{:05d}"
BLOCK_TOKENS = 1 << 20


def make_words(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` distinct word-like strings, frequent (low rank) ones short as in English: letters,
    some capitalized; lengths grow with log rank (about 3 for the top words, 10 for the rarest)."""
    letters = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", dtype=np.uint8)
    weights = np.array([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0,
                        2.0, 1.9, 1.5, 1.0, 0.8, 0.15, 0.15, 0.1, 0.07])
    mean_length = 2.0 + 1.4 * np.log10(np.arange(n) + 2.0)
    lengths = np.clip(np.rint(rng.normal(mean_length, 1.5)), 1, 20).astype(np.int64)
    chars = rng.choice(letters, size=int(lengths.sum()), p=weights / weights.sum())
    capital = rng.random(n) < 0.12
    first = np.cumsum(lengths) - lengths
    chars[first[capital]] -= 32  # upper case
    blob = chars.tobytes().decode("ascii")
    words, seen = [], set(SPECIALS)
    extra = rng.choice(letters, size=4 * n + 64).tobytes().decode("ascii")
    for i, (start, length) in enumerate(zip(first.tolist(), lengths.tolist())):
        word = blob[start:start + length]
        k = 0
        while word in seen:  # a clash (mostly among short words): lengthen it
            word += extra[(7 * i + k) % len(extra)]
            k += 1
        seen.add(word)
        words.append(word)
    return words


def make_numbers(n: int, rng: np.random.Generator) -> list[str]:
    """Number-like strings (years, counts, decimals) for the rare-type tail."""
    values = rng.integers(0, 10 ** rng.integers(1, 7, size=n))
    kinds = rng.integers(0, 3, size=n)
    out = []
    for value, kind in zip(values.tolist(), kinds.tolist()):
        out.append(f"{value:,}" if kind == 0 else f"{value / 100:.2f}" if kind == 1 else str(value))
    return out


class _Pieces:
    """All pieces (vocabulary words, then number strings) in one byte string, each followed by one
    separator byte, with their offsets: a token stream becomes text by one gather."""

    def __init__(self, strings: list[str]):
        encoded = [s.encode("utf-8") for s in strings]
        self.length = np.array([len(e) + 1 for e in encoded], dtype=np.int32)
        self.offset = np.cumsum(self.length, dtype=np.int64) - self.length
        if self.offset[-1] >= 2**31:
            raise ValueError("the pieces take more than 2 GiB")
        self.offset = self.offset.astype(np.int32)
        self.blob = np.frombuffer(b" ".join(encoded) + b" ", dtype=np.uint8)

    def text(self, pieces: np.ndarray, separators: np.ndarray) -> bytes:
        """Pieces back to back, piece i followed by ``separators[i]`` (a byte)."""
        lengths = self.length[pieces]  # int32 throughout: a block's text is far below 2 GiB
        ends = np.cumsum(lengths, dtype=np.int32)
        src = np.repeat(self.offset[pieces] - (ends - lengths), lengths)
        src += np.arange(int(ends[-1]), dtype=np.int32)
        out = self.blob[src]
        out[ends - 1] = separators
        return out.tobytes()


class ZipfDraws:
    """Ids 0..n-1 with P(k) proportional to 1 / (k + 1)^s, by inverse CDF with a guide table
    (the first id of each 1/G-wide slice of [0, 1)): one lookup and a step or two of search
    per draw, several times faster than ``np.searchsorted`` over the whole CDF."""

    def __init__(self, n: int, s: float, guide_bits: int = 22):
        self.cdf = np.cumsum(1.0 / np.arange(1, n + 1, dtype=np.float64) ** s)
        self.cdf /= self.cdf[-1]
        self.cdf[-1] = np.inf  # u < 1 always lands at or before the last id
        self.slices = 1 << guide_bits
        self.guide = np.searchsorted(self.cdf, np.arange(self.slices) / self.slices, side="right")

    def __call__(self, rng: np.random.Generator, n: int) -> np.ndarray:
        u = rng.random(n)
        ids = self.guide[(u * self.slices).astype(np.int64)]
        todo = np.flatnonzero(self.cdf[ids] <= u)
        while todo.size:  # the first id whose CDF exceeds u
            ids[todo] += 1
            todo = todo[self.cdf[ids[todo]] <= u[todo]]
        return ids


def sentence_lengths(n: int, rng: np.random.Generator, mean: float = 27.0, sigma: float = 0.6,
                     max_length: int = 250) -> np.ndarray:
    """News-like sentence lengths: lognormal with the given mean, at least 1, at most max_length."""
    mu = np.log(mean) - sigma ** 2 / 2
    return np.clip(np.rint(rng.lognormal(mu, sigma, size=n)), 1, max_length).astype(np.int64)


def write_corpus(out: str, n_tokens: int, vocab_size: int = 793_471, n_files: int = 100, seed: int = 0,
                 zipf_s: float = 1.0, tail_fraction: float = 0.003, mean_sentence: float = 27.0,
                 log=print) -> dict:
    """Write the corpus into ``out`` unless ``out/corpus.json`` already records one with the same
    parameters; returns that record (``reused`` tells which)."""
    params = {"tokens": n_tokens, "vocab_size": vocab_size, "files": n_files, "seed": seed, "zipf_s": zipf_s,
              "tail_fraction": tail_fraction, "mean_sentence": mean_sentence}
    marker = os.path.join(out, MARKER)
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as f:
            record = json.load(f)
        if record.get("params") == params:
            return {**record, "reused": True}
        raise ValueError(f"{out} holds another corpus ({record.get('params')}); give another directory")
    os.makedirs(out, exist_ok=True)
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    n_types = vocab_size - len(SPECIALS)
    if n_types < 1:
        raise ValueError(f"vocab_size must be more than {len(SPECIALS)}, got {vocab_size}")
    words = make_words(n_types, rng)
    numbers = make_numbers(max(1000, n_types // 8), rng)
    with open(os.path.join(out, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("".join(f"{w}\n" for w in (*SPECIALS, *words)))
    pieces = _Pieces(words + numbers)
    draw_ids = ZipfDraws(n_types, zipf_s)
    setup_s = time.perf_counter() - started

    per_file = [n_tokens // n_files + (i < n_tokens % n_files) for i in range(n_files)]
    written_tokens = written_bytes = n_sentences = n_tail = 0
    space, newline, hyphen = ord(" "), ord("\n"), ord("-")
    for index, file_tokens in enumerate(per_file):
        path = os.path.join(out, FILE_PATTERN.format(index, n_files))
        with open(path + ".tmp", "wb") as f:
            left = file_tokens
            while left > 0:
                lengths = sentence_lengths(max(16, min(BLOCK_TOKENS, left) // int(mean_sentence)), rng,
                                           mean_sentence)
                ends = np.cumsum(lengths)
                lengths = lengths[: max(1, int(np.searchsorted(ends, left, side="right")))]
                n = int(lengths.sum())
                if n > left:  # one sentence longer than what is left of the file: cut it
                    lengths[-1] -= n - left
                    n = left
                ids = draw_ids(rng, n)
                # The tail: a token becomes a rare type, "word-word" or "word-number", drawn
                # uniformly over a space of about 1e11 pairs (so almost always new).
                tail = rng.random(n) < tail_fraction
                n_tail += int(tail.sum())
                repeats = 1 + tail.astype(np.int64)
                token_of_piece = np.repeat(np.arange(n), repeats)
                first_piece = np.cumsum(repeats) - repeats
                piece_ids = ids[token_of_piece]
                tail_first = first_piece[tail]
                piece_ids[tail_first] = rng.integers(0, n_types, size=len(tail_first))
                piece_ids[tail_first + 1] = rng.integers(0, len(pieces.length), size=len(tail_first))
                separators = np.full(len(piece_ids), space, dtype=np.uint8)
                separators[tail_first] = hyphen
                last_token = np.cumsum(lengths) - 1
                separators[first_piece[last_token] + repeats[last_token] - 1] = newline
                data = pieces.text(piece_ids, separators)
                f.write(data)
                written_bytes += len(data)
                written_tokens += n
                n_sentences += len(lengths)
                left -= n
        os.replace(path + ".tmp", path)
        if log and (index + 1) % 10 == 0:
            elapsed = time.perf_counter() - started
            log(f"corpus: {index + 1}/{n_files} files, {written_tokens:,} tokens, "
                f"{written_tokens / max(elapsed - setup_s, 1e-9):,.0f} tokens/s", file=sys.stderr)
    seconds = time.perf_counter() - started
    record = {"params": params, "files": [FILE_PATTERN.format(i, n_files) for i in range(n_files)],
              "vocab": "vocab.txt", "tokens": written_tokens, "sentences": n_sentences, "bytes": written_bytes,
              "tail_tokens": n_tail, "seconds": round(seconds, 2), "setup_seconds": round(setup_s, 2),
              "tokens_per_second": round(written_tokens / max(seconds - setup_s, 1e-9))}
    with open(marker + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    os.replace(marker + ".tmp", marker)  # last: the corpus is complete
    return {**record, "reused": False}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory to write (reused when complete)")
    parser.add_argument("--tokens", type=int, default=800_000_000)
    parser.add_argument("--vocab-size", type=int, default=793_471,
                        help="lines of vocab.txt, the three specials included (1B Word: 793,471)")
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent of the word frequencies")
    parser.add_argument("--tail-fraction", type=float, default=0.003,
                        help="share of tokens that are rare types (almost all unique)")
    args = parser.parse_args(argv)
    record = write_corpus(args.out, args.tokens, args.vocab_size, args.files, args.seed, args.zipf_s,
                          args.tail_fraction)
    how = "reused" if record["reused"] else "wrote"
    print(f"{how} {record['tokens']:,} tokens ({record['bytes'] / 2**30:.2f} GiB, {record['sentences']:,} sentences) "
          f"in {args.out}: {record['seconds']:.1f}s, {record['tokens_per_second']:,} tokens/s")


if __name__ == "__main__":
    main()
