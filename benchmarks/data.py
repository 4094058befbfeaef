"""Reader throughput: forward tokens per second of ``bilm.data.LMDataset``.

One process, char ids on, both directions built, train mode (shuffled, endless)::

    python benchmarks/data.py --prefix 'DIR/train/shard-*' --vocab DIR/vocab.txt \\
        --batch 128 --unroll 20 --batches 300
    python benchmarks/data.py --generate 5000000            # synthetic shards in a temp dir

The last line is ``reader: N tokens/s`` (steady state: the first batch, which encodes
the first shards, is timed separately).

``--write-corpus PATH --tokens N`` only writes a raw Zipfian corpus (``.gz`` if PATH ends
so), the input for measuring ``bilm prepare``::

    python benchmarks/data.py --write-corpus /tmp/corpus.txt --tokens 10000000
    /usr/bin/time -v python -m data_tools prepare /tmp/corpus.txt --out /tmp/prepared --workers 2
"""
from __future__ import annotations

import argparse
import gzip
import os
import sys
import tempfile
import time
from collections import Counter

import numpy as np


def zipf_sentences(n_tokens: int, seed: int = 0, vocab_size: int = 200_000,
                   mean_length: int = 25):
    """Yield sentences (lists of str) of a synthetic corpus with Zipfian word frequencies."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    word_lengths = rng.integers(2, 12, size=vocab_size)
    words = ["".join(rng.choice(letters, size=n)) + str(i) for i, n in enumerate(word_lengths)]
    probabilities = 1.0 / np.arange(1, vocab_size + 1) ** 1.05
    probabilities /= probabilities.sum()
    produced = 0
    while produced < n_tokens:
        lengths = 1 + rng.poisson(mean_length - 1, size=10_000)
        ids = rng.choice(vocab_size, size=int(lengths.sum()), p=probabilities)
        tokens = [words[i] for i in ids.tolist()]
        start = 0
        for length in lengths.tolist():
            if produced >= n_tokens:
                return
            length = min(length, n_tokens - produced)
            yield tokens[start:start + length]
            start += length
            produced += length


def write_corpus(path: str, n_tokens: int, seed: int = 0) -> None:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for sentence in zipf_sentences(n_tokens, seed):
            f.write(" ".join(sentence) + "\n")


def write_shards(directory: str, n_tokens: int, n_shards: int = 4, seed: int = 0) -> tuple[str, str]:
    """Synthetic shards and a vocab.txt (no ``bilm prepare`` needed); returns (glob, vocab path)."""
    os.makedirs(directory, exist_ok=True)
    files = [open(os.path.join(directory, f"shard-{i:05d}.txt"), "w", encoding="utf-8") for i in range(n_shards)]
    counts: Counter = Counter()
    for i, sentence in enumerate(zipf_sentences(n_tokens, seed)):
        counts.update(sentence)
        files[i % n_shards].write(" ".join(sentence) + "\n")
    for f in files:
        f.close()
    vocab_path = os.path.join(directory, "vocab.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
        f.write("<S>\n</S>\n<UNK>\n")
        for token, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:100_000]:
            f.write(token + "\n")
    return os.path.join(directory, "shard-*"), vocab_path


def bilm_tf_style_batches(shard_paths: list[str], vocab_path: str, batch: int, unroll: int, max_chars: int):
    """The original reader's algorithm, for a baseline in the same process: every sentence
    becomes its own arrays (word ids and char ids stacked from a per-word cache) when read,
    and rows are filled by slicing those arrays, in Python, one row at a time. Both
    directions, as bilm-tf's BidirectionalLMDataset."""
    from bilm.core.chars import token_to_char_ids
    from bilm.core.vocab import Vocabulary

    vocab = Vocabulary.from_file(vocab_path)
    word_ids = vocab.token_to_id
    unk = word_ids["<UNK>"]
    char_cache: dict[str, np.ndarray] = {}

    def chars(word: str) -> np.ndarray:
        ids = char_cache.get(word)
        if ids is None:
            ids = char_cache[word] = np.asarray(token_to_char_ids(word, max_chars), dtype=np.int32)
        return ids

    def sentences(reverse: bool):
        rng = np.random.default_rng(int(reverse))
        while True:
            for path in shard_paths:
                with open(path, encoding="utf-8") as f:
                    lines = [line.split() for line in f if line.strip()]
                for i in rng.permutation(len(lines)):
                    words = ["<S>", *lines[i], "</S>"]
                    if reverse:
                        words.reverse()
                    yield (np.array([word_ids.get(w, unk) for w in words], dtype=np.int32),
                           np.vstack([chars(w) for w in words]))

    def packed(reverse: bool):
        stream = sentences(reverse)
        rows: list = [None] * batch
        while True:
            inputs = np.zeros((batch, unroll), np.int32)
            targets = np.zeros((batch, unroll), np.int32)
            char_inputs = np.zeros((batch, unroll, max_chars), np.int32)
            for i in range(batch):
                pos = 0
                while pos < unroll:
                    if rows[i] is None or len(rows[i][0]) <= 1:
                        rows[i] = next(stream)
                    n = min(len(rows[i][0]) - 1, unroll - pos)
                    inputs[i, pos:pos + n] = rows[i][0][:n]
                    char_inputs[i, pos:pos + n] = rows[i][1][:n]
                    targets[i, pos:pos + n] = rows[i][0][1:n + 1]
                    pos += n
                    rows[i] = [x[n:] for x in rows[i]]
            yield {"token_ids": inputs, "char_ids": char_inputs, "next_token_ids": targets}

    forward, backward = packed(False), packed(True)
    while True:
        yield {"forward": next(forward), "backward": next(backward)}


