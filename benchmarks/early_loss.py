"""How high is a healthy run's sampled training loss in its first steps, against log(vocab size)?

    python benchmarks/early_loss.py --data manifest.json [--steps 100] [--work /tmp/bilm-early-loss]
        [--configs tiny tiny+adam tiny+adam-warmup elmo_small] [--set KEY=VALUE ...]

The divergence guard (bilm/training/guard.py) fires when a direction's training loss, averaged over
the last steps, stays above ``train.divergence_loss_factor`` x log(V) (docs/divergence.md). This
script trains each configuration (a preset of configs/, ``+recipe`` laid over it from
configs/recipes/) for ``--steps`` steps with a figure logged at every step and no heldout data,
and prints per direction: the step-1 loss, the highest loss and the highest trailing mean over the
guard's window, each also as a multiple of log(V). A run directory found in --work continues with
--resume up to --steps, so a long configuration can be measured in several short calls.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from machine import machine_line  # noqa: E402

WINDOW = 10  # bilm.training.guard.TRAINING_LOSS_WINDOW (not imported: the benchmark runs bilm as a user does)


def config_files(name: str) -> list[str]:
    preset, _, recipe = name.partition("+")
    files = [os.path.join(ROOT, "configs", f"{preset}.yaml")]
    if recipe:
        files.append(os.path.join(ROOT, "configs", "recipes", f"{recipe}.yaml"))
    return files


def train(name: str, data: str, work: str, steps: int, overrides: list[str]) -> str:
    run = os.path.join(work, name)
    argv = [sys.executable, "-m", "bilm.cli", "train", "--data", data, "--out", run, "--no-progress"]
    for path in config_files(name):
        argv += ["--config", path]
    for override in ("train.log_every_steps=1", "train.eval_tokens=0", f"train.max_steps={steps}",
                     "train.on_divergence=warn", *overrides):
        argv += ["--set", override]
    if os.path.isdir(os.path.join(run, "checkpoints")):
        argv.append("--resume")
    subprocess.run(argv, check=True, env={**os.environ, "PYTHONPATH": ROOT})
    return run


def trailing_means(values: list[float], window: int) -> list[float]:
    """The mean of each value and up to ``window - 1`` before it (as the guard smooths)."""
    return [sum(values[max(0, i + 1 - window):i + 1]) / min(i + 1, window) for i in range(len(values))]


def summary(run: str, vocab_size: int, steps: int) -> dict:
    rows = {}
    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if "loss/forward" in record and record["step"] <= steps:
                rows[record["step"]] = record
    log_v = math.log(vocab_size)
    out = {"log_v": log_v, "steps": len(rows)}
    for d in ("forward", "backward"):
        losses = [float(rows[s][f"loss/{d}"]) for s in sorted(rows)]
        means = trailing_means(losses, WINDOW)
        out[d] = {"step1": losses[0], "max": max(losses), "max_mean": max(means),
                  "argmax_mean": sorted(rows)[means.index(max(means))], "last": losses[-1]}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="manifest.json from bilm prepare")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--work", default="/tmp/bilm-early-loss")
    parser.add_argument("--configs", nargs="+", default=["tiny", "tiny+adam", "tiny+adam-warmup"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    with open(args.data, encoding="utf-8") as f:
        manifest = json.load(f)
    with open(os.path.join(os.path.dirname(os.path.abspath(args.data)), manifest["vocab"]), encoding="utf-8") as f:
        vocab_size = sum(1 for line in f if line.strip())
    os.makedirs(args.work, exist_ok=True)
    print(f"machine: {machine_line()}; data: {args.data} (V = {vocab_size:,}, log V = {math.log(vocab_size):.3f}); "
          f"steps 1-{args.steps}; trailing mean over {WINDOW} steps")
    print("| configuration | direction | step 1 | highest | highest trailing mean (step) | as x log V | step-1 x log V |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.configs:
        s = summary(train(name, args.data, args.work, args.steps, args.overrides), vocab_size, args.steps)
        for d in ("forward", "backward"):
            r = s[d]
            print(f"| {name} | {d} | {r['step1']:.3f} | {r['max']:.3f} | {r['max_mean']:.3f} ({r['argmax_mean']}) | "
                  f"{r['max_mean'] / s['log_v']:.3f} | {r['step1'] / s['log_v']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
