"""bilm vs the original bilm-tf, side by side: same data, same configuration, N batches each, heldout perplexity.

    python benchmarks/parity_bilmtf.py --tf-python /tmp/tf-venv/bin/python --peer-src /tmp/bilm-tf \\
        [--batches 400] [--seeds 0 1] [--work /tmp/bilm-parity]

Neither TensorFlow nor bilm-tf is a dependency of bilm: give a Python that has tensorflow-cpu 2.15
(+ numpy<2, h5py) and an unmodified bilm-tf tree (../shared/peers/README.md says how to make both).
bilm-tf runs through ../shared/peers/harness/bilmtf_train.py (its own train() and test(), unmodified).

What runs, each stage reused when its output is already in --work:
1. ``bilm prepare`` of the training text and, separately, of the heldout text (the default is
   WikiText-2: valid.txt to train on, test.txt held out); both tools read these shards and vocab.
2. Per seed, bilm-tf: train() for N batches, then its own test() (batch 256, unroll 1; it stops at
   the first row that runs out of data, so it skips the tail). Its checkpoint is then imported with
   ``bilm import-bilm-tf`` and scored with ``bilm evaluate`` too: one evaluator for both models.
3. Per seed, bilm: ``bilm train`` with the same configuration for N steps, then ``bilm evaluate``.
4. One table: heldout perplexity (each tool's evaluator, and bilm's evaluator for both), forward and
   backward, and training tokens/s (forward tokens, after --warmup batches; both directions train).

Run one timed job at a time: on 2 cores, two trainings at once slow each other down many times over.
The figures in the README came from this script (the machine is printed with them).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from machine import machine_line  # noqa: E402  (benchmarks/machine.py)

# The configuration of the comparison, in bilm-tf's options and in bilm's --set keys.
FILTERS = [[1, 32], [2, 32], [3, 64], [4, 128], [5, 256], [6, 512], [7, 1024]]


def bilmtf_options(a) -> dict:
    return {"lstm": {"dim": a.lstm_dim, "projection_dim": a.projection_dim}, "batch_size": a.batch_size,
            "unroll_steps": a.unroll, "n_negative_samples_batch": a.negatives, "dropout": a.dropout,
            "all_clip_norm_val": 10.0, "char_cnn": {"filters": FILTERS, "n_highway": 2, "embedding": {"dim": 16}}}


def bilm_overrides(a, seed: int) -> list[str]:
    return [f"model.lstm.dim={a.lstm_dim}", f"model.lstm.projection_dim={a.projection_dim}", "model.lstm.n_layers=2",
            "model.lstm.cell_clip=3", "model.lstm.proj_clip=3", "model.lstm.use_skip_connections=true",
            f"model.char_cnn.filters={json.dumps(FILTERS)}", "model.char_cnn.n_highway=2",
            "model.char_cnn.embedding.dim=16", "model.char_cnn.activation=relu",
            f"train.batch_size={a.batch_size}", f"train.unroll_steps={a.unroll}", f"train.max_steps={a.batches}",
            f"train.n_negative_samples_batch={a.negatives}", f"train.dropout={a.dropout}", f"train.seed={seed}",
            "train.log_every_steps=10", f"train.checkpoint_every_steps={a.batches}", "train.device=cpu",
            "optim.name=adagrad", "optim.lr=0.2", "optim.initial_accumulator_value=1.0", "optim.max_grad_norm=10.0",
            *a.bilm_set]


def sh(cmd: list[str], log: str, env: dict | None = None, ok: tuple[int, ...] = (0,)) -> str:
    print("  $ " + " ".join(cmd), flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    text = open(log).read()
    if proc.returncode not in ok:
        raise SystemExit(f"failed ({proc.returncode}); last lines of {log}:\n" + "\n".join(text.splitlines()[-15:]))
    return text


def bilm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "bilm.cli", *args]


def prepare(a) -> tuple[str, str, str]:
    data = os.path.join(a.work, "data")
    for name, text in (("train", a.train_text), ("heldout", a.heldout_text)):
        out = os.path.join(data, name)
        if not os.path.exists(os.path.join(out, "manifest.json")):
            sh(bilm_cmd("prepare", text, "--out", out, "--heldout-fraction", "0", "--no-progress"),
               os.path.join(data, f"prepare-{name}.log"))
    return (os.path.join(data, "train", "manifest.json"), os.path.join(data, "heldout", "train", "shard-*"),
            os.path.join(data, "train", "vocab.txt"))


def evaluate(run: str, heldout: str, log: str) -> dict:
    out = sh(bilm_cmd("evaluate", "--checkpoint", run, "--data", heldout, "--pretokenized", "--device", "cpu",
                      "--json"), log)
    result = json.loads(out[out.index("{"):])
    return {"ppl": result["average_perplexity"], "forward": result["forward"]["perplexity"],
            "backward": result["backward"]["perplexity"], "tokens": result["forward"]["tokens"]}


def run_bilmtf(a, seed: int, manifest: str, heldout: str, vocab: str) -> dict:
    out = os.path.join(a.work, f"bilmtf-seed{seed}")
    result_file = out + ".json"
    if os.path.exists(result_file):
        return json.load(open(result_file))
    train_glob = os.path.join(os.path.dirname(manifest), "train", "shard-*")
    log = out + ".log"
    if not (os.path.exists(log) and "bilm-tf train:" in open(log).read()):  # else: trained already
        if os.path.exists(out):
            subprocess.run(["rm", "-rf", out], check=True)
        sh([a.tf_python, os.path.join(a.harness, "bilmtf_train.py"), "--peer-src", a.peer_src,
            "--train-prefix", train_glob, "--heldout-prefix", heldout, "--vocab", vocab, "--out", out,
            "--batches", str(a.batches), "--warmup", str(a.warmup), "--seed", str(seed), "--skip-fixture",
            "--options-json", json.dumps(bilmtf_options(a))], log)
    line = [ln for ln in open(log).read().splitlines() if ln.startswith("bilm-tf train:")][-1]
    rate = float(re.search(r"bilm-tf train: ([\d.]+) tokens/s", line).group(1))
    own = float(re.search(r"heldout perplexity ([\d.]+)", line).group(1))
    imported = os.path.join(a.work, f"bilmtf-seed{seed}-imported")
    sh(bilm_cmd("import-bilm-tf", "--tf-save-dir", os.path.join(out, "ckpt"), "--vocab", vocab, "--out", imported,
                "--force"), imported + ".log")
    result = {"tokens_per_s": rate, "own_ppl": own, "bilm_eval": evaluate(imported, heldout, imported + "-eval.log")}
    json.dump(result, open(result_file, "w"), indent=1)
    return result


def run_bilm(a, seed: int, manifest: str, heldout: str, extra_args: tuple[str, ...] = (),
             ok: tuple[int, ...] = (0,)) -> dict:
    """One bilm training run and its evaluation; ``extra_args`` go to ``bilm train``, whose exit code
    may be any of ``ok``."""
    out = os.path.join(a.work, f"bilm{'-' + a.tag if a.tag else ''}-seed{seed}")
    result_file = out + ".json"
    if os.path.exists(result_file):
        return json.load(open(result_file))
    if os.path.exists(out):
        subprocess.run(["rm", "-rf", out], check=True)
    cmd = bilm_cmd("train", "--config", os.path.join(ROOT, "configs", "elmo_small.yaml"), "--data", manifest,
                   "--out", out, "--no-progress", *extra_args)
    for override in bilm_overrides(a, seed):
        cmd += ["--set", override]
    start = time.perf_counter()
    sh(cmd, out + ".log", ok=ok)
    wall = time.perf_counter() - start
    # tokens/s after the warm-up, as the bilm-tf harness counts: each logged window's tokens over its time.
    import yaml

    t = yaml.safe_load(open(os.path.join(out, "config.yaml")))["train"]
    windows = [w for w in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "tokens_per_second" in w]
    timed = [w for w in windows if w["step"] > a.warmup]
    tokens_per_window = t["batch_size"] * t["unroll_steps"] * t["log_every_steps"]
    seconds = sum(tokens_per_window / w["tokens_per_second"] for w in timed)
    result = {"tokens_per_s": tokens_per_window * len(timed) / seconds, "wall_s": wall,
              "bilm_eval": evaluate(out, heldout, out + "-eval.log")}
    json.dump(result, open(result_file, "w"), indent=1)
    return result


def spread(values: list[float]) -> str:
    """Median (robust to the odd diverged run) and every seed's value."""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"median {statistics.median(values):.1f} (seeds: {', '.join(f'{v:.1f}' for v in values)})"


