"""Pass 1 (in the workers): a block of raw bytes (text, JSON lines, or a table's text values)
-> cleaned lines, split into sentences (``--split-sentences``), tokenized, each sent to a shuffle
bucket of the train or heldout split. The worker's ``TextPipeline`` is the one the manifest
records, so training data and later raw text are tokenized by the same code.

The split is decided by a hash of the output line alone, so it does not depend on the
seed, the block size or the number of workers. Without ``--dedup`` a line's bucket is drawn
at random (seeded by the block's position); with it, the bucket is a hash of the line, so
that copies of a line meet in one bucket where they can be removed.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field, fields
from itertools import chain

import numpy as np

from data_tools.inputs import decode_counting
from data_tools.records import json_lines_text
from bilm.core.text import TextPipeline, clean_text, split_long
from data_tools.vocab_builder import TokenCounts


@dataclass(frozen=True)
class LineOptions:
    nfkc: bool
    tokenizer: str
    sp_model: str | None
    max_tokens_per_line: int
    heldout_fraction: float
    seed: int
    dedup: bool
    n_train_buckets: int
    n_heldout_buckets: int
    lang: str | None = None
    split_sentences: str | None = None
    text_field: tuple[str, ...] = ("text",)

    def pipeline(self) -> TextPipeline:
        proto = None
        if self.sp_model:
            with open(self.sp_model, "rb") as f:
                proto = f.read()
        return TextPipeline(self.tokenizer, self.nfkc, self.max_tokens_per_line, proto, self.lang,
                            self.split_sentences)


@dataclass
class BlockTask:
    file_index: int
    block_index: int
    first_line: int  # line number (0-based) of the block's first line in its file
    data: bytes
    json: bool = False  # JSON lines: the text is the records' text field


@dataclass
class LineStats:
    """Per-file counters (summed over blocks)."""
    lines: int = 0  # input lines
    empty: int = 0  # dropped: no token left after cleaning and tokenizing
    extra_from_long: int = 0  # additional lines made by cutting long lines
    invalid_utf8: int = 0  # invalid byte sequences replaced by U+FFFD
    first_invalid_line: int = -1  # 1-based line number of the first one, -1 if none
    control_removed: int = 0  # control characters deleted
    train_lines: int = 0
    heldout_lines: int = 0
    tokens: int = 0
    extra_from_sentences: int = 0  # additional lines made by splitting lines into sentences
    records: int = 0  # JSON records or table rows read (bad ones included); 0 for text
    bad_records: int = 0  # skipped with --skip-bad (a truncated stream, an unreadable file: 1)
    bad: dict = field(default_factory=dict)  # reason -> count
    first_bad: str | None = None  # where the first bad record is, and why

    def add(self, other: "LineStats") -> None:
        for f in fields(self):
            if f.name == "first_invalid_line":
                if self.first_invalid_line < 0:
                    self.first_invalid_line = other.first_invalid_line
            elif f.name == "first_bad":
                self.first_bad = self.first_bad or other.first_bad
            elif f.name == "bad":
                for reason, n in other.bad.items():
                    self.bad[reason] = self.bad.get(reason, 0) + n
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class BlockResult:
    file_index: int
    buckets: dict[int, bytes] = field(default_factory=dict)  # bucket -> lines, each ending in \n
    stats: LineStats = field(default_factory=LineStats)
    # Token counts of the train and heldout lines (TokenCounts.partial); without --dedup only,
    # else pass 2 counts after removing the duplicates.
    train_counts: tuple[list[str], np.ndarray] | None = None
    heldout_counts: tuple[list[str], np.ndarray] | None = None


_options: LineOptions | None = None
_pipeline: TextPipeline | None = None


def init_worker(options: LineOptions) -> None:
    global _options, _pipeline
    _options = options
    _pipeline = options.pipeline()


def line_hash(line: bytes) -> tuple[int, int]:
    """Two independent 64-bit hashes of a line: (split hash, bucket hash)."""
    digest = hashlib.blake2b(line, digest_size=16).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")


def block_text(task: BlockTask, options: LineOptions, stats: LineStats) -> str:
    """The block's text, decoded (JSON lines: their text field's lines), one line per input line;
    stats get the invalid UTF-8, the records and the bad ones (``first_bad`` without the file name)."""
    text, stats.invalid_utf8, first_offset = decode_counting(task.data)
    if stats.invalid_utf8:
        stats.first_invalid_line = task.first_line + task.data.count(b"\n", 0, first_offset) + 1
    if not task.json:
        return text
    parsed = json_lines_text(text, options.text_field, task.first_line)
    stats.records = parsed.records
    stats.invalid_utf8 += parsed.surrogates
    if parsed.bad:
        stats.bad, stats.bad_records = parsed.bad, sum(parsed.bad.values())
        stats.first_bad = "{line}: {why}".format(line=parsed.first_bad[0], why=parsed.first_bad[1])
    return "\n".join(parsed.lines) + "\n" if parsed.lines else ""


def process_block(task: BlockTask) -> BlockResult:
    options, pipeline = _options, _pipeline
    assert options is not None and pipeline is not None, "init_worker was not called"
    result = BlockResult(task.file_index)
    stats = result.stats

    text = block_text(task, options, stats)
    text, stats.control_removed = clean_text(text, options.nfkc)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the block ends with a line end
    stats.lines = len(lines)

    out_tokens: list[list[str]] = []
    for sentences in pipeline.tokenize_cleaned(lines):
        if not sentences:
            stats.empty += 1
            continue
        stats.extra_from_sentences += len(sentences) - 1
        for tokens in sentences:
            pieces = split_long(tokens, options.max_tokens_per_line)
            stats.extra_from_long += len(pieces) - 1
            out_tokens.extend(pieces)
    out = [" ".join(tokens) for tokens in out_tokens]

    # Random buckets (no dedup) come from the block's own seeded generator: reproducible.
    draws = np.random.default_rng([options.seed, task.file_index, task.block_index]).random(len(out)).tolist()
    threshold = options.heldout_fraction * 2.0 ** 64
    seed_salt = options.seed * 0x9E3779B97F4A7C15
    n_train, n_heldout = options.n_train_buckets, options.n_heldout_buckets
    grouped: defaultdict[int, list[bytes]] = defaultdict(list)
    train_tokens: list[list[str]] = []
    heldout_tokens: list[list[str]] = []
    for line, tokens, draw in zip(out, out_tokens, draws):
        encoded = line.encode("utf-8")
        split_hash, bucket_hash = line_hash(encoded)
        if options.dedup:  # the line's own hash, scrambled by the seed: copies share a bucket
            draw = ((bucket_hash ^ seed_salt) * 0xBF58476D1CE4E5B9 % 2 ** 64) / 2.0 ** 64
        if split_hash < threshold:
            grouped[n_train + int(draw * n_heldout)].append(encoded)
            heldout_tokens.append(tokens)
        else:
            grouped[int(draw * n_train)].append(encoded)
            train_tokens.append(tokens)
    result.buckets = {bucket: b"\n".join(group) + b"\n" for bucket, group in grouped.items()}
    stats.heldout_lines, stats.train_lines = len(heldout_tokens), len(train_tokens)
    stats.tokens = sum(map(len, out_tokens))
    if not options.dedup:  # count here, where the tokens are already split
        result.train_counts = TokenCounts.partial(chain.from_iterable(train_tokens))
        result.heldout_counts = TokenCounts.partial(chain.from_iterable(heldout_tokens))
    return result
