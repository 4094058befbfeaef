"""What a refactor must not change, printed so two trees can be diffed (issue 23).

Prints, from the tree on PYTHONPATH:
- every ``bilm <command> --help`` (the CLI's flags and their help texts);
- the fixed-seed tiny training run's logged losses and perplexities (metrics.jsonl, timing
  fields dropped), which must be identical, not close;
- the largest difference of the top layer from bilm-tf's vectors on the TensorFlow fixture.

Use: PYTHONPATH=TREE python benchmarks/refactor_check.py > figures.txt, once before and once after.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = ("time", "second", "tokens_per", "per_s", "wall", "elapsed", "memory", "rss")


def _bilm(*args: str, cwd: str = ROOT) -> str:
    done = subprocess.run([sys.executable, "-m", "bilm.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "120"})
    if done.returncode != 0 and "--help" not in args:
        raise SystemExit(f"bilm {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def help_texts() -> None:
    from bilm.cli import build_parser
    _, handlers = build_parser()
    print("=== bilm --help")
    print(_bilm("--help"))
    for name in sorted(handlers):
        print(f"=== bilm {name} --help")
        print(_bilm(name, "--help"))


def tiny_run() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        _bilm("prepare", os.path.join(ROOT, "data/sample/train.txt"), "--out", data, "--heldout-fraction", "0.05")
        run = os.path.join(tmp, "run")
        _bilm("train", "--config", os.path.join(ROOT, "configs/tiny.yaml"), "--data", os.path.join(data, "manifest.json"),
              "--out", run, "--set", "train.max_steps=20", "--set", "train.seed=0", "--set", "train.log_every_steps=2",
              "--set", "train.eval_every_steps=10", "--set", "train.device=cpu")
        print("=== tiny run metrics.jsonl (timing fields dropped)")
        with open(os.path.join(run, "metrics.jsonl")) as f:
            for line in f:
                record = json.loads(line)
                kept = {k: v for k, v in record.items() if not any(t in k for t in TIMING_KEYS)}
                print(json.dumps(kept, sort_keys=True))
        print("=== tiny run evaluate")
        print(_bilm("evaluate", "--checkpoint", run, "--data", os.path.join(ROOT, "data/sample/heldout.txt"))
              .replace(tmp, "TMP"))


def fixture_diff() -> None:
    import numpy as np
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from conftest import OPTIONS, WEIGHTS, tf_embedding_batches

    from bilm import ElmoEmbedder
    embedder = ElmoEmbedder(OPTIONS, WEIGHTS)
    worst = 0.0
    for sentences, expected in tf_embedding_batches():
        for vectors, want in zip(embedder.embed_batch(sentences), expected):
            worst = max(worst, float(np.abs(vectors[2] - want).max()))
    print("=== TensorFlow fixture, top layer, max abs diff")
    print(f"{worst:.6e}")


if __name__ == "__main__":
    help_texts()
    tiny_run()
    fixture_diff()