def unigram_perplexity(manifest: str, heldout: str) -> float:
    """Add-one unigram perplexity of the heldout targets (words and </S>) under the training counts:
    the line a model must beat; a run above it has diverged."""
    import glob
    import math

    base = os.path.dirname(manifest)
    counts = {}
    with open(os.path.join(base, "vocab_counts.tsv"), encoding="utf-8") as f:
        for line in f:
            token, _, count = line.rstrip("\n").partition("\t")
            counts[token] = int(count or 0)
    n_sentences = json.load(open(manifest))["n_train_sentences"]
    counts["</S>"] = n_sentences
    total, size = sum(counts.values()), len(counts)
    nll, n = 0.0, 0
    for path in sorted(glob.glob(heldout)):
        with open(path, encoding="utf-8") as f:
            for line in f:
                for token in line.split() + ["</S>"]:
                    nll -= math.log((counts.get(token, counts.get("<UNK>", 0)) + 1) / (total + size))
                    n += 1
    return math.exp(nll / n)


def add_run_arguments(p: argparse.ArgumentParser, work: str, seeds: list[int]) -> None:
    """The data and the run's shape (issue 10's run by default); benchmarks/divergence.py shares them."""
    p.add_argument("--train-text", default=os.path.join(SHARED, "corpora", "wikitext-2", "valid.txt"))
    p.add_argument("--heldout-text", default=os.path.join(SHARED, "corpora", "wikitext-2", "test.txt"))
    p.add_argument("--work", default=work, help="runs and results (reused when present)")
    p.add_argument("--batches", type=int, default=400)
    p.add_argument("--warmup", type=int, default=20, help="batches left out of tokens/s")
    p.add_argument("--seeds", type=int, nargs="+", default=seeds)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--unroll", type=int, default=20)
    p.add_argument("--negatives", type=int, default=1024)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lstm-dim", type=int, default=1024)
    p.add_argument("--projection-dim", type=int, default=128)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tf-python", required=True, help="a Python with tensorflow-cpu 2.15, numpy<2, h5py")
    p.add_argument("--peer-src", required=True, help="unmodified bilm-tf source tree")
    p.add_argument("--harness", default=os.path.join(SHARED, "peers", "harness"))
    add_run_arguments(p, work="/tmp/bilm-parity", seeds=[0, 1])
    p.add_argument("--only", choices=["bilm", "bilm-tf"], help="run one side only")
    p.add_argument("--bilm-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra --set for bilm's runs (e.g. optim.loss_scale=none to see the mean-loss convention)")
    p.add_argument("--tag", default="", help="name bilm's runs bilm-TAG-seedN (for variants made with --bilm-set)")
    a = p.parse_args()
    os.makedirs(os.path.join(a.work, "data"), exist_ok=True)

    manifest, heldout, vocab = prepare(a)
    tf_runs, bilm_runs = {}, {}
    for seed in a.seeds:
        if a.only != "bilm":
            print(f"bilm-tf, seed {seed}", flush=True)
            tf_runs[seed] = run_bilmtf(a, seed, manifest, heldout, vocab)
        if a.only != "bilm-tf":
            print(f"bilm, seed {seed}", flush=True)
            bilm_runs[seed] = run_bilm(a, seed, manifest, heldout)

    rows = []

    def add(label: str, tf_values: list[float], bilm_values: list[float]) -> None:
        rows.append((label, spread(tf_values) if tf_values else "-", spread(bilm_values) if bilm_values else "-"))

    tf, bl = list(tf_runs.values()), list(bilm_runs.values())
    add("heldout perplexity, bilm evaluate (both models)", [r["bilm_eval"]["ppl"] for r in tf],
        [r["bilm_eval"]["ppl"] for r in bl])
    add("  forward", [r["bilm_eval"]["forward"] for r in tf], [r["bilm_eval"]["forward"] for r in bl])
    add("  backward", [r["bilm_eval"]["backward"] for r in tf], [r["bilm_eval"]["backward"] for r in bl])
    add("heldout perplexity, bilm-tf test() (its own model only)", [r["own_ppl"] for r in tf], [])
    add("training tokens/s (forward tokens)", [r["tokens_per_s"] for r in tf], [r["tokens_per_s"] for r in bl])
    unigram = unigram_perplexity(manifest, heldout)
    diverged = lambda runs: sum(r["bilm_eval"]["ppl"] > unigram for r in runs)
    rows.append(("runs worse than add-one unigram (diverged)", f"{diverged(tf)} of {len(tf)}" if tf else "-",
                 f"{diverged(bl)} of {len(bl)}" if bl else "-"))
    print(f"\n{a.batches} batches of {a.batch_size} x {a.unroll}, LSTM 2 x {a.lstm_dim}/{a.projection_dim}, "
          f"char CNN 2048 filters + 2 highway, {a.negatives} negatives, Adagrad 0.2, clip 10, dropout {a.dropout}; "
          f"seeds {a.seeds}; {machine_line()}" + (f"; bilm with {' '.join(a.bilm_set)}" if a.bilm_set else ""))
    print(f"add-one unigram heldout perplexity (for scale): {unigram:.1f}")
    if tf and bl:
        median = lambda runs, key: statistics.median(r["bilm_eval"][key] for r in runs)
        print(f"bilm / bilm-tf heldout perplexity, median over seeds (bilm evaluate): {median(bl, 'ppl') / median(tf, 'ppl'):.3f} "
              f"(forward {median(bl, 'forward') / median(tf, 'forward'):.3f}, "
              f"backward {median(bl, 'backward') / median(tf, 'backward'):.3f})")
    width = max(len(r[0]) for r in rows)
    print(f"| {'':{width}} | bilm-tf | bilm |\n|{'-' * (width + 2)}|---|---|")
    for label, tf_text, bilm_text in rows:
        print(f"| {label:{width}} | {tf_text} | {bilm_text} |")


if __name__ == "__main__":
    main()
