"""What the heldout evaluation during training costs, against training itself.

    python benchmarks/eval_cost.py --config configs/elmo_small.yaml [--steps 3] [--sample-tokens 2000]
        [--vocab-size 100000] [--budget 0.05] [--set key=value ...]

Times one training step (synthetic batches, as benchmarks/train.py) and one heldout evaluation
of a synthetic sample (``bilm.training.heldout``, the code training runs: full softmax, streams carrying states), in
the same process. From the seconds per heldout token it prints the largest ``train.eval_tokens``
whose evaluation costs at most ``--budget`` (5%) of the training time between two evaluations
(``train.eval_every_steps`` of the config), and the share the config's own ``eval_tokens`` costs.
The full softmax costs in proportion to the vocabulary: the figures hold for ``--vocab-size``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bilm.runs.config import load_config  # noqa: E402
from bilm.core.distributed import init_distributed  # noqa: E402
from bilm.training.heldout import prepare_heldout  # noqa: E402
from bilm.training.step import TrainStep  # noqa: E402
from bilm.core.vocab import Vocabulary  # noqa: E402
from machine import cpu_model  # noqa: E402
from train import synthetic_batches  # noqa: E402  (benchmarks/train.py)


def synthetic_text(path: str, n_tokens: int, vocab_size: int, seed: int = 0) -> None:
    """Sentences of Zipfian words (the words of ``synthetic_batches``), 5 to 45 tokens long."""
    rng = np.random.default_rng(seed)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < n_tokens:
            n = int(rng.integers(5, 46))
            ids = np.minimum(rng.zipf(1.2, size=n) + 2, vocab_size - 1)
            f.write(" ".join(f"w{i - 3:x}" for i in ids) + "\n")
            written += n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (after one warm-up step)")
    parser.add_argument("--sample-tokens", type=int, default=2000, help="tokens of the timed heldout sample")
    parser.add_argument("--vocab-size", type=int, default=100_000)
    parser.add_argument("--budget", type=float, default=0.05, help="share of training time evaluation may take")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    from bilm.core.malloc import keep_freed_memory
    keep_freed_memory()

    env = init_distributed(args.device)
    cfg = load_config(args.config, [*args.overrides, f"train.device={env.device.type}",
                                    f"train.eval_tokens={args.sample_tokens}"])
    t = cfg.train
    eval_every, eval_tokens = t.eval_every_steps, load_config(args.config, args.overrides).train.eval_tokens
    trainer = TrainStep(cfg, args.vocab_size, env)
    batches = synthetic_batches(1 + args.steps, t.batch_size, t.unroll_steps, args.vocab_size,
                                cfg.model.char_cnn is not None)
    trainer.step(batches[0])
    start = time.perf_counter()
    for batch in batches[1:]:
        float(trainer.step(batch).loss)
    step_seconds = (time.perf_counter() - start) / args.steps

    vocab = Vocabulary(["<S>", "</S>", "<UNK>"] + [f"w{i:x}" for i in range(args.vocab_size - 3)])
    with tempfile.TemporaryDirectory(prefix="bilm-eval-cost-") as tmp:
        text = os.path.join(tmp, "heldout.txt")
        synthetic_text(text, args.sample_tokens * 2, args.vocab_size)
        held = prepare_heldout(cfg, None, text, tmp, vocab, None, env)
        held.run(trainer.model, env)  # warm-up: the first pass allocates
        start = time.perf_counter()
        result = held.run(trainer.model, env)
        eval_seconds = time.perf_counter() - start
    tokens = result["forward"]["tokens"]  # words + one boundary per sentence, each direction
    per_token = eval_seconds / tokens
    interval = eval_every * step_seconds
    largest = args.budget * interval / per_token
    device = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else \
        f"CPU {cpu_model()}, {torch.get_num_threads()} threads"
    print(f"config {args.config}  batch {t.batch_size} x unroll {t.unroll_steps}  vocab {args.vocab_size}  "
          f"negatives {t.n_negative_samples_batch}  device {device}  torch {torch.__version__}")
    print(f"training step {step_seconds:.3f} s (mean of {args.steps}); heldout evaluation of {tokens:,} tokens "
          f"({held.n_sentences} sentences) {eval_seconds:.3f} s = {1000 * per_token:.3f} ms a token")
    print(f"train.eval_every_steps {eval_every}: {interval:,.0f} s of training between evaluations; "
          f"{100 * args.budget:g}% of it scores {largest:,.0f} tokens")
    print(f"train.eval_tokens {eval_tokens:,} (the config's) costs {100 * eval_tokens * per_token / interval:.2f}% "
          f"of training at that interval (extrapolated from the timed sample)")


if __name__ == "__main__":
    main()
