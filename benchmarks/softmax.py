"""Time one sampled-softmax training step with sparse vs dense gradients of the softmax matrix.

    python benchmarks/softmax.py                      # V=800k, dim=512, 8192 samples, 128x20 positions
    python benchmarks/softmax.py --vocab 100000 --steps 5 --device cuda

A step is: sample candidates, forward, backward, global grad-norm clip, Adagrad
(lr 0.2, initial accumulator 1.0). With sparse=True the gradient, the clip and the
optimizer touch only the ~(positions + samples) rows used; with dense gradients
each of them is O(V * dim). The bytes an all-reduce would move per step are printed
too (the sparse case sends indices and values of the touched rows only).
"""
from __future__ import annotations

import argparse
import warnings
import statistics
import time

import torch

from bilm.training.gradients import clip_grad_norm_
from bilm.modules.softmax import SoftmaxLayer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(sparse: bool, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    layer = SoftmaxLayer(args.vocab, args.dim, sparse=sparse).to(device)
    optimizer = torch.optim.Adagrad(layer.parameters(), lr=0.2, initial_accumulator_value=1.0)
    generator = torch.Generator(device=device).manual_seed(0)
    n_positions = args.batch * args.unroll
    phases: dict[str, list[float]] = {name: [] for name in ("sample", "forward", "backward", "clip", "optimizer")}
    cpu_seconds: list[float] = []  # process CPU time per step: less sensitive than wall time to a busy machine
    rows_touched = 0
    for step in range(args.warmup + args.steps):
        hidden = torch.randn(n_positions, args.dim, device=device, requires_grad=True)
        # Targets drawn Zipf-like, as real text is.
        targets = layer.sampler.draw(n_positions, generator)
        optimizer.zero_grad(set_to_none=True)
        cpu_start = time.process_time()
        marks = [time.perf_counter()]
        candidates, num_tries = layer.sample_candidates(args.samples, generator)
        q_candidates = layer.sampler.expected_count(candidates, num_tries, args.samples)
        q_targets = layer.sampler.expected_count(targets, num_tries, args.samples)
        sync(device)
        marks.append(time.perf_counter())
        loss = layer.sampled_loss(hidden, targets, candidates, q_candidates, q_targets).mean()
        sync(device)
        marks.append(time.perf_counter())
        loss.backward()
        sync(device)
        marks.append(time.perf_counter())
        clip_grad_norm_(layer.parameters(), 10.0)
        sync(device)
        marks.append(time.perf_counter())
        optimizer.step()
        sync(device)
        marks.append(time.perf_counter())
        if step >= args.warmup:
            cpu_seconds.append(time.process_time() - cpu_start)
            for name, start, end in zip(phases, marks, marks[1:]):
                phases[name].append(end - start)
        if sparse:
            rows_touched = layer.weight.grad._nnz()
    result = {name: statistics.median(times) for name, times in phases.items()}
    result["step"] = sum(result.values())
    result["step_cpu"] = statistics.median(cpu_seconds)
    weight_bytes = args.vocab * args.dim * 4
    # Sparse: int64 row index + float32 row of weight, and the same for the bias.
    result["allreduce_MB"] = (rows_touched * (args.dim * 4 + 8 + 4 + 8) if sparse
                              else weight_bytes + args.vocab * 4) / 2**20
    del layer, optimizer
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=800_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--unroll", type=int, default=20)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", default="sparse,dense", help="comma-separated: sparse, dense")
    args = parser.parse_args()
    # torch.optim.Adagrad builds sparse tensors without invariant checks and says so on every step.
    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    device = torch.device(args.device)

    print(f"V={args.vocab} dim={args.dim} samples={args.samples} positions={args.batch}x{args.unroll} "
          f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'grads':8s} {'sample':>8s} {'forward':>8s} {'backward':>8s} {'clip':>8s} {'optim':>8s} "
          f"{'step':>8s} {'step cpu':>9s} {'allreduce':>10s}")
    for mode in args.modes.split(","):
        r = time_steps(mode == "sparse", args, device)
        print(f"{mode:8s} " + " ".join(f"{r[k] * 1000:6.0f}ms" for k in
                                       ("sample", "forward", "backward", "clip", "optimizer", "step"))
              + f" {r['step_cpu']:8.2f}s {r['allreduce_MB']:8.1f}MB")
    print("(medians over --steps timed steps; step cpu = process CPU seconds, all threads; "
          "allreduce = bytes one rank would send per step)")


if __name__ == "__main__":
    main()
