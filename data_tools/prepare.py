"""Raw text -> training shards, heldout shards, vocabulary and manifest for ``bilm train``.

    bilm prepare corpus/ more/*.txt.gz --out prepared/ --heldout-fraction 0.01
    bilm prepare zh.txt.xz --out zh/ --tokenizer sentencepiece --sp-vocab-size 32000 --nfkc
    bilm prepare dump/*.jsonl.zst --text-field text --tokenizer moses --split-sentences --out web/
    bilm prepare hf_dataset_dir/ data/*.parquet --text-field body --skip-bad --out mixed/
    bilm prepare reviews.csv.gz labels.tsv --text-field review --out reviews/

Inputs: plain text (one sentence or document per line), JSON lines (``--text-field``, a dotted path
for a nested field), CSV and TSV files with a header row (``--text-field`` names the column; quoted
values may hold commas, tabs and newlines), each possibly .gz, .bz2, .xz or .zst; Parquet files
(``--text-field`` names the column) and directories a Hugging Face ``save_to_disk`` wrote (their
Arrow files). CSV, TSV, Parquet and Arrow need pyarrow (the corpora extra).

Output (``--out DIR``)::

    train/shard-00000.txt ...    one sentence per line, tokens separated by one space
    heldout/shard-00000.txt ...
    vocab.txt                    <S>, </S>, <UNK>, then tokens by descending count
    vocab_counts.tsv             the same tokens with their training counts
    sentencepiece.model          with --tokenizer sentencepiece
    manifest.json                shard lists, counts, settings (bilm.data.manifest writes and reads it)

Input lines are decoded as UTF-8 (invalid bytes replaced and reported), optionally NFKC
normalized, stripped of control characters, optionally split into sentences, tokenized, cut into
pieces of at most ``--max-tokens-per-line`` tokens; empty lines are dropped. A bad record (a line
that is not JSON, a record without the text field, a CSV row with more or fewer fields than its
header, a truncated compressed file, an unreadable Parquet row group) stops the run, unless
``--skip-bad`` skips and counts it. A hash of each line decides train or heldout (the same split on
every run). Lines are shuffled across shards through temporary buckets on disk, so memory stays
bounded whatever the corpus size.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import shutil
import sys
import time
from typing import Iterator


import bilm
from bilm.core.atomic import atomic_path, fsync_path
from bilm.data.manifest import write_manifest
from bilm.core.progress import progress_bar
from bilm.core.text import TextPipeline, library_versions, valid_lang
from bilm.core.errors import BilmError
from data_tools.inputs import (InputFile, TruncatedInput, estimated_text_bytes, read_blocks, require_zstandard,
                               resolve_corpus)
from data_tools.lines import BlockTask, LineOptions, LineStats, block_text, init_worker, process_block
from data_tools.tables import (CSV_DELIMITERS, BadRecord, BadRecords, read_arrow, read_csv, read_parquet,
                               require_pyarrow)
from data_tools.parallel import Workers
from data_tools.sentencepiece_training import sample_lines, train_sentencepiece
from data_tools.shuffle import BucketTask, ShardInfo, ShardWriter, shuffle_bucket
from data_tools.vocab_builder import (UNTOKENIZED_SHARE, TokenCounts, attached_punctuation, build_vocab,
                                      long_tokens, oov_rate, write_counts, write_vocab)

SUMMARY = "raw text -> shards, vocab.txt and manifest.json for training"
SP_MODEL_NAME = "sentencepiece.model"
# Scratch space while a run works; it stays until the manifest is written, so a directory holding it
# and no manifest.json is the leftover of a killed run, which the next run replaces without --force.
TMP_NAME = ".prepare-tmp"
# Everything a run writes: what --force may delete, and nothing else. The manifest first: removed,
# the rest no longer looks like a prepared corpus.
OUTPUT_NAMES = ("manifest.json", "train", "heldout", "vocab.txt", "vocab_counts.tsv",
                SP_MODEL_NAME, "sentencepiece.vocab", TMP_NAME)
MAX_BUCKETS = 256


class PrepareError(BilmError):
    """A user error: bad arguments, inputs or output directory."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="files, directories or globs: plain text (one sentence or document per line), "
                             "JSON lines (.jsonl, .json), CSV (.csv) and TSV (.tsv) with a header row, each maybe "
                             ".gz, .bz2, .xz or .zst; Parquet files; Hugging Face save_to_disk directories")
    parser.add_argument("-o", "--out", "--output", dest="output", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--force", action="store_true",
                        help="replace the outputs of a previous run in DIR (other files are kept)")
    records = parser.add_argument_group("JSON lines, CSV, TSV, Parquet and Arrow inputs")
    records.add_argument("--text-field", default="text", metavar="NAME",
                         help="the field (JSON) or column (CSV, TSV, Parquet, Arrow) holding the text; a dotted path "
                              "for a nested one, e.g. meta.body, except in CSV and TSV (default: text)")
    records.add_argument("--skip-bad", action="store_true",
                         help="skip bad records (a line that is not JSON, a record without the text field or with "
                              "a non-string value, a CSV row whose field count is not the header's, an unreadable "
                              "Parquet file or row group, a truncated compressed file) and count them per file in "
                              "the manifest; default: stop at the first, naming its file and line (or row group), "
                              "and write nothing")
    text = parser.add_argument_group("text")
    text.add_argument("--nfkc", action="store_true", help="Unicode NFKC normalization")
    text.add_argument("--max-tokens-per-line", type=int, default=400, metavar="N",
                      help="cut longer lines into pieces of N tokens (0: no limit; default 400)")
    text.add_argument("--dedup", action="store_true", help="remove exact duplicate lines (after tokenization)")
    text.add_argument("--tokenizer", choices=("whitespace", "sentencepiece", "moses"), default="whitespace",
                      help="whitespace: the input is already tokenized (default); sentencepiece: "
                           "tokens are the pieces of a SentencePiece model; moses: raw text, tokenized by the "
                           "Moses rules the original ELMo's data was (sacremoses, no escaping; the text extra)")
    text.add_argument("--lang", default="en", metavar="CODE",
                      help="language of the text for --tokenizer moses and --split-sentences (default en)")
    text.add_argument("--split-sentences", action="store_true",
                      help="split each line (a paragraph, a document) into sentences before tokenizing "
                           "(sentencex; the text extra); evaluate and score split raw text the same way")
    sp = parser.add_argument_group("sentencepiece")
    sp.add_argument("--sp-model", metavar="PATH", help="use this trained .model instead of training one")
    sp.add_argument("--sp-vocab-size", type=int, default=32000, metavar="N",
                    help="pieces in the trained model (default 32000); at least the distinct characters kept")
    sp.add_argument("--sp-model-type", choices=("unigram", "bpe", "char", "word"), default="unigram",
                    help="SentencePiece algorithm (default unigram)")
    sp.add_argument("--sp-sample-lines", type=int, default=1_000_000, metavar="N",
                    help="train on a random sample of N lines (default 1,000,000)")
    sp.add_argument("--sp-character-coverage", type=float, default=0.9995, metavar="F",
                    help="share of characters the model covers; rarer ones become <unk> pieces (default 0.9995; "
                         "use 1.0 for small alphabets)")
    split = parser.add_argument_group("split and shards")
    split.add_argument("--heldout-fraction", type=float, default=0.01, metavar="F",
                       help="share of lines held out, chosen by a hash of the line (default 0.01)")
    shards = split.add_mutually_exclusive_group()
    shards.add_argument("--shard-lines", type=int, metavar="N", help="lines per shard (default 100,000)")
    shards.add_argument("--num-shards", type=int, metavar="N", help="number of train shards")
    split.add_argument("--seed", type=int, default=0, help="seed of the shuffle (default 0)")
    vocab = parser.add_argument_group("vocabulary")
    vocab.add_argument("--min-count", type=int, default=1, metavar="N", help="drop rarer tokens (default 1)")
    vocab.add_argument("--max-vocab", type=int, metavar="N",
                       help="keep the N-3 most frequent tokens (N includes <S>, </S>, <UNK>)")
    vocab.add_argument("--max-characters-per-token", type=int, default=50, metavar="N",
                       help="the model's setting; longer tokens are reported (default 50)")
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8), metavar="N",
                           help="processes for decoding, tokenizing and counting (default: cores, at most 8)")
    run_group.add_argument("--bucket-mb", type=int, default=32, metavar="MB",
                           help="size of the temporary shuffle buckets; each worker holds one (default 32)")
    run_group.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bilm prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = argv
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Run ``bilm prepare``; returns the exit status (2 with a message on stderr for user errors)."""
    try:
        prepare(args)
    except (BilmError, FileNotFoundError) as e:  # PrepareError and bilm's errors: one line
        print(f"bilm prepare: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only --out, a full disk: the file and the reason, no traceback
        print(f"bilm prepare: error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    return 0


def _check_arguments(args: argparse.Namespace) -> None:
    if not 0.0 <= args.heldout_fraction < 1.0:
        raise PrepareError(f"--heldout-fraction must be in [0, 1), got {args.heldout_fraction}")
    for name in ("shard_lines", "num_shards", "max_vocab", "sp_vocab_size", "sp_sample_lines", "workers",
                 "bucket_mb", "min_count"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise PrepareError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.max_characters_per_token < 3:
        raise PrepareError(f"--max-characters-per-token must be >= 3, got {args.max_characters_per_token}")
    if args.sp_model and args.tokenizer != "sentencepiece":
        raise PrepareError("--sp-model needs --tokenizer sentencepiece")
    if args.sp_model and not os.path.isfile(args.sp_model):
        raise PrepareError(f"--sp-model {args.sp_model!r}: no such file")
    if not args.text_field or any(not part for part in args.text_field.split(".")):
        raise PrepareError(f"--text-field {args.text_field!r}: give a field name, or a dotted path such as meta.body")
    if not valid_lang(args.lang):
        raise PrepareError(f"--lang {args.lang!r}: give a language code such as en, de, zh")


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def _prepare_output_dir(out: str, force: bool, protected: list[str]) -> list[str]:
    """Create ``out``, or clear a previous run's outputs with --force; returns removed names."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise PrepareError(f"output {out!r} exists and is not a directory")
    existing = os.listdir(out) if os.path.isdir(out) else []
    interrupted = TMP_NAME in existing and "manifest.json" not in existing
    if interrupted:
        print(f"note: replacing what an interrupted bilm prepare left in {out}", file=sys.stderr)
    if existing and not force and not interrupted:
        raise PrepareError(f"output directory {out!r} is not empty; pass --force to replace the "
                           "outputs of a previous run (other files are left alone)")
    ours = [name for name in OUTPUT_NAMES if name in existing]
    for name in ours:
        for path in protected:
            if _inside(path, os.path.join(out, name)):
                raise PrepareError(f"--force would delete the input {path!r}; move it out of {out!r}")
    for name in ours:
        _remove(os.path.join(out, name))
    os.makedirs(out, exist_ok=True)
    return ours


