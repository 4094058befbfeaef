"""``bilm prepare`` on one corpus in every input format, and with the raw-text tokenizer.

    python benchmarks/prepare_formats.py --work /tmp/prepare-formats [--tokens 2000000] [--workers 2] \\
        [--lock /tmp/bilm-cpu.lock] [--out benchmarks/results/prepare-formats-DATE.md]

The corpus is raw (untokenized) English: WikiText-2's validation and test splits
(``shared/corpora/wikitext-2``, CC BY-SA 3.0), detokenized with the Moses detokenizer (its
``@-@``-style escapes undone first) and repeated until it holds ``--tokens`` whitespace tokens; one
paragraph per line, headings and empty lines dropped. The same lines are written as plain text,
``.jsonl.gz``, ``.jsonl.zst``, Parquet (``{"text": ...}``, 10,000-row row groups) and CSV
(``id,text`` with a header row, written by Python's ``csv`` module; plain and ``.csv.gz``).

Jobs, each a separate ``bilm prepare`` process (``--workers`` the same for all), run one at a time,
each under ``flock --lock`` when given (so that other work on a shared machine does not run beside a
timed job):

- the six formats with ``--tokenizer whitespace`` (reading, decoding, splitting, shuffling: the
  format's own cost shows here);
- plain text with ``--tokenizer moses``, and with ``--tokenizer moses --split-sentences``.

For each: wall seconds, input lines per second, MB/s of uncompressed text and of the file, and the
peak memory (the summed RSS of ``bilm prepare`` and its worker processes, sampled every 50 ms).
Prints a Markdown table and writes it with the machine (``lscpu`` model and flags) to ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from machine import cpu_flags, cpu_model, machine_line  # noqa: E402

WIKITEXT = os.path.join(ROOT, "shared", "corpora", "wikitext-2")
if not os.path.isdir(WIKITEXT):
    WIKITEXT = "/work/shared/corpora/wikitext-2"
ROW_GROUP = 10_000
FILES = {"plain text": "corpus.txt", ".jsonl.gz": "corpus.jsonl.gz", ".jsonl.zst": "corpus.jsonl.zst",
         "Parquet": "corpus.parquet", "CSV": "corpus.csv", ".csv.gz": "corpus.csv.gz"}


def raw_paragraphs() -> list[str]:
    """WikiText-2 (valid + test) as raw text: escapes undone, Moses-detokenized, one paragraph a line."""
    from sacremoses import MosesDetokenizer

    detokenize = MosesDetokenizer("en")
    out = []
    for name in ("valid.txt", "test.txt"):
        with open(os.path.join(WIKITEXT, name), encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line or line.startswith("="):
                    continue
                line = line.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
                out.append(detokenize.detokenize(line.split()))
    return out


def write_corpus(work: str, tokens: int) -> dict:
    """The corpus in six formats under ``work`` (reused when already there); returns its facts."""
    facts_path = os.path.join(work, "corpus.json")
    if os.path.exists(facts_path):
        with open(facts_path) as f:
            facts = json.load(f)
        if facts["target_tokens"] == tokens and set(facts["files"]) == set(FILES):
            return facts
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    os.makedirs(work, exist_ok=True)
    paragraphs = raw_paragraphs()
    lines, n = [], 0
    while n < tokens:
        for line in paragraphs:
            lines.append(line)
            n += len(line.split())
            if n >= tokens:
                break
    text = ("\n".join(lines) + "\n").encode("utf-8")
    jsonl = "".join(json.dumps({"id": i, "text": line}, ensure_ascii=False) + "\n"
                    for i, line in enumerate(lines)).encode("utf-8")
    files = FILES
    with open(os.path.join(work, files["plain text"]), "wb") as f:
        f.write(text)
    with open(os.path.join(work, files[".jsonl.gz"]), "wb") as f:
        f.write(gzip.compress(jsonl, compresslevel=6))
    with open(os.path.join(work, files[".jsonl.zst"]), "wb") as f:
        f.write(zstandard.ZstdCompressor(level=3).compress(jsonl))
    pq.write_table(pa.table({"id": list(range(len(lines))), "text": lines}), os.path.join(work, files["Parquet"]),
                   row_group_size=ROW_GROUP)
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["id", "text"])
    writer.writerows(enumerate(lines))
    table = table.getvalue().encode("utf-8")
    with open(os.path.join(work, files["CSV"]), "wb") as f:
        f.write(table)
    with open(os.path.join(work, files[".csv.gz"]), "wb") as f:
        f.write(gzip.compress(table, compresslevel=6))
    facts = {"target_tokens": tokens, "lines": len(lines), "whitespace_tokens": n, "text_bytes": len(text),
             "files": files, "file_bytes": {k: os.path.getsize(os.path.join(work, v)) for k, v in files.items()}}
    with open(facts_path, "w") as f:
        json.dump(facts, f, indent=1)
    return facts


def run_job(argv: list[str], lock: str | None) -> tuple[float, int, str]:
    """Run one command (under ``flock lock`` when given): (wall seconds of the command itself, peak
    summed RSS of its process tree in bytes, its stdout)."""
    import psutil

    command = (["flock", lock] if lock else []) + argv
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parent = psutil.Process(process.pid)
    peak, started = 0, None
    while process.poll() is None:
        try:
            tree = [parent] + parent.children(recursive=True)
            names = [p.name() for p in tree]
            if started is None and any(n.startswith("python") or n == "bilm" for n in names):
                started = time.perf_counter()  # the lock is held: the job runs
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.name() != "flock"))
        except psutil.Error:
            pass
        time.sleep(0.05)
    stdout, stderr = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({process.returncode}): {stderr.strip()[-2000:]}")
    return time.perf_counter() - (started or time.perf_counter()), peak, stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="directory for the corpus files and the outputs")
    parser.add_argument("--tokens", type=int, default=2_000_000, help="whitespace tokens of raw text (default 2M)")
    parser.add_argument("--workers", type=int, default=2, help="bilm prepare --workers (default 2)")
    parser.add_argument("--lock", help="run each job under `flock LOCK`")
    parser.add_argument("--only", nargs="*", help="run only these jobs (names as in the table)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each job; the median time is reported "
                                                                "(default 3)")
    parser.add_argument("--out", help="write the Markdown report here")
    args = parser.parse_args()

    facts = write_corpus(args.work, args.tokens)
    bilm = os.path.join(os.path.dirname(sys.executable), "bilm")
    files = {k: os.path.join(args.work, v) for k, v in facts["files"].items()}
    jobs = [(fmt, [files[fmt]], []) for fmt in files]
    jobs += [("plain text, --tokenizer moses", [files["plain text"]], ["--tokenizer", "moses"]),
             ("plain text, --tokenizer moses --split-sentences", [files["plain text"]],
              ["--tokenizer", "moses", "--split-sentences"])]
    rows = []
    for name, inputs, flags in jobs:
        if args.only and name not in args.only:
            continue
        out = os.path.join(args.work, "out-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))
        runs = []
        for _ in range(args.repeats):
            shutil.rmtree(out, ignore_errors=True)
            runs.append(run_job([bilm, "prepare", *inputs, "--out", out, "--workers", str(args.workers),
                                 "--no-progress", "--heldout-fraction", "0.01", *flags], args.lock))
        seconds = sorted(r[0] for r in runs)[len(runs) // 2]
        peak = max(r[1] for r in runs)
        with open(os.path.join(out, "manifest.json")) as f:
            manifest = json.load(f)
        lines = sum(e["lines"] for e in manifest["inputs"])
        file_bytes = sum(os.path.getsize(p) for p in inputs)
        row = {"job": name, "seconds": seconds, "lines": lines, "lines_per_s": lines / seconds,
               "text_mb_per_s": facts["text_bytes"] / seconds / 1e6, "file_mb_per_s": file_bytes / seconds / 1e6,
               "file_mb": file_bytes / 1e6, "peak_mb": peak / 2**20, "all_seconds": sorted(r[0] for r in runs),
               "sentences": manifest["n_train_sentences"] + manifest["n_heldout_sentences"],
               "tokens": manifest["n_train_tokens"] + manifest["n_heldout_tokens"]}
        rows.append(row)
        print(f"{name}: {seconds:.2f} s (runs {', '.join(f'{t:.2f}' for t in row['all_seconds'])}), "
              f"{row['lines_per_s']:,.0f} lines/s, {row['text_mb_per_s']:.2f} MB/s of text, "
              f"peak {row['peak_mb']:,.0f} MiB", flush=True)
        shutil.rmtree(out, ignore_errors=True)

    model, flags = cpu_model(), cpu_flags()
    plain = next((r for r in rows if r["job"] == "plain text"), None)
    table = ["| input | seconds (median; all runs) | lines/s | vs plain text | MB/s (text) | MB/s (file) | file MB | sentences | "
             "tokens | peak memory |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ratio = f"{r['lines_per_s'] / plain['lines_per_s']:.0%}" if plain else "-"
        table.append(f"| {r['job']} | {r['seconds']:.2f} ({', '.join(f'{t:.2f}' for t in r['all_seconds'])}) "
                     f"| {r['lines_per_s']:,.0f} | {ratio} | {r['text_mb_per_s']:.2f} "
                     f"| {r['file_mb_per_s']:.2f} | {r['file_mb']:.1f} | {r['sentences']:,} | {r['tokens']:,} | "
                     f"{r['peak_mb']:,.0f} MiB |")
    report = "\n".join([
        f"# bilm prepare by input format ({datetime.date.today().isoformat()})", "",
        f"Machine: {machine_line()}", f"CPU (lscpu): {model}", f"Flags: {flags}", "",
        f"Command: `python benchmarks/prepare_formats.py --work DIR --tokens {args.tokens} "
        f"--workers {args.workers} --repeats {args.repeats}{' --lock LOCK' if args.lock else ''}`; each job a "
        f"`bilm prepare` process with `--workers {args.workers} --heldout-fraction 0.01`, run alone under the lock "
        f"{args.repeats} times (seconds: the median, from the process's start to its end, imports included; the "
        "peak memory: the largest of the runs).", "",
        f"Corpus: WikiText-2 valid + test, detokenized (raw text), repeated to {facts['whitespace_tokens']:,} "
        f"whitespace tokens in {facts['lines']:,} paragraph lines, {facts['text_bytes'] / 1e6:.1f} MB of text. "
        "Peak memory: the summed RSS of bilm prepare and its workers, sampled every 50 ms.", "",
        *table, ""])
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
