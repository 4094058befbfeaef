"""Embedder throughput (sentences/s): the fused LSTM path against the per-step baseline.

    python benchmarks/embed.py                      # original-size ELMo, 256 sentences x 20 tokens, batch 64
    python benchmarks/embed.py --small              # a smaller architecture, for a quick check
    python benchmarks/embed.py --device cuda --sentences 1024

The architecture is ELMo's original one (2 layers of 4096 cells projected to 512, char CNN
filters [[1,32],[2,32],[3,64],[4,128],[5,256],[6,512],[7,1024]], char embedding dim 16,
2 highway layers, relu, skip connections, cell/proj clip 3) with random weights, written
by this script in the published layout (options.json + weights.hdf5, in a temp dir) and
loaded through ``ElmoEmbedder(stateful=False)``, as a user would. Each implementation
(``--impls``; default fused and reference, the straightforward baseline: one cell call per
time step, no precomputed input projections) embeds the same sentences in the same process;
rounds are interleaved and the best round counts, so load from other processes hits them alike.

``--onnx`` adds the ONNX runtime (``ElmoEmbedder(runtime="onnx")``: the stateless model built by
``bilm.inference.onnx_export``, run by onnxruntime) to the same rounds; ``--latency-sentences N`` then also
times N sentences one at a time (batch 1: serving latency, ms per sentence) for every embedder.
The issue-24 table (docs/onnx.md; figures in docs/benchmarks.md):

    python benchmarks/embed.py --precisions fp32 bf16 --skip reference-bf16 --onnx --latency-sentences 16
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

import torch

from bilm import ElmoEmbedder
from bilm.modules.bidirectional import BidirectionalLM
from bilm.core.options import BiLMOptions, CharCNNOptions, LstmOptions
from bilm.modules.weight_file import save_weights
from machine import cpu_model  # benchmarks/machine.py (the script's own folder is on sys.path)

ORIGINAL_FILTERS = [[1, 32], [2, 32], [3, 64], [4, 128], [5, 256], [6, 512], [7, 1024]]


def architecture(small: bool) -> BiLMOptions:
    if small:
        return BiLMOptions(
            lstm=LstmOptions(dim=1024, projection_dim=128, n_layers=2, cell_clip=3.0, proj_clip=3.0,
                             use_skip_connections=True),
            char_cnn=CharCNNOptions(embedding_dim=16, filters=[[1, 32], [2, 32], [3, 64], [4, 128], [5, 256]],
                                    n_highway=1, activation="relu"))
    return BiLMOptions(
        lstm=LstmOptions(dim=4096, projection_dim=512, n_layers=2, cell_clip=3.0, proj_clip=3.0,
                         use_skip_connections=True),
        char_cnn=CharCNNOptions(embedding_dim=16, filters=ORIGINAL_FILTERS, n_highway=2, activation="relu"))


def write_model(options: BiLMOptions, directory: str) -> tuple[str, str]:
    """Random weights in the published layout, as a trained model would ship them."""
    torch.manual_seed(0)
    model = BidirectionalLM(options)
    options_file, weight_file = os.path.join(directory, "options.json"), os.path.join(directory, "weights.hdf5")
    with open(options_file, "w") as f:
        json.dump(options.to_dict(), f)
    save_weights(model, weight_file)
    return options_file, weight_file


def random_sentences(n: int, length: int, seed: int = 0) -> list[list[str]]:
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10)))
             for _ in range(5000)]
    return [[rng.choice(vocab) for _ in range(length)] for _ in range(n)]


def time_pass(embedder: ElmoEmbedder, sentences: list[list[str]], batch_size: int, device: torch.device) -> float:
    start = time.perf_counter()
    for _ in embedder.embed_sentences(sentences, batch_size):
        pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=20, help="tokens per sentence")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", nargs="+", default=None,
                        help="cpu and/or cuda (default: cpu, and cuda when present)")
    parser.add_argument("--small", action="store_true", help="a smaller architecture (1024 -> 128 cells, fewer filters)")
    parser.add_argument("--impls", nargs="+", default=["fused", "reference"])
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                        help="fp32 and/or bf16 (autocast); each is timed in the same process")
    parser.add_argument("--onnx", action="store_true", help="also the ONNX runtime (fp32, CPU; needs the onnx extra)")
    parser.add_argument("--latency-sentences", type=int, default=0,
                        help="also time this many sentences at batch 1 (ms per sentence), each embedder")
    parser.add_argument("--skip", nargs="*", default=[], metavar="IMPL-PRECISION",
                        help="leave out these combinations, e.g. reference-bf16")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    from bilm.core.malloc import keep_freed_memory
    keep_freed_memory()  # as the bilm command does for train and embed
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])

    options = architecture(args.small)
    sentences = random_sentences(args.sentences, args.tokens)
    with tempfile.TemporaryDirectory() as directory:
        options_file, weight_file = write_model(options, directory)
        for device_name in devices:
            device = torch.device(device_name)
            embedders = {f"{impl} {precision}": ElmoEmbedder(options_file, weight_file, device=device_name,
                                                             batch_size=args.batch_size, stateful=False, lstm_impl=impl,
                                                             precision=precision, text_pipeline=None)
                         for impl in args.impls for precision in args.precisions
                         if f"{impl}-{precision}" not in args.skip}
            if args.onnx and device.type == "cpu":
                os.environ.setdefault("BILM_CACHE", os.path.join(directory, "cache"))  # built once, in the temp dir
                embedders["onnx fp32"] = ElmoEmbedder(options_file, weight_file, batch_size=args.batch_size,
                                                      runtime="onnx", text_pipeline=None)
            for embedder in embedders.values():  # warm-up: one batch
                time_pass(embedder, sentences[: args.batch_size], args.batch_size, device)
            best = {impl: float("inf") for impl in embedders}
            for _ in range(args.rounds):
                for impl, embedder in embedders.items():
                    best[impl] = min(best[impl], time_pass(embedder, sentences, args.batch_size, device))
            where = (torch.cuda.get_device_name(device) if device.type == "cuda"
                     else f"{cpu_model()}, {torch.get_num_threads()} threads")
            print(f"{'small' if args.small else 'original'}-size ELMo on {device_name} ({where}), torch {torch.__version__}; "
                  f"{args.sentences} sentences x {args.tokens} tokens, batch {args.batch_size}, best of {args.rounds}; "
                  f"load average {os.getloadavg()[0]:.2f}")
            for key, seconds in best.items():
                impl, precision = key.split()
                rate = args.sentences / seconds
                line = f"  {impl:10s} {precision}  {rate:8.1f} sentences/s  ({seconds:6.2f} s)"
                baseline = f"reference {precision}"
                if baseline in best and impl != "reference":
                    line += f"  {best[baseline] / seconds:.2f}x reference"
                if precision == "bf16" and f"{impl} fp32" in best:
                    line += f"  {best[f'{impl} fp32'] / seconds:.2f}x fp32"
                if impl == "onnx" and "fused fp32" in best:
                    line += f"  {best['fused fp32'] / seconds:.2f}x fused fp32"
                print(line)
            if args.latency_sentences:
                single = sentences[: args.latency_sentences]
                latency = {impl: float("inf") for impl in embedders}
                for _ in range(args.rounds):
                    for impl, embedder in embedders.items():
                        latency[impl] = min(latency[impl], time_pass(embedder, single, 1, device))
                print(f"  batch 1, {len(single)} sentences x {args.tokens} tokens, best of {args.rounds}:")
                for key, seconds in latency.items():
                    print(f"  {key:16s} {1000 * seconds / len(single):8.1f} ms/sentence")


if __name__ == "__main__":
    main()