def _remove(path: str, ignore_errors: bool = False) -> None:
    """Delete a file or a directory tree, if it exists."""
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=ignore_errors)
    elif os.path.lexists(path):
        try:
            os.remove(path)
        except OSError:
            if not ignore_errors:
                raise


def prepare(args: argparse.Namespace) -> dict:
    """Do the work; returns the manifest. Raises PrepareError and friends on user errors."""
    started = time.perf_counter()
    _check_arguments(args)
    out = args.output
    items = resolve_corpus(args.inputs)
    skipped = [i.path for i in items if os.path.isdir(out) and _inside(i.path, out)]
    items = [i for i in items if i.path not in skipped]
    inputs = [i.path for i in items]
    if not inputs:
        raise PrepareError(f"no input files outside the output directory {out!r}")
    _check_libraries(args, items)  # a missing extra: one line, before anything is written
    if all(os.path.getsize(p) == 0 for p in inputs):  # before anything is written
        raise PrepareError(f"the input is empty: {', '.join(inputs[:3])}{' ...' if len(inputs) > 3 else ''}")
    out_existed = os.path.isdir(out)
    removed = _prepare_output_dir(out, args.force, inputs + ([args.sp_model] if args.sp_model else []))
    try:
        return _prepare_into(args, out, items, removed, skipped, started)
    except BaseException:
        # Leave no half-made outputs behind: a rerun must not need --force.
        for name in OUTPUT_NAMES:
            _remove(os.path.join(out, name), ignore_errors=True)
        if not out_existed and os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)
        raise


