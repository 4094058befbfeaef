"""The ``bilm`` command: one subcommand per stage of the pipeline.

Flag names are shared across subcommands: --config, --data, --out, --checkpoint,
--options, --weights, --device, --batch-size.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Callable, Optional

from bilm.core.errors import BilmError, InputError
from bilm.core.version import __version__
from bilm.core.precision import PRECISIONS

EXIT_STOPPED_BY_SIGNAL = 143  # bilm train stopped by SIGTERM after writing a checkpoint (continue with --resume)
EXIT_DIVERGED = 3  # bilm train stopped by the divergence guard (on_divergence: stop, or rollbacks used up)


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a published model by name (small, medium, original, original-5.5b; downloaded "
                                   "once to $BILM_CACHE, default ~/.cache/bilm) or a directory holding options.json "
                                   "and weights.hdf5; default: original, unless --options/--weights are given")
    p.add_argument("--options", help="options.json of the biLM (with --weights, instead of --model)")
    p.add_argument("--weights", help="weights.hdf5 of the biLM (with --options, instead of --model)")


def _model_files(args: argparse.Namespace) -> tuple[str, str]:
    from bilm.modules.published import model_files
    if args.model and (args.options or args.weights):
        raise InputError("give --model, or --options and --weights, not both")
    if bool(args.options) != bool(args.weights):
        raise InputError("--options and --weights go together (or give --model)")
    return model_files(args.model, None) if not args.options else model_files(args.options, args.weights)


def _add_embed(sub: argparse._SubParsersAction) -> Callable:
    p = sub.add_parser("embed", help="ELMo vectors for every line of a text file, into HDF5",
                       description="Embed each line of --input with a biLM and write one dataset per line "
                                   "('0', '1', ...; its tokens in the attribute 'tokens') plus a JSON "
                                   "'sentence_to_index' dataset, as AllenNLP's `elmo` command. Lines are raw text, "
                                   "tokenized with the model's tokenizer.json (written by bilm export; models "
                                   "without one are split on whitespace), or with --pretokenized split on whitespace.")
    _add_model_arguments(p)
    p.add_argument("--input", required=True, help="text file, one sentence per line")
    p.add_argument("--pretokenized", action="store_true",
                   help="--input is already tokenized: split each line on whitespace instead of the model's tokenizer")
    p.add_argument("--out", "--output", dest="output", required=True, help="HDF5 file to write")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32, or bf16 (faster where the CPU or GPU has bf16 units; vectors stay float32)")
    p.add_argument("--layers", choices=["all", "top", "average"], default="all",
                   help="all: (n_layers, n_tokens, dim) per sentence; top: the top layer; average: mean of layers")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per batch (default 64)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--stateless", action="store_true",
                   help="start every batch from zero LSTM states (deterministic vectors); default: stateful like bilm-tf")
    p.add_argument("--vocab", help="optional vocab file to preload the character cache (and with --token-embeddings)")
    p.add_argument("--token-embeddings", help="token-embedding cache from `bilm dump-token-embeddings` (needs --vocab)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="float16 halves the file (values rounded to float16); recorded in the file's 'dtype' attribute")
    p.add_argument("--runtime", choices=["torch", "onnx"], default="torch",
                   help="onnx: the stateless ONNX model under onnxruntime (CPU; the directory's model.onnx, else "
                        "built once into the cache; implies --stateless; needs the onnx extra)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(args: argparse.Namespace) -> int:
        from bilm.inference.embedder import ElmoEmbedder
        if args.runtime == "onnx":
            from bilm.inference.onnx_runtime import serving_files
            if args.model and (args.options or args.weights):
                raise InputError("give --model, or --options and --weights, not both")
            options, weights = serving_files(args.model, None) if not args.options else _model_files(args)
        else:
            options, weights = _model_files(args)
        if args.force is False and os.path.exists(args.output):  # before a model is downloaded or built
            raise FileExistsError(f"{args.output} already exists; pass --force to overwrite it")
        embedder = ElmoEmbedder(options, weights, device=args.device, batch_size=args.batch_size,
                                stateful=not args.stateless and args.runtime == "torch",
                                token_embedding_file=args.token_embeddings,
                                vocab_file=args.vocab, precision=args.precision, runtime=args.runtime)
        n = embedder.embed_file(args.input, args.output, output_format=args.layers, batch_size=args.batch_size,
                                pretokenized=args.pretokenized, force=args.force, dtype=args.dtype,
                                progress=not args.no_progress)
        print(f"embedded {n:,} sentence{'' if n == 1 else 's'} -> {args.output}")
        return 0
    return run


def _add_dump_token_embeddings(sub: argparse._SubParsersAction) -> Callable:
    p = sub.add_parser("dump-token-embeddings", help="context-independent token vectors of a vocab, into HDF5",
                       description="Run the char CNN over every token of --vocab and write dataset 'embedding' "
                                   "(n_tokens, projection_dim) in vocab order (bilm-tf's dump_token_embeddings). "
                                   "`bilm embed --token-embeddings` and ElmoEmbedder(token_embedding_file=...) "
                                   "then skip the char CNN for those tokens.")
    p.add_argument("--vocab", required=True, help="vocab file, one token per line")
    _add_model_arguments(p)
    p.add_argument("--out", required=True, help="HDF5 file to write")
    p.add_argument("--batch-size", type=int, default=512, help="tokens per batch (default 512)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(args: argparse.Namespace) -> int:
        from bilm.inference.embedder import dump_token_embeddings
        options, weights = _model_files(args)
        n = dump_token_embeddings(args.vocab, options, weights, args.out, args.batch_size, args.device,
                                  progress=not args.no_progress)
        print(f"wrote {n} token vectors -> {args.out}")
        return 0
    return run


def _add_train(sub: argparse._SubParsersAction) -> Callable:
    p = sub.add_parser("train", help="train the biLM (one process, or one per device under torchrun)",
                       description="Train forward and backward LSTM language models with sampled softmax. "
                                   "Run under torchrun for several devices or nodes (see launch/).")
    p.add_argument("--config", required=True, action="append",
                   help="YAML config, e.g. configs/tiny.yaml; repeat it to lay a recipe over a preset, e.g. "
                        "--config configs/elmo_small.yaml --config configs/recipes/adam.yaml (later files win)")
    p.add_argument("--data", required=True, help="manifest.json from `bilm prepare`, or a shard glob (then --vocab)")
    p.add_argument("--out", required=True, help="run directory: checkpoints/, config.yaml, metrics.jsonl, tensorboard/")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.batch_size=64 (repeatable)")
    p.add_argument("--vocab", help="vocab file (only when --data is a shard glob)")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --out")
    p.add_argument("--device", help="auto (default: cuda when present), cpu or cuda; same as --set train.device=...")
    p.add_argument("--strategy", choices=["ddp", "deepspeed"], help="same as --set train.strategy=...")
    p.add_argument("--init-model", help="continue pretraining a published model (small, medium, original, "
                                        "original-5.5b; downloaded once) or a model directory (options.json + "
                                        "weights.hdf5, e.g. from bilm export); same as --init-weights/--init-options. "
                                        "original-tf (the original's training checkpoint) or a bilm-tf save_dir "
                                        "(with --init-vocab) also carries the softmax and Adagrad state")
    p.add_argument("--init-vocab", help="the vocab file a bilm-tf save_dir given as --init-model was trained with")
    p.add_argument("--keep-vocab", action="store_true",
                   help="with a bilm-tf checkpoint: train with its vocabulary (every softmax row carried) instead "
                        "of the data's")
    p.add_argument("--new-rows", choices=["unk", "char", "mean", "fresh"],
                   help="with a bilm-tf checkpoint: the softmax row of a word it does not know (default unk: the "
                        "checkpoint's <UNK> row, its probability shared among the new words; see docs/continued-pretraining.md)")
    p.add_argument("--init-weights", help="start from published ELMo weights.hdf5 (continued pretraining)")
    p.add_argument("--init-options", help="the options.json that came with --init-weights (sets the architecture)")
    p.add_argument("--init-softmax", help="softmax.hdf5 from `bilm export --include-softmax` (else a fresh softmax)")
    p.add_argument("--init-softmax-vocab", help="vocab the --init-softmax rows follow, when it differs from the training vocab")
    p.add_argument("--eval-data", metavar="FILE|manifest.json",
                   help="heldout data to watch while training: a manifest.json (its heldout split) or raw text files "
                        "(tokenized with the run's own pipeline); default: the --data manifest's heldout split")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(args: argparse.Namespace) -> int:
        from bilm.runs.config import load_config
        from bilm.training.run import train
        overrides = list(args.overrides)
        if args.device:
            overrides.append(f"train.device={args.device}")
        if args.strategy:
            overrides.append(f"train.strategy={args.strategy}")
        cfg = load_config(args.config, overrides)
        tf_start = None
        if args.init_model:
            if args.init_weights or args.init_options:
                raise InputError("give --init-model, or --init-weights and --init-options, not both")
            from bilm.commands.continue_tf import resolve_start
            tf_start = resolve_start(args.init_model, args.init_vocab, args.keep_vocab, args.new_rows,
                                     progress=not args.no_progress)
            if tf_start is None:
                from bilm.modules.published import resolve_model
                args.init_options, args.init_weights = resolve_model(args.init_model)
        if tf_start is None and (args.init_vocab or args.keep_vocab or args.new_rows):
            raise InputError("--init-vocab, --keep-vocab and --new-rows go with a bilm-tf checkpoint as --init-model")
        if tf_start is not None and (args.init_softmax or args.init_softmax_vocab):
            raise InputError("a bilm-tf checkpoint brings its softmax: drop --init-softmax / --init-softmax-vocab")
        init = {"weights": args.init_weights, "options": args.init_options, "softmax": args.init_softmax,
                "softmax_vocab": args.init_softmax_vocab} if args.init_weights else None
        if tf_start is not None:
            init = {"tf": tf_start}
        summary = train(cfg, args.data, args.out, resume=args.resume, vocab_file=args.vocab, init=init,
                        progress=not args.no_progress, eval_data=args.eval_data)
        if summary["diverged"]:
            if summary["is_main"]:
                print(summary["diverged"], file=sys.stderr)
            return EXIT_DIVERGED
        if summary["stopped_by_signal"]:
            # Not a finished run: 143 (= 128 + SIGTERM, as a terminated process) tells schedulers to requeue.
            if summary["is_main"]:
                print(f"stopped by SIGTERM at step {summary['step']} of {summary['total_steps']}; checkpoint "
                      f"{summary['checkpoint']}; continue with --resume", file=sys.stderr)
            return EXIT_STOPPED_BY_SIGNAL
        if summary["is_main"]:
            print(f"trained {summary['step']} step{'' if summary['step'] == 1 else 's'} -> {summary['checkpoint']}")
        return 0
    return run


def _add_evaluate(sub: argparse._SubParsersAction) -> Callable:
    p = sub.add_parser("evaluate", help="full-softmax perplexity on heldout data",
                       description="Perplexity of the forward LM, the backward LM and their average (exp of the "
                                   "mean of the two mean losses, as bilm-tf reports). Stateful like training; every "
                                   "heldout token counts once. Rows concatenate sentences, so --batch-size changes "
                                   "which sentences precede which; --per-sentence resets the states at every "
                                   "sentence and depends on neither batch size nor unroll.")
    p.add_argument("--checkpoint", required=True, help="checkpoint file, or a run directory (its newest checkpoint)")
    p.add_argument("--data", required=True,
                   help="manifest.json (its heldout shards), or raw text files / a glob: tokenized with the model's "
                        "own pipeline (tokenizer and normalization, as bilm prepare made its training data)")
    p.add_argument("--pretokenized", action="store_true",
                   help="--data files are already tokenized: split them on whitespace, as given")
    p.add_argument("--batch-size", type=int, help="rows per batch (default: the training config's)")
    p.add_argument("--unroll", type=int, help="time steps per batch (default: the training config's); "
                                             "does not change the result")
    p.add_argument("--per-sentence", action="store_true", help="reset LSTM states at every sentence")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32, or bf16 autocast (faster where there are bf16 units; the softmax runs in fp32)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (nor the line saying how raw --data was tokenized)")

    def run(args: argparse.Namespace) -> int:
        import json
        import os
        from bilm.scoring.evaluate import evaluate
        from bilm.scoring.perplexity import figure, json_safe
        result = evaluate(args.checkpoint, args.data, args.batch_size, args.unroll, args.per_sentence, args.device,
                          pretokenized=args.pretokenized, precision=args.precision, progress=not args.no_progress)
        if int(os.environ.get("RANK", 0)) != 0:
            return 0
        if args.json:
            print(json.dumps(json_safe(result), indent=2))
        else:
            for d in ("forward", "backward"):
                r = result[d]
                print(f"{d:8s} perplexity {figure(r['perplexity'], '{:10.3f}'):>10s}  mean loss "
                      f"{figure(r['mean_loss'], '{:.4f}')}  ({r['tokens']} tokens, {r['unk_targets']} <UNK> targets)")
            print(f"average  perplexity {figure(result['average_perplexity'], '{:10.3f}'):>10s}  mean loss "
                  f"{figure(result['average_mean_loss'], '{:.4f}')}  ({result['checkpoint']})")
        if result["diverged_note"]:  # the figures stand; the line says what they mean
            print(f"warning: {result['diverged_note']}", file=sys.stderr)
        return 0
    return run


def _add_export(sub: argparse._SubParsersAction) -> Callable:
    p = sub.add_parser("export", help="checkpoint -> weights.hdf5 + options.json + vocab.txt (published ELMo format)",
                       description="Write the biLM in the published ELMo layout (what bilm-tf wrote and AllenNLP "
                                   "reads). States which consumers cannot load the result, if any.")
    p.add_argument("--checkpoint", required=True, help="checkpoint file, or a run directory (its newest checkpoint)")
    p.add_argument("--out", required=True, help="directory to write into")
    p.add_argument("--force", action="store_true", help="overwrite files already in --out")
    p.add_argument("--include-softmax", action="store_true", help="also write softmax.hdf5 (for --init-softmax)")
    p.add_argument("--strict", action="store_true", help="fail if any ELMo consumer could not load the result")
    p.add_argument("--best", action="store_true",
                   help="export the run's best checkpoint (lowest heldout perplexity, checkpoints/best.pt) instead "
                        "of its newest; --checkpoint is then the run directory")
    p.add_argument("--format", choices=["hdf5", "onnx"], default="hdf5",
                   help="onnx: also model.onnx, the stateless biLM for onnxruntime (needs the onnx extra)")

    def run(args: argparse.Namespace) -> int:
        import sys
        from bilm.commands.export import export
        if args.format == "onnx":
            from bilm.inference.onnx_export import check_onnx_target
            check_onnx_target(args.out, args.force)  # before anything is written
        result = export(args.checkpoint, args.out, args.force, args.include_softmax, args.strict, args.best)
        if args.format == "onnx":
            from bilm.inference.onnx_export import write_onnx
            from bilm.core.files import ONNX_FILE, OPTIONS_FILE, WEIGHTS_FILE
            write_onnx(os.path.join(args.out, OPTIONS_FILE), os.path.join(args.out, WEIGHTS_FILE),
                       os.path.join(args.out, ONNX_FILE), force=True)
            result["files"].append(ONNX_FILE)
        for problem in result["problems"]:
            print(f"warning: {problem}", file=sys.stderr)
        print(f"exported {result['checkpoint']} -> {args.out.rstrip('/')}/ ({', '.join(result['files'])})")
        return 0
    return run


def _add_export_onnx(sub: argparse._SubParsersAction) -> Callable:
    p = sub.add_parser("export-onnx", help="a biLM -> model.onnx (stateless, for onnxruntime without PyTorch)",
                       description="Write OUT/model.onnx: char ids (batch, steps, chars) in, the ELMo layers "
                                   "(batch, n_layers, steps, 2 * projection_dim) out, from zero LSTM states. "
                                   "options.json, tokenizer.json, sentencepiece.model and vocab.txt are copied "
                                   "beside it when OUT is not the model's own directory. Needs the onnx extra.")
    _add_model_arguments(p)
    p.add_argument("--out", required=True, help="directory to write model.onnx into (the model's own directory is fine)")
    p.add_argument("--force", action="store_true", help="overwrite files already in --out")

    def run(args: argparse.Namespace) -> int:
        from bilm.inference.onnx_export import check_onnx_target, export_onnx_dir
        check_onnx_target(args.out, args.force)
        options, weights = _model_files(args)
        written = export_onnx_dir(options, weights, args.out, args.force)
        print(f"exported {weights} -> {args.out.rstrip('/')}/ ({', '.join(written)})")
        return 0
    return run


def _add_score(sub: argparse._SubParsersAction) -> Callable:
    p = sub.add_parser("score", help="per-sentence (and per-token) log-probabilities and perplexity of text",
                       description="Score each line of --input with the language model: the log-probability "
                                   "(natural log, full softmax) and perplexity under the forward LM, the backward "
                                   "LM and their average, one JSON line per input line. Each line starts from "
                                   "zero states (as evaluate --per-sentence), so its score does not depend on "
                                   "the other lines. The totals (stderr) equal `bilm evaluate --per-sentence` "
                                   "on the same file.")
    p.add_argument("--model", "--checkpoint", dest="model", required=True,
                   help="a run directory or checkpoint, or an export directory with softmax.hdf5 "
                        "(bilm export --include-softmax)")
    p.add_argument("--input", required=True, help="text file, one sentence per line (raw text: the model's tokenizer)")
    p.add_argument("--out", default="-", help="JSON lines file to write (default: stdout)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--per-token", action="store_true", help="also each token's log-probability in both directions")
    p.add_argument("--pretokenized", action="store_true", help="split lines on whitespace instead of the model's tokenizer")
    p.add_argument("--batch-size", type=int, default=32, help="lines per batch (default 32; does not change the scores)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32, or bf16 autocast for the LSTMs (the softmax runs in fp32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(args: argparse.Namespace) -> int:
        import json
        from bilm.core.errors import not_utf8
        from bilm.inference.score import LanguageModelScorer, corpus_summary
        from bilm.scoring.perplexity import figure, json_safe
        if args.out != "-" and os.path.exists(args.out) and not args.force:
            raise FileExistsError(f"{args.out} already exists; pass --force to overwrite it")
        try:
            with open(args.input, encoding="utf-8") as f:
                lines = [line.rstrip("\n") for line in f]
        except UnicodeDecodeError:
            raise InputError(not_utf8(args.input)) from None
        scorer = LanguageModelScorer(args.model, args.device, args.batch_size, args.precision, args.pretokenized)
        import contextlib
        from bilm.core.atomic import atomic_open
        records = []
        # The file appears whole when every line is scored (nothing half-written under its name).
        with (contextlib.nullcontext(sys.stdout) if args.out == "-" else atomic_open(args.out)) as out:
            for record in scorer.iter_scores(lines, args.per_token, progress=not args.no_progress, total=len(lines)):
                out.write(json.dumps(json_safe(record), ensure_ascii=False) + "\n")
                records.append(record)
        summary = corpus_summary(records)
        if summary["predictions"]:
            print(f"scored {summary['lines']} lines ({summary['predictions']} predictions a direction, "
                  f"{summary['unk_targets']} <UNK> targets): perplexity forward "
                  f"{figure(summary['forward']['perplexity'])}, backward {figure(summary['backward']['perplexity'])}, "
                  f"average {figure(summary['average_perplexity'])}", file=sys.stderr)
        else:
            print(f"scored {summary['lines']} line{'' if summary['lines'] == 1 else 's'}: no tokens in "
                  f"{args.input} (empty, or blank lines only)", file=sys.stderr)
        warning = scorer.health_line(summary)
        if warning:  # the scores stand; the line says what they mean
            print(f"warning: {warning}", file=sys.stderr)
        return 0
    return run


def _add_probe(sub: argparse._SubParsersAction) -> Callable:
    p = sub.add_parser("probe", help="what the vectors are worth: small heads trained on frozen biLM vectors",
                       description="Freeze the biLM, train a small head on its vectors for each layer setting and "
                                   "seed, and print the test score (mean ± standard deviation over the seeds, and "
                                   "every run). Epochs are chosen on a dev split carved from --train, never on "
                                   "--test. The vectors of a model and a file are computed once and cached.")
    _add_model_arguments(p)
    p.add_argument("--checkpoint", help="probe a training run before export: a checkpoint file, or a run directory "
                                        "(its newest checkpoint, or with --best its best.pt)")
    p.add_argument("--best", action="store_true", help="with a run directory as --checkpoint: its best.pt")
    p.add_argument("--every-checkpoint", action="store_true",
                   help="with a run directory as --checkpoint: probe every kept checkpoint and best.pt, one table "
                        "(and JSON, PNG) of the score against the step beside the heldout perplexity the run logged")
    p.add_argument("--task", required=True, choices=["classify", "tag"],
                   help="classify: each line label<TAB>text (other layouts: --label-column, --text-column; a "
                        ".csv file is read as CSV; a header line such as label<TAB>sentence is skipped); tag: CoNLL-U or whitespace-separated "
                        "columns (token first, tag in --tag-column), a blank line after each sentence")
    p.add_argument("--train", required=True, help="labelled training file (a dev split is carved from it)")
    p.add_argument("--test", required=True, help="labelled test file (scored once per head; never chooses anything)")
    p.add_argument("--dev", help="a labelled dev file instead of the split carved from --train")
    p.add_argument("--tag-column", type=int,
                   help="tag: the tag's column, counted from 1 (default: UPOS, 4, for CoNLL-U; else the last column)")
    p.add_argument("--label-column", type=int,
                   help="classify: the label's tab-separated column, counted from 1 (default 1: label<TAB>text; 2 "
                        "for text<TAB>label files such as GLUE's)")
    p.add_argument("--text-column", type=int,
                   help="classify: the text's column, counted from 1 (default: the last column other than the "
                        "label's)")
    p.add_argument("--pretokenized", action="store_true",
                   help="split texts (and read tagged tokens) as they are, instead of with the model's tokenizer")
    p.add_argument("--layers", default="mix,0",
                   help="comma list of settings: mix (a learned scalar mix of all layers with its scale gamma, "
                        "trained with the head), 0 (the context-free token layer), 1, 2, ..., top, average "
                        "(default: mix,0)")
    p.add_argument("--control", choices=["random"],
                   help="random: the same settings for a biLM of the same shape with the random weights a training "
                        "run starts from (a probe learns a lot from random features)")
    p.add_argument("--head", choices=["linear", "mlp", "cnn"], default="linear",
                   help="linear (default; classification on mean- and max-pooled vectors, tagging per token), mlp "
                        "(one hidden layer), cnn (the article's Conv1D classifier)")
    p.add_argument("--seeds", type=int, default=3, help="heads trained per setting, seeds 0..N-1 (default 3)")
    p.add_argument("--epochs", type=int, default=40, help="at most this many epochs per head (default 40)")
    p.add_argument("--patience", type=int, default=3,
                   help="stop after this many epochs without a better dev score; the best epoch is kept (default 3)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate for the heads (default 0.001)")
    p.add_argument("--dev-fraction", type=float, default=0.1,
                   help="fraction of --train held out as the dev split (default 0.1)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the dev split and of --max-train (default 0)")
    p.add_argument("--max-train", type=int, metavar="N",
                   help="use a fixed random sample of N examples of --train (the output says so)")
    p.add_argument("--cache-dir", help="where the vectors are cached (default: $BILM_CACHE/probe, "
                                       "~/.cache/bilm/probe)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached vectors")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--plot", metavar="FILE.png",
                   help="draw the settings with error bars (with --every-checkpoint: the score against the step); "
                        "needs the plot extra (matplotlib)")
    p.add_argument("--force", action="store_true", help="overwrite --json / --plot files that exist")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="of the embedding pass: fp32 or bf16")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per batch of the embedding pass (default 64)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N, for the embedding pass (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    def run(args: argparse.Namespace) -> int:
        from bilm.evaluation.across_run import probe_run
        from bilm.evaluation.probe import ProbeConfig, Prober, Task, probe_model
        from bilm.evaluation.report import format_step_table, plot_settings, plot_steps, require_matplotlib, table, \
            write_json
        from bilm.evaluation.vectors import default_cache_dir, model_from_checkpoint, model_from_files, random_control
        if args.checkpoint and (args.model or args.options or args.weights):
            raise InputError("give --checkpoint, or --model, or --options and --weights: one model")
        if (args.best or args.every_checkpoint) and not args.checkpoint:
            raise InputError("--best and --every-checkpoint go with --checkpoint RUN_DIR")
        if args.best and args.every_checkpoint:
            raise InputError("--every-checkpoint already probes best.pt: drop --best")
        for path in (args.json, args.plot):
            if path and os.path.exists(path) and not args.force:
                raise FileExistsError(f"{path} already exists; pass --force to overwrite it")
        if args.plot:
            require_matplotlib()  # before any work: a missing extra is one line, not a lost run
        if args.cache_dir and args.no_cache:
            raise InputError("give --cache-dir or --no-cache, not both")
        if args.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
        cache = None if args.no_cache else args.cache_dir or default_cache_dir()
        config = ProbeConfig(args.task, args.head, args.seeds, args.epochs, args.patience, args.lr, args.dev_fraction,
                             args.split_seed, args.max_train, args.tag_column, args.label_column, args.text_column)
        task = Task(args.train, args.test, config, args.dev)  # the files are checked before a model is loaded
        for warning in task.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        prober = Prober(task, cache, args.pretokenized, args.precision, args.device, args.batch_size,
                        progress=not args.no_progress)
        if args.every_checkpoint:
            report = probe_run(args.checkpoint, task, prober, lambda n_layers: _probe_settings(args, n_layers))
            print(format_step_table(report))
            plot = plot_steps
        else:
            model = (model_from_checkpoint(args.checkpoint, best=args.best) if args.checkpoint
                     else model_from_files(*_model_files(args)))
            settings = _probe_settings(args, model.n_layers)
            control = random_control(model) if args.control else None
            report = probe_model(model, task, prober, settings, control)
            print(table(report))
            plot = plot_settings
        if args.json:
            write_json(args.json, report)
            print(f"wrote {args.json}")
        if args.plot:
            plot(args.plot, report)
            print(f"wrote {args.plot}")
        return 0
    return run


def _probe_settings(args: argparse.Namespace, n_layers: int) -> list:
    """--layers (and with --control random the same again for the control) for a biLM of ``n_layers``."""
    from bilm.evaluation.heads import parse_settings
    settings = parse_settings(args.layers, n_layers)
    return settings + (parse_settings(args.layers, n_layers, random=True) if args.control == "random" else [])


def _add_import_bilmtf(sub: argparse._SubParsersAction) -> Callable:
    p = sub.add_parser("import-bilm-tf", help="bilm-tf training run (TensorFlow checkpoint) -> bilm checkpoint",
                       description="Read the newest checkpoint of a bilm-tf train() run (no TensorFlow needed) and "
                                   "write a bilm run directory: checkpoints/step-N.pt (weights, softmax, Adagrad "
                                   "accumulators) and config.yaml (bilm-tf's training options). Then `bilm "
                                   "evaluate`, `bilm export --include-softmax`, or `bilm train --config "
                                   "OUT/config.yaml --out OUT --resume` to continue the run.")
    p.add_argument("--tf-save-dir", required=True,
                   help="bilm-tf save_dir: holds 'checkpoint', options.json and model.ckpt-N.*")
    p.add_argument("--vocab", required=True, help="the vocab file the bilm-tf run was trained with")
    p.add_argument("--out", required=True, help="bilm run directory to write")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the written config, e.g. --set train.device=cpu (repeatable)")
    p.add_argument("--force", action="store_true", help="write even if --out already holds checkpoints")

    def run(args: argparse.Namespace) -> int:
        from bilm.commands.import_bilmtf import import_bilmtf
        result = import_bilmtf(args.tf_save_dir, args.vocab, args.out, args.overrides, args.force)
        print(f"imported {result['source']} (step {result['step']}) -> {result['checkpoint']}; "
              f"config {result['config']}")
        return 0
    return run


def _add_convert_checkpoint(sub: argparse._SubParsersAction) -> Callable:
    p = sub.add_parser("convert-checkpoint", help="rewrite checkpoints of an older bilm in the safe format",
                       description="bilm reads checkpoints with torch's safe loader (weights_only=True), which "
                                   "refuses format 1 (bilm before it: numpy RNG states inside). This rewrites such "
                                   "files as format 2, in place and atomically; it reads them with numpy's array "
                                   "types as the only addition to the safe set, so no code a file names runs.")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="checkpoint file, or a run directory (all its checkpoints)")

    def run(args: argparse.Namespace) -> int:
        import os
        from bilm.runs.checkpoint import CheckpointError, OLD_FORMAT, convert_checkpoint
        from bilm.runs.run_dir import list_checkpoints
        files = []
        for path in args.paths:
            if os.path.isdir(path):
                directory = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) \
                    else path
                found = list_checkpoints(directory)
                if not found:
                    raise FileNotFoundError(f"no checkpoints in {directory}")
                files += found
            else:
                files.append(path)
        for path in files:
            try:
                convert_checkpoint(path)
                print(f"converted {path} ({OLD_FORMAT} -> safe format)")
            except CheckpointError as e:
                if "nothing to convert" not in str(e):
                    raise
                print(f"{path}: already in the safe format")
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
    for name, add in (("prepare", _add_prepare), ("train", _add_train), ("evaluate", _add_evaluate),
                      ("export", _add_export), ("embed", _add_embed),
                      ("dump-token-embeddings", _add_dump_token_embeddings),
                      ("export-onnx", _add_export_onnx), ("score", _add_score), ("probe", _add_probe),
                      ("import-bilm-tf", _add_import_bilmtf), ("convert-checkpoint", _add_convert_checkpoint)):
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
    from bilm.core.logs import setup_logging
    setup_logging()
    warnings.formatwarning = _format_warning
    # Not evaluate: its tensors vary in size from batch to batch (the last softmax chunk, the
    # distinct tokens of the char CNN), and a heap that is never trimmed fragments, for no speed
    # (docs/measurements.md, "malloc").
    if args.command in ("train", "embed"):
        from bilm.core.malloc import keep_freed_memory
        keep_freed_memory()  # large tensors every step: reuse their memory (see bilm/core/malloc.py)
    try:
        return handlers[args.command](args) or 0
    except (BilmError, OSError) as e:
        # What the user gave cannot be used, or the system refused: one line, no traceback.
        # Anything else (a plain ValueError, KeyError, ...) is a bug in bilm: it keeps its traceback.
        print(f"bilm {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1


_PYTHON_FORMAT_WARNING = warnings.formatwarning
_BILM_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """bilm's own warnings as the CLI's other messages ("warning: ..."): the source line that Python
    prints with them means nothing to a user. Other libraries' keep Python's format."""
    if os.path.abspath(filename).startswith(_BILM_DIR):
        return f"warning: {message}\n"
    return _PYTHON_FORMAT_WARNING(message, category, filename, lineno, line)


def _one_line(error: Exception) -> str:
    """A missing or existing file and bilm's own errors: their message (it names the file). Other
    OS errors (a full disk, a read-only --out, a permission): the file and the reason."""
    if isinstance(error, OSError) and not isinstance(error, (FileNotFoundError, FileExistsError)):
        return f"{str(error.filename) + ': ' if error.filename else ''}{error.strerror or error}"
    return str(error)


if __name__ == "__main__":
    sys.exit(main())
