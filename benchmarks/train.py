"""Training throughput: tokens/s (batch x unroll x ranks, one direction) and where a step's time goes.

    python benchmarks/train.py --config configs/elmo_small.yaml [--device cpu|cuda] [--steps 10]
        [--impls exact,reference] [--vocab-size 100000] [--set train.batch_size=64 ...]

Batches are synthetic (Zipfian token ids over a generated vocabulary, in the bilm.data batch
format) so the figure is the model's, not the disk's; benchmarks/data.py measures the reader.
Each LSTM implementation named in --impls runs in the same process, and the ratio to the
last one (the baseline, `reference` by default) is printed. Run it under torchrun for
several ranks (gloo on CPU, NCCL on GPU): the figure then counts every rank.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bilm.core.chars import CharIdMapper  # noqa: E402
from bilm.runs.config import load_config  # noqa: E402
from bilm.core.distributed import init_distributed, shutdown  # noqa: E402
from bilm.training.step import TrainStep  # noqa: E402
from machine import cpu_model  # noqa: E402  (benchmarks/machine.py; the script's folder is on sys.path)


def synthetic_batches(n: int, batch_size: int, unroll: int, vocab_size: int, char_inputs: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    mapper = CharIdMapper()
    words = ["<S>", "</S>", "<UNK>"] + [f"w{i:x}" for i in range(vocab_size - 3)]
    batches = []
    for _ in range(n):
        batch = {"reset_state": torch.zeros(batch_size, dtype=torch.bool)}
        for direction in ("forward", "backward"):
            ids = np.minimum(rng.zipf(1.2, size=(batch_size, unroll + 1)) - 1, vocab_size - 1)
            d = {"token_ids": torch.from_numpy(ids[:, :-1].copy()), "next_token_ids": torch.from_numpy(ids[:, 1:].copy()),
                 "mask": torch.ones(batch_size, unroll, dtype=torch.bool)}
            if char_inputs:
                rows = np.asarray(mapper.rows([words[i] for i in ids[:, :-1].ravel()])).reshape(batch_size, unroll)
                d["char_ids"] = torch.from_numpy(mapper.table[rows])
            batch[direction] = d
        batches.append(batch)
    return batches


def run(cfg, vocab_size: int, steps: int, warmup: int, env) -> dict:
    t = cfg.train
    trainer = TrainStep(cfg, vocab_size, env)
    trainer.timing = True
    data_start = time.perf_counter()
    batches = synthetic_batches(warmup + steps, t.batch_size, t.unroll_steps, vocab_size, cfg.model.char_cnn is not None)
    data_time = (time.perf_counter() - data_start) / (warmup + steps)
    for batch in batches[:warmup]:
        trainer.step(batch)
    split = {"forward": 0.0, "backward": 0.0, "communication": 0.0, "optimizer": 0.0}
    start = time.perf_counter()
    for batch in batches[warmup:]:
        result = trainer.step(batch)
        for k, v in result.timings.items():
            split[k] = split.get(k, 0.0) + v
    elapsed = time.perf_counter() - start
    tokens = t.batch_size * t.unroll_steps * env.world_size * steps
    return {"tokens_per_second": tokens / elapsed, "step_seconds": elapsed / steps,
            "split": {"data (synthetic batch build)": data_time, **{k: v / steps for k, v in split.items()}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--impls", default="exact,reference", help="LSTM implementations, baseline last")
    parser.add_argument("--vocab-size", type=int, default=100_000)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    from bilm.core.malloc import keep_freed_memory
    keep_freed_memory()  # as the bilm command does for train and embed

    env = init_distributed(args.device)
    impls = args.impls.split(",")
    results = {}
    for impl in impls:
        cfg = load_config(args.config, [*args.overrides, f"train.lstm_impl={impl}", f"train.device={env.device.type}"])
        results[impl] = run(cfg, args.vocab_size, args.steps, args.warmup, env)
    if env.is_main:
        device = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else \
            f"CPU {cpu_model()}, {torch.get_num_threads()} threads"
        print(f"config {args.config}  batch {cfg.train.batch_size} x unroll {cfg.train.unroll_steps} x ranks "
              f"{env.world_size}  vocab {args.vocab_size}  negatives {cfg.train.n_negative_samples_batch}  "
              f"precision {cfg.train.precision}  device {device}  torch {torch.__version__}")
        for impl, r in results.items():
            split = "  ".join(f"{k} {1000 * v:.1f} ms" for k, v in r["split"].items())
            print(f"{impl:10s} {r['tokens_per_second']:12,.0f} tokens/s   step {1000 * r['step_seconds']:.1f} ms   [{split}]")
        baseline = impls[-1]
        for impl in impls[:-1]:
            ratio = results[impl]["tokens_per_second"] / results[baseline]["tokens_per_second"]
            print(f"ratio {impl}/{baseline}: {ratio:.2f}x")
    shutdown()


if __name__ == "__main__":
    main()