def _check_libraries(args: argparse.Namespace, items: list[InputFile]) -> None:
    if any(i.format in ("parquet", "arrow", *CSV_DELIMITERS) for i in items):
        require_pyarrow()
    if any(i.compression == ".zst" for i in items):
        require_zstandard()
    if args.tokenizer == "moses" or args.split_sentences:
        _pipeline_without_model(_line_options(args, None, 1, 0)).check_libraries()
    if args.tokenizer == "moses":
        from bilm.core.text import moses_languages

        if args.lang not in moses_languages():
            print(f"note: Moses has no non-breaking prefixes for --lang {args.lang}; it uses the English ones",
                  file=sys.stderr)


def _pipeline_without_model(options: LineOptions) -> TextPipeline:
    """The options' pipeline with a SentencePiece tokenizer taken for whitespace: before the model is
    there, what checks the libraries and splits the model's training sample into sentences."""
    if options.tokenizer == "sentencepiece":
        options = dataclasses.replace(options, tokenizer="whitespace", sp_model=None)
    return options.pipeline()


def _line_options(args: argparse.Namespace, sp_model: str | None, n_train_buckets: int,
                  n_heldout_buckets: int) -> LineOptions:
    uses_lang = args.tokenizer == "moses" or args.split_sentences
    return LineOptions(nfkc=args.nfkc, tokenizer=args.tokenizer, sp_model=sp_model,
                       max_tokens_per_line=args.max_tokens_per_line,
                       heldout_fraction=args.heldout_fraction, seed=args.seed, dedup=args.dedup,
                       n_train_buckets=n_train_buckets, n_heldout_buckets=n_heldout_buckets,
                       lang=args.lang if uses_lang else None,
                       split_sentences="sentencex" if args.split_sentences else None,
                       text_field=tuple(args.text_field.split(".")))


