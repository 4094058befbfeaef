"""Training throughput of the biLM's LSTM stacks: forward + backward of both directions.

    python benchmarks/lstm.py                          # elmo_small: 2 layers, 1024 cells -> 128, batch 128 x 20
    python benchmarks/lstm.py --impls fused reference cudnn --no-clip
    python benchmarks/lstm.py --compile                # also the fused path with torch.compile'd steps
    python benchmarks/lstm.py --profile                # top ops of the fused path (torch.profiler)
    python benchmarks/lstm.py --device cuda --dim 4096 --projection-dim 512 --batch-size 128

A step is what training does per batch through ``BidirectionalLM.run_lstms``: the forward and
backward stacks over (batch, unroll) inputs with carried states, and the backward pass of a
random linear loss on every layer's outputs. tokens/s = batch * unroll / step time (each token
goes through both directions). The implementations are timed in interleaved rounds (median
per implementation), so load from other processes hits them alike.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from bilm.modules.bidirectional import BidirectionalLM
from bilm.core.options import BiLMOptions, LstmOptions


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(impl: str, args: argparse.Namespace, device: torch.device, compile_mode: str = "off") -> BidirectionalLM:
    clip = None if args.no_clip else 3.0
    options = BiLMOptions(lstm=LstmOptions(dim=args.dim, projection_dim=args.projection_dim, n_layers=args.layers,
                                           cell_clip=clip, proj_clip=clip, use_skip_connections=True),
                          char_cnn=None, n_tokens_vocab=16)
    torch.manual_seed(0)
    return BidirectionalLM(options, lstm_impl=impl, lstm_compile=compile_mode).to(device).train()


def make_step(model: BidirectionalLM, args: argparse.Namespace, device: torch.device):
    shape = (args.batch_size, args.unroll, args.projection_dim)
    fwd = torch.randn(shape, device=device, requires_grad=True)
    bwd = torch.randn(shape, device=device, requires_grad=True)
    weights = [torch.randn(shape, device=device) for _ in range(2 * args.layers)]
    state = None

    def step() -> None:
        nonlocal state
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            f_out, b_out, new_state = model.run_lstms(fwd, bwd, state)
            loss = sum((o.float() * w).sum() for o, w in zip(f_out + b_out, weights))
        loss.backward()
        # Carry the states, detached, into the next step (truncated BPTT, as training does).
        state = {d: [tuple(t.detach() for t in layer) for layer in layers] for d, layers in new_state.items()}
        model.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", nargs="+", default=["fused", "reference"])
    parser.add_argument("--compile", action="store_true", help="also time fused with torch.compile'd steps")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--projection-dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--unroll", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-clip", action="store_true", help="cell/proj clip off (needed for cudnn)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", action="store_true", help="print the top ops of the fused path")
    args = parser.parse_args()
    from bilm.core.malloc import keep_freed_memory
    keep_freed_memory()  # as the bilm command does for train and embed
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    variants = [(impl, impl, "off") for impl in args.impls]
    if args.compile:
        variants.append(("fused+compile", "fused", "on"))
    steps = {}
    for name, impl, compile_mode in variants:
        model = build(impl, args, device, compile_mode)
        steps[name] = make_step(model, args, device)
        start = time.perf_counter()
        steps[name]()  # warm-up (and compile)
        sync(device)
        print(f"{name:14s} warm-up {time.perf_counter() - start:6.1f} s")
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - start)

    tokens = args.batch_size * args.unroll
    print(f"\n{device.type}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.layers} layers of {args.dim} cells -> {args.projection_dim}, batch {args.batch_size} x {args.unroll}, "
          f"clip {'off' if args.no_clip else 3.0}{', bf16 autocast' if args.bf16 else ''}; "
          f"load average {os.getloadavg()[0]:.2f}")
    rates = {name: tokens / statistics.median(t) for name, t in times.items()}
    for name, rate in rates.items():
        line = f"{name:14s} {rate:10.0f} tokens/s  (median step {statistics.median(times[name]) * 1e3:7.1f} ms)"
        if "reference" in rates and name != "reference":
            line += f"  {rate / rates['reference']:.2f}x reference"
        print(line)

    if args.profile:
        step = steps["fused"] if "fused" in steps else make_step(build("fused", args, device), args, device)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            step()
            sync(device)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print("\nfused, one step, top ops by self time:")
        print(prof.key_averages().table(sort_by=sort, row_limit=15))


if __name__ == "__main__":
    main()