def time_batches(batches, n: int, count) -> tuple[float, float, float, int]:
    """(first batch seconds, seconds and CPU seconds of the next n, tokens in them). The first
    batch pays for opening and encoding; it is not part of the steady state."""
    start = time.perf_counter()
    next(batches)
    first_s = time.perf_counter() - start
    tokens, start, cpu_start = 0, time.perf_counter(), time.process_time()
    for _ in range(n):
        tokens += count(next(batches))
    return first_s, time.perf_counter() - start, time.process_time() - cpu_start, tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefix", help="shard glob, e.g. 'DIR/train/shard-*'")
    parser.add_argument("--vocab", help="vocab.txt")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--unroll", type=int, default=20)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--max-characters-per-token", type=int, default=50)
    parser.add_argument("--baseline-batches", type=int, default=100,
                        help="batches of the bilm-tf style baseline (0: skip it)")
    parser.add_argument("--generate", type=int, metavar="N_TOKENS",
                        help="write N_TOKENS of synthetic shards to a temp dir and read those")
    parser.add_argument("--write-corpus", metavar="PATH", help="only write a raw corpus for `bilm prepare`")
    parser.add_argument("--tokens", type=int, default=10_000_000, help="size of --write-corpus")
    args = parser.parse_args(argv)

    if args.write_corpus:
        start = time.perf_counter()
        write_corpus(args.write_corpus, args.tokens)
        print(f"wrote {args.tokens} tokens to {args.write_corpus} in {time.perf_counter() - start:.1f}s")
        return
    temporary = None
    if args.generate:
        temporary = tempfile.TemporaryDirectory(prefix="bilm-bench-")
        args.prefix, args.vocab = write_shards(temporary.name, args.generate)
    if not args.prefix or not args.vocab:
        parser.error("give --prefix and --vocab, or --generate N_TOKENS")

    from bilm.data import LMDataset  # after generation: torch import is not part of the timing

    dataset = LMDataset(args.prefix, args.vocab, args.batch, args.unroll,
                        max_characters_per_token=args.max_characters_per_token, mode="train")
    first_s, seconds, cpu_seconds, tokens = time_batches(
        iter(dataset), args.batches, lambda b: int(b["forward"]["mask"].sum()))
    print(f"first batch (encodes the first shards): {first_s:.2f}s; then {args.batches} batches of "
          f"{args.batch}x{args.unroll} in {seconds:.2f}s ({cpu_seconds:.2f}s CPU: "
          f"{tokens / cpu_seconds:.0f} tokens per CPU second), epoch {dataset.epoch}", file=sys.stderr)

    # Encoding a shard (text -> ids, char ids) happens once per shard, ahead of time in a
    # thread; its cost per token, added to the steady state, gives an epoch-amortized figure.
    from bilm.data import encode_shard, resolve_shards
    from bilm.core.vocab import Vocabulary
    shard_paths = resolve_shards(args.prefix)
    start = time.perf_counter()
    encoded = encode_shard(shard_paths[0], Vocabulary.from_file(args.vocab), args.max_characters_per_token)
    encode_s_per_token = (time.perf_counter() - start) / len(encoded.token_ids)
    amortized = 1.0 / (seconds / tokens + encode_s_per_token)
    print(f"shard encoding: {1 / encode_s_per_token:.0f} tokens/s; epoch-amortized reader "
          f"(encoding + packing): {amortized:.0f} tokens/s", file=sys.stderr)

    if args.baseline_batches:
        _, baseline_s, _, baseline_tokens = time_batches(
            bilm_tf_style_batches(shard_paths, args.vocab, args.batch, args.unroll, args.max_characters_per_token),
            args.baseline_batches, lambda b: int(b["forward"]["token_ids"].size))
        baseline = baseline_tokens / baseline_s
        print(f"bilm-tf style reader (same process, {args.baseline_batches} batches): {baseline:.0f} tokens/s; "
              f"ratio {tokens / seconds / baseline:.1f}x steady, {amortized / baseline:.1f}x amortized",
              file=sys.stderr)
    print(f"reader: {tokens / seconds:.0f} tokens/s")
    if temporary is not None:
        temporary.cleanup()


if __name__ == "__main__":
    main()