def _prepare_into(args: argparse.Namespace, out: str, items: list[InputFile], removed: list[str],
                  skipped: list[str], started: float) -> dict:
    tmp = os.path.join(out, TMP_NAME)
    os.makedirs(tmp)
    quiet = args.no_progress  # else bars: in place on a terminal, a line a minute into a log (bilm.core.progress)
    inputs = [i.path for i in items]
    total_bytes = sum(os.path.getsize(p) for p in inputs)
    try:
        tokenizer = _set_up_tokenizer(args, items, out, total_bytes, quiet)
        bucket_bytes = args.bucket_mb << 20
        n_train_buckets, n_heldout_buckets = _count_buckets(items, args.heldout_fraction, bucket_bytes)
        options = _line_options(args, tokenizer.get("model_file"), n_train_buckets, n_heldout_buckets)
        with Workers(args.workers, init_worker, (options,)) as workers:
            file_stats, counts, heldout_counts = _split_into_buckets(
                workers, items, options, args.skip_bad, tmp, total_bytes, quiet)
            train_lines = sum(s.train_lines for s in file_stats)
            lines_per_shard = args.shard_lines or (
                -(-train_lines // args.num_shards) if args.num_shards else 100_000)
            train_writer = ShardWriter(out, "train", num_shards=args.num_shards) if args.num_shards \
                else ShardWriter(out, "train", lines_per_shard=lines_per_shard)
            heldout_writer = ShardWriter(out, "heldout", lines_per_shard=max(1, lines_per_shard))
            duplicates = _shuffle_into_shards(workers, tmp, options, bucket_bytes, train_writer,
                                              heldout_writer, counts, heldout_counts, quiet)
        train_shards, heldout_shards = train_writer.close(), heldout_writer.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, exist_ok=True)  # empty, but kept until the manifest is written (see TMP_NAME)

    n_train_tokens = sum(s.tokens for s in train_shards)
    n_train_sentences = sum(s.sentences for s in train_shards)
    if n_train_sentences == 0:
        raise PrepareError("no training sentences left (all input lines empty, or all held out)")
    counts, heldout_counts = counts.as_dict(), heldout_counts.as_dict()
    vocab = build_vocab(counts, n_train_sentences, args.min_count, args.max_vocab)
    for name, write in (("vocab.txt", write_vocab), ("vocab_counts.tsv", write_counts)):
        with atomic_path(os.path.join(out, name)) as partial:
            write(partial, vocab.entries)
    vocab_tokens = {token for token, _ in vocab.entries}
    max_bytes = args.max_characters_per_token - 2
    long_types, long_occurrences, long_examples = long_tokens(counts, max_bytes)
    attached = attached_punctuation(counts) if tokenizer["type"] == "whitespace" else None
    seconds = time.perf_counter() - started
    total = LineStats()
    for stats in file_stats:
        total.add(stats)

    # Written last, and whole or not at all: a manifest means everything it names is there (on disk).
    for split in ("train", "heldout"):
        fsync_path(os.path.join(out, split))
    manifest = write_manifest(os.path.join(out, "manifest.json"), {
        "bilm_version": bilm.__version__,
        "command": _command_line(getattr(args, "argv", None)),
        "arguments": {k: v for k, v in vars(args).items() if not callable(v) and k != "argv"},
        "train": _split_section(train_shards),
        "heldout": _split_section(heldout_shards),
        "n_train_tokens": n_train_tokens,
        "n_train_sentences": n_train_sentences,
        "n_heldout_tokens": sum(s.tokens for s in heldout_shards),
        "n_heldout_sentences": sum(s.sentences for s in heldout_shards),
        "vocab": "vocab.txt",
        "vocab_counts": "vocab_counts.tsv",
        "vocab_size": vocab.size,
        "distinct_train_tokens": vocab.distinct_tokens,
        "train_oov_rate": vocab.train_oov_tokens / n_train_tokens,
        "heldout_oov_rate": oov_rate(heldout_counts, vocab_tokens),
        "tokenizer": {k: v for k, v in tokenizer.items() if k != "model_file"},
        "sentence_splitter": _splitter_entry(options),
        "normalization": {"nfkc": args.nfkc, "control_characters": "removed",
                          "max_tokens_per_line": args.max_tokens_per_line, "dedup": args.dedup},
        "text_field": args.text_field if any(i.format != "text" for i in items) else None,
        "skip_bad": args.skip_bad,
        "bad_records": total.bad_records,
        "heldout_fraction": args.heldout_fraction,
        "seed": args.seed,
        "min_count": args.min_count,
        "max_vocab": args.max_vocab,
        "max_characters_per_token": args.max_characters_per_token,
        "long_tokens": {"max_bytes": max_bytes, "types": long_types, "occurrences": long_occurrences,
                        "examples": long_examples},
        "attached_punctuation": ({"share": round(attached[0], 6), "examples": attached[1]}
                                 if attached is not None else None),
        "duplicates_removed": duplicates,
        "inputs": [{"path": os.path.abspath(i.path), "format": i.kind, **vars(s)} for i, s in zip(items, file_stats)],
        "seconds": round(seconds, 3),
    })
    os.rmdir(tmp)
    _print_summary(manifest, total, removed, skipped, vocab.eligible_tokens, out)
    return manifest


def _command_line(argv: list[str] | None = None) -> str:
    if argv is not None:  # called in-process (tests, scripts): sys.argv is someone else's
        return "bilm prepare " + shlex.join(argv)
    program = os.path.basename(sys.argv[0]) or "bilm"
    if program == "__main__.py":
        program = "python -m data_tools"
    return " ".join([program, shlex.join(sys.argv[1:])])


def _splitter_entry(options: LineOptions) -> dict | None:
    """The manifest's ``sentence_splitter``: what split lines into sentences (None: nothing did)."""
    if not options.split_sentences:
        return None
    return {"type": options.split_sentences, "lang": options.lang,
            "library_versions": library_versions("whitespace", options.split_sentences)}


def _count_buckets(items: list[InputFile], heldout_fraction: float, bucket_bytes: int) -> tuple[int, int]:
    """Train and heldout shuffle buckets of about ``bucket_bytes`` each (an oversized one is
    cut again in pass 2; the count is capped to keep the number of open files modest)."""
    estimated = sum(estimated_text_bytes(i) for i in items)
    n_train = min(MAX_BUCKETS, max(1, -(-estimated // bucket_bytes)))
    if heldout_fraction == 0:
        return n_train, 0
    return n_train, min(MAX_BUCKETS, max(1, -(-int(estimated * heldout_fraction * 2) // bucket_bytes)))


def _split_section(shards: list[ShardInfo]) -> dict:
    return {"shards": [s.path for s in shards],
            "shard_sentences": [s.sentences for s in shards],
            "shard_tokens": [s.tokens for s in shards],
            "n_sentences": sum(s.sentences for s in shards),
            "n_tokens": sum(s.tokens for s in shards)}


def _set_up_tokenizer(args: argparse.Namespace, items: list[InputFile], out: str, total_bytes: int,
                      quiet: bool | None) -> dict:
    """Manifest entry of the tokenizer; ``model_file`` (absolute) is what the workers load."""
    if args.tokenizer == "whitespace":
        return {"type": "whitespace"}
    if args.tokenizer == "moses":
        return {"type": "moses", "lang": args.lang, "library": "sacremoses", "escape": False,
                "aggressive_dash_splits": False, "library_versions": library_versions("moses", None)}
    model = os.path.join(out, SP_MODEL_NAME)
    if args.sp_model:
        shutil.copyfile(args.sp_model, model)
        return {"type": "sentencepiece", "model": SP_MODEL_NAME, "model_file": os.path.abspath(model),
                "trained": False, "source": os.path.abspath(args.sp_model)}
    with progress_bar(total=total_bytes, unit="B", unit_scale=True, desc="sample for SentencePiece",
              disable=quiet) as bar:
        options = _line_options(args, None, 1, 0)
        scratch = [LineStats() for _ in items]  # the sample pass's counts; pass 1 counts for the manifest
        texts = ((block_text(task, options, scratch[task.file_index]), read)
                 for task, read in _read_tasks(items, options, args.skip_bad, scratch))
        sample, seen = sample_lines(texts, args.sp_sample_lines, args.seed, args.nfkc, bar.update,
                                    _pipeline_without_model(options).split_cleaned if options.split_sentences else None)
    print(f"training SentencePiece ({args.sp_model_type}, vocab {args.sp_vocab_size}) on "
          f"{len(sample):,} of {seen:,} lines", file=sys.stderr)
    train_sentencepiece(sample, os.path.join(out, "sentencepiece"), args.sp_vocab_size, args.sp_model_type,
                        args.sp_character_coverage, args.workers)
    import sentencepiece

    pieces = sentencepiece.SentencePieceProcessor(model_file=model).get_piece_size()
    return {"type": "sentencepiece", "model": SP_MODEL_NAME, "model_file": os.path.abspath(model),
            "trained": True, "model_type": args.sp_model_type, "vocab_size": args.sp_vocab_size,
            "pieces": pieces, "sample_lines": len(sample), "character_coverage": args.sp_character_coverage}


def _read_tasks(items: list[InputFile], options: LineOptions, skip_bad: bool,
                stats: list[LineStats]) -> Iterator[tuple[BlockTask, int]]:
    """The blocks of every input, for the workers, with the bytes of the file read for each (the
    progress bar). What the main process finds bad (a truncated stream, a bad table row) stops the
    run, or with ``skip_bad`` is counted in ``stats``."""
    text_field = ".".join(options.text_field)
    for file_index, item in enumerate(items):
        first_line = 0
        if item.format in ("parquet", "arrow", *CSV_DELIMITERS):
            bad = BadRecords()
            read = {"parquet": read_parquet, "arrow": read_arrow}.get(item.format, read_csv)
            try:
                for block_index, block in enumerate(read(item, text_field, skip_bad, bad)):
                    stats[file_index].records += block.rows
                    yield BlockTask(file_index, block_index, first_line, block.data), block.progress
                    first_line += block.data.count(b"\n")
            except BadRecord as e:
                raise PrepareError(str(e)) from None
            if bad.counts:
                bad_stats = LineStats(bad_records=sum(bad.counts.values()), bad=dict(bad.counts), first_bad=bad.first)
                stats[file_index].add(bad_stats)
            continue
        try:
            for block_index, (data, read) in enumerate(read_blocks(item)):
                yield BlockTask(file_index, block_index, first_line, data, json=item.format == "jsonl"), read
                first_line += data.count(b"\n")
        except TruncatedInput as e:
            if not skip_bad:
                raise PrepareError(f"{e}; pass --skip-bad to keep the lines before it (the file is counted "
                                   "as bad in the manifest)") from None
            stats[file_index].add(LineStats(bad_records=1, bad={e.reason: 1}, first_bad=str(e)))


def _split_into_buckets(workers: Workers, items: list[InputFile], options: LineOptions, skip_bad: bool,
                        tmp: str, total_bytes: int,
                        quiet: bool | None) -> tuple[list[LineStats], TokenCounts, TokenCounts]:
    """Pass 1: clean, tokenize, split, and append every line to its bucket file.

    Returns per-file statistics and the train and heldout token counts (empty with dedup).
    """
    n_buckets = options.n_train_buckets + options.n_heldout_buckets
    buckets = [open(os.path.join(tmp, f"bucket-{b:05d}.txt"), "wb") for b in range(n_buckets)]
    stats = [LineStats() for _ in items]
    counts, heldout_counts = TokenCounts(), TokenCounts()
    with progress_bar(total=total_bytes, unit="B", unit_scale=True, desc="tokenize", disable=quiet) as bar:
        def tasks() -> Iterator[BlockTask]:
            for task, read in _read_tasks(items, options, skip_bad, stats):
                bar.update(read)
                yield task

        for result in workers.map(process_block, tasks()):
            path = items[result.file_index].path
            if result.stats.first_bad is not None:  # a JSON record: "LINE: why"
                result.stats.first_bad = f"{path}:{result.stats.first_bad}"
                if not skip_bad:
                    raise PrepareError(f"{result.stats.first_bad}; pass --skip-bad to skip such records (they are "
                                       "counted in the manifest)")
            stats[result.file_index].add(result.stats)
            if result.train_counts is not None:
                counts.add(result.train_counts)
                heldout_counts.add(result.heldout_counts)
            for bucket, data in result.buckets.items():
                buckets[bucket].write(data)
    for f in buckets:
        f.close()
    return stats, counts, heldout_counts


def _shuffle_into_shards(workers: Workers, tmp: str, options: LineOptions, bucket_bytes: int,
                         train: ShardWriter, heldout: ShardWriter, counts: TokenCounts,
                         heldout_counts: TokenCounts,
                         quiet: bool | None) -> int:
    """Pass 2: shuffle (with --dedup: deduplicate and count) each bucket in a worker, then deal
    the buckets into shards. Returns the number of duplicates removed."""
    n_buckets = options.n_train_buckets + options.n_heldout_buckets
    tasks = [BucketTask(b, os.path.join(tmp, f"bucket-{b:05d}.txt"), options.seed, options.dedup,
                        options.dedup, 2 * bucket_bytes) for b in range(n_buckets)]
    duplicates = 0
    for result in progress_bar(workers.map(shuffle_bucket, tasks), total=n_buckets, desc="shuffle", disable=quiet):
        is_train = result.index < options.n_train_buckets
        if result.counts is not None:
            (counts if is_train else heldout_counts).add(result.counts)
        duplicates += result.duplicates
        writer = train if is_train else heldout
        with open(result.path, "rb") as f:
            while lines := f.readlines(8 << 20):
                writer.write(lines)
        os.remove(result.path)
    return duplicates


def _print_summary(manifest: dict, total: LineStats, removed: list[str], skipped: list[str],
                   eligible_tokens: int, out: str) -> None:
    m = manifest
    lines = []
    if removed:
        lines.append(f"replaced the previous outputs in {out}: {', '.join(removed)}")
    if skipped:
        lines.append(f"skipped {len(skipped)} input files inside the output directory")
    lines.append(f"inputs: {len(m['inputs'])} files, {total.lines:,} lines -> "
                 f"{m['n_train_sentences']:,} train + {m['n_heldout_sentences']:,} heldout sentences")
    lines.append(f"train: {m['n_train_tokens']:,} tokens in {len(m['train']['shards'])} shards; "
                 f"OOV rate {m['train_oov_rate']:.2%}")
    heldout_oov = m["heldout_oov_rate"]
    lines.append(f"heldout: {m['n_heldout_tokens']:,} tokens in {len(m['heldout']['shards'])} shards"
                 + (f"; OOV rate {heldout_oov:.2%}" if heldout_oov is not None else ""))
    lines.append(f"vocab: {m['vocab_size']:,} entries (with <S>, </S>, <UNK>) of "
                 f"{m['distinct_train_tokens']:,} distinct training tokens, min count {m['min_count']}")
    lines.append(f"dropped: {total.empty:,} empty lines, {m['duplicates_removed']:,} duplicates; "
                 f"{total.extra_from_long:,} extra lines from cutting long ones; "
                 f"{total.control_removed:,} control characters removed")
    if m.get("sentence_splitter"):
        lines.append(f"sentences: {total.extra_from_sentences:,} extra lines from splitting lines into sentences "
                     f"({m['sentence_splitter']['type']}, {m['sentence_splitter']['lang']})")
    for entry in m["inputs"]:
        if entry["bad_records"]:
            reasons = ", ".join(f"{n:,} {reason.replace('_', ' ')}" for reason, n in sorted(entry["bad"].items()))
            lines.append(f"skipped bad records: {entry['path']}: {reasons} (first: {entry['first_bad']})")
    for entry in m["inputs"]:
        if entry["invalid_utf8"]:
            lines.append(f"invalid UTF-8: {entry['path']}: {entry['invalid_utf8']:,} byte sequences replaced "
                         f"by U+FFFD (first on line {entry['first_invalid_line']})")
    long = m["long_tokens"]
    if long["types"]:
        lines.append(f"warning: {long['types']:,} token types ({long['occurrences']:,} occurrences) are longer "
                     f"than {long['max_bytes']} bytes (max_characters_per_token - 2) and lose their ends in "
                     f"the char ids, e.g. {', '.join(repr(t[:60]) for t in long['examples'][:3])}")
    attached = m["attached_punctuation"]
    if attached and attached["share"] > UNTOKENIZED_SHARE:
        lines.append(f"warning: {attached['share']:.1%} of the training tokens end in punctuation attached to a word "
                     f"(e.g. {', '.join(repr(t) for t in attached['examples'][:3])}): the text looks untokenized, "
                     f"and the whitespace tokenizer keeps 'word,' apart from 'word'; --tokenizer moses (or "
                     f"sentencepiece) splits them")
    if m["max_vocab"] is not None and eligible_tokens + 3 < m["max_vocab"]:
        lines.append(f"note: --max-vocab {m['max_vocab']:,} is more than the data has: "
                     f"{eligible_tokens:,} tokens with count >= {m['min_count']} (+3 specials)")
    if m["vocab_size"] > m["n_train_tokens"]:
        lines.append(f"warning: the vocabulary ({m['vocab_size']:,} entries) is larger than the training "
                     f"data ({m['n_train_tokens']:,} tokens)")
    seconds = m["seconds"]
    tokens = m["n_train_tokens"] + m["n_heldout_tokens"]
    lines.append(f"wrote {os.path.join(out, 'manifest.json')} in {seconds:.1f}s "
                 f"({tokens / max(seconds, 1e-9):,.0f} tokens/s)")
    print("\n".join(lines))
