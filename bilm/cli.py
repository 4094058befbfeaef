"""The ``bilm`` command: one subcommand per stage of the pipeline.

Flag names are shared across subcommands: --config, --data, --out, --checkpoint,
--options, --weights, --device, --batch-size.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

from bilm import __version__


def _add_embed(sub: argparse._SubParsersAction) -> Callable:
    p = sub.add_parser("embed", help="ELMo vectors for every line of a text file, into HDF5",
                       description="Embed each line of --input (whitespace-tokenized) with a biLM and write "
                                   "one dataset per line ('0', '1', ...) plus a JSON 'sentence_to_index' "
                                   "dataset, as AllenNLP's `elmo` command.")
    p.add_argument("--options", required=True, help="options.json of the biLM")
    p.add_argument("--weights", required=True, help="weights.hdf5 of the biLM")
    p.add_argument("--input", required=True, help="text file, one whitespace-tokenized sentence per line")
    p.add_argument("--output", "--out", dest="output", required=True, help="HDF5 file to write")
    p.add_argument("--layers", choices=["all", "top", "average"], default="all",
                   help="all: (n_layers, n_tokens, dim) per sentence; top: the top layer; average: mean of layers")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per batch (default 64)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--stateless", action="store_true",
                   help="start every batch from zero LSTM states (deterministic vectors); default: stateful like bilm-tf")
    p.add_argument("--vocab", help="optional vocab file to preload the character cache (and with --token-embeddings)")
    p.add_argument("--token-embeddings", help="token-embedding cache from `bilm dump-token-embeddings` (needs --vocab)")

    def run(args: argparse.Namespace) -> int:
        from bilm.embedder import ElmoEmbedder
        embedder = ElmoEmbedder(args.options, args.weights, device=args.device, batch_size=args.batch_size,
                                stateful=not args.stateless, token_embedding_file=args.token_embeddings,
                                vocab_file=args.vocab)
        n = embedder.embed_file(args.input, args.output, output_format=args.layers, batch_size=args.batch_size)
        print(f"embedded {n} sentences -> {args.output}")
        return 0
    return run


def _add_dump_token_embeddings(sub: argparse._SubParsersAction) -> Callable:
    p = sub.add_parser("dump-token-embeddings", help="context-independent token vectors of a vocab, into HDF5",
                       description="Run the char CNN over every token of --vocab and write dataset 'embedding' "
                                   "(n_tokens, projection_dim) in vocab order (bilm-tf's dump_token_embeddings). "
                                   "`bilm embed --token-embeddings` and ElmoEmbedder(token_embedding_file=...) "
                                   "then skip the char CNN for those tokens.")
    p.add_argument("--vocab", required=True, help="vocab file, one token per line")
    p.add_argument("--options", required=True, help="options.json of the biLM")
    p.add_argument("--weights", required=True, help="weights.hdf5 of the biLM")
    p.add_argument("--out", required=True, help="HDF5 file to write")
    p.add_argument("--batch-size", type=int, default=512, help="tokens per batch (default 512)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")

    def run(args: argparse.Namespace) -> int:
        from bilm.embedder import dump_token_embeddings
        n = dump_token_embeddings(args.vocab, args.options, args.weights, args.out, args.batch_size, args.device)
        print(f"wrote {n} token vectors -> {args.out}")
        return 0
    return run


def _add_prepare(sub: argparse._SubParsersAction) -> Optional[Callable]:
    try:
        from data_tools import prepare
    except ImportError:
        return None
    p = sub.add_parser("prepare", help="raw text -> tokenized shards, vocab and manifest",
                       description=(prepare.__doc__ or "").strip().splitlines()[0] if prepare.__doc__ else None)
    prepare.add_arguments(p)
    return prepare.run


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable]]:
    parser = argparse.ArgumentParser(prog="bilm", description="Pretrain ELMo on your corpus; embed with ELMo weights.")
    parser.add_argument("--version", action="version", version=f"bilm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    handlers: dict[str, Callable] = {}
    for name, add in (("prepare", _add_prepare), ("embed", _add_embed),
                      ("dump-token-embeddings", _add_dump_token_embeddings)):
        handler = add(sub)
        if handler is not None:
            handlers[name] = handler
    return parser, handlers


def main(argv: Optional[list[str]] = None) -> int:
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return handlers[args.command](args) or 0
    except (FileNotFoundError, ValueError) as e:
        # User errors: one clear line, no traceback.
        print(f"bilm {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
