"""``bilm export``: a checkpoint -> ``weights.hdf5`` + ``options.json`` + ``vocab.txt`` (the published
ELMo format), and the reverse, ``load_pretrained``, for continued pretraining (``--init-weights``)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import NamedTuple, Optional

import h5py
import torch

from bilm.checkpoint import CheckpointError, load_checkpoint, load_latest_valid, load_model_state
from bilm.config import Config, config_from_dict
from bilm.model import LanguageModel
from bilm.options import BiLMOptions
from bilm.weights import WeightFileError, load_weights, save_weights
from data_tools.normalize import SP_MODEL_FILE, TOKENIZER_FILE, TextPipeline

SOFTMAX_WEIGHT, SOFTMAX_BIAS = "softmax/W", "softmax/b"


def resolve_checkpoint(path: str) -> tuple[str, dict]:
    """A checkpoint file, or a run directory (its newest valid checkpoint)."""
    if os.path.isdir(path):
        directory = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
        found, payload = load_latest_valid(directory)
        if payload is None:
            raise FileNotFoundError(f"no readable checkpoint in {directory}")
        return found, payload
    return path, load_checkpoint(path)


class Trained(NamedTuple):
    model: LanguageModel          # eval mode, CPU
    config: Config
    vocab: list[str]
    path: str                     # the checkpoint file it came from
    text_pipeline: Optional[TextPipeline]  # how raw text became its training tokens; None: not recorded


def model_from_checkpoint(path: str) -> Trained:
    """The trained ``LanguageModel``, its config, vocab and text pipeline, from a checkpoint or run directory."""
    found, payload = resolve_checkpoint(path)
    cfg = config_from_dict(payload["config"])
    vocab = payload.get("vocab")
    if vocab is None:
        raise CheckpointError(f"{found}: checkpoint has no vocabulary")
    model = LanguageModel(cfg.model, len(vocab), dropout=0.0, lstm_impl=cfg.train.lstm_impl, sparse_softmax=False)
    load_model_state(model, payload["model"], found)
    pipeline = payload.get("text_pipeline")
    return Trained(model.eval(), cfg, vocab, found, TextPipeline.from_state(pipeline) if pipeline else None)


def consumer_problems(options: BiLMOptions) -> list[str]:
    """Why AllenNLP's ELMo loader (and tools built on it) would refuse these weights."""
    problems = []
    if options.char_cnn is None:
        problems.append("word-input model (no char_cnn): AllenNLP's Elmo and bilm-tf's char embedder need a char CNN")
        return problems
    if not options.lstm.use_skip_connections:
        problems.append("lstm.use_skip_connections is false: AllenNLP requires true")
    if options.char_cnn.n_filters == options.projection_dim:
        problems.append(f"char_cnn filters total {options.char_cnn.n_filters} == projection_dim: no CNN_proj is "
                        "written, and AllenNLP always reads CNN_proj/*")
    if options.lstm.dim == options.projection_dim:
        problems.append("lstm.dim == lstm.projection_dim: no W_P_0 is written, and AllenNLP always reads it")
    if options.char_cnn.max_characters_per_token != 50:
        problems.append(f"char_cnn.max_characters_per_token is {options.char_cnn.max_characters_per_token}: "
                        "AllenNLP's character indexer assumes 50")
    return problems


def export(checkpoint: str, out_dir: str, force: bool = False, include_softmax: bool = False,
           strict: bool = False) -> dict:
    """Write the published files into ``out_dir``; returns what was written and any consumer problems."""
    model, cfg, vocab, found, pipeline = model_from_checkpoint(checkpoint)
    options = cfg.model
    problems = consumer_problems(options)
    if problems and strict:
        raise ValueError("--strict: these weights would not load everywhere:\n  " + "\n  ".join(problems))
    names = ["weights.hdf5", "options.json", "vocab.txt"] + (["softmax.hdf5"] if include_softmax else [])
    if pipeline is not None:
        names += [TOKENIZER_FILE] + ([SP_MODEL_FILE] if pipeline.tokenizer == "sentencepiece" else [])
    # A tokenizer left by an earlier export of another model would be applied to this one: replace it too.
    stale = [n for n in (TOKENIZER_FILE, SP_MODEL_FILE) if n not in names and os.path.exists(os.path.join(out_dir, n))]
    existing = [n for n in names if os.path.exists(os.path.join(out_dir, n))] + stale
    if existing and not force:
        raise FileExistsError(f"{out_dir} already holds {', '.join(existing)}; pass --force to overwrite")
    os.makedirs(out_dir, exist_ok=True)
    # Write everything into a temporary directory beside the target, then move: no half export.
    staging = tempfile.mkdtemp(prefix=".export-", dir=out_dir)
    try:
        save_weights(model.bilm, os.path.join(staging, "weights.hdf5"))
        with open(os.path.join(staging, "options.json"), "w", encoding="utf-8") as f:
            json.dump(options.to_dict(), f, indent=2)
        with open(os.path.join(staging, "vocab.txt"), "w", encoding="utf-8") as f:
            f.write("".join(f"{t}\n" for t in vocab))
        if pipeline is not None:  # the tokenizer travels with the model (AllenNLP ignores these files)
            pipeline.save(staging)
        if include_softmax:
            with h5py.File(os.path.join(staging, "softmax.hdf5"), "w") as f:
                f.create_dataset(SOFTMAX_WEIGHT, data=model.softmax.weight.detach().numpy())
                f.create_dataset(SOFTMAX_BIAS, data=model.softmax.bias.detach().numpy())
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
        for name in stale:
            os.remove(os.path.join(out_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"checkpoint": found, "out_dir": out_dir, "files": names, "problems": problems,
            "text_pipeline": pipeline}


def _read_vocab(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t")[0] for line in f if line.strip()]


def load_pretrained(model: LanguageModel, weight_file: str, options_file: Optional[str] = None,
                    softmax_file: Optional[str] = None, softmax_vocab_file: Optional[str] = None,
                    vocab: Optional[list[str]] = None) -> dict:
    """Start ``model`` from published weights: char CNN, highway, projection and both LSTM stacks.

    The softmax is loaded from ``softmax_file`` when given, else left freshly initialized. When the
    training vocabulary differs from the one the softmax was trained with (``softmax_vocab_file``),
    rows are matched by token and new tokens keep their fresh rows.
    """
    if options_file is not None:
        published = BiLMOptions.from_file(options_file).to_dict()
        ours = model.options.to_dict()
        for d in (published, ours):
            d.get("char_cnn", {}).pop("n_characters", None)
            d.pop("n_tokens_vocab", None)
        if published != ours:
            raise ValueError(f"{options_file} describes another architecture than the model being trained "
                             f"({_dict_diff(published, ours)})")
    load_weights(model.bilm, weight_file)
    report = {"weights": weight_file, "softmax_rows_loaded": 0}
    if softmax_file is None:
        return report
    try:
        f = h5py.File(softmax_file, "r")
    except OSError as e:
        raise WeightFileError(f"{softmax_file} is not a readable HDF5 file ({e})") from None
    with f:
        for name in (SOFTMAX_WEIGHT, SOFTMAX_BIAS):
            if name not in f:
                raise WeightFileError(f"{softmax_file}: missing dataset '{name}'")
        weight, bias = f[SOFTMAX_WEIGHT][...], f[SOFTMAX_BIAS][...]
    if weight.shape[1] != model.softmax.dim or bias.shape != (weight.shape[0],):
        raise WeightFileError(f"{softmax_file}: '{SOFTMAX_WEIGHT}' {weight.shape} / '{SOFTMAX_BIAS}' {bias.shape} "
                              f"do not fit projection_dim {model.softmax.dim}")
    with torch.no_grad():
        if softmax_vocab_file is None or vocab is None:
            if weight.shape[0] != model.softmax.vocab_size:
                raise WeightFileError(f"{softmax_file}: {weight.shape[0]} rows, the training vocabulary has "
                                      f"{model.softmax.vocab_size}; pass the vocab the softmax was trained with")
            model.softmax.weight.copy_(torch.from_numpy(weight))
            model.softmax.bias.copy_(torch.from_numpy(bias))
            report["softmax_rows_loaded"] = weight.shape[0]
        else:
            old_row = {t: i for i, t in enumerate(_read_vocab(softmax_vocab_file))}
            if len(old_row) != weight.shape[0]:
                raise WeightFileError(f"{softmax_vocab_file} has {len(old_row)} tokens, {softmax_file} has "
                                      f"{weight.shape[0]} rows")
            pairs = [(i, old_row[t]) for i, t in enumerate(vocab) if t in old_row]
            if pairs:
                new, old = (torch.tensor(x) for x in zip(*pairs))
                model.softmax.weight[new] = torch.from_numpy(weight)[old]
                model.softmax.bias[new] = torch.from_numpy(bias)[old]
            report["softmax_rows_loaded"] = len(pairs)
    return report


def _dict_diff(a: dict, b: dict, prefix: str = "") -> str:
    diffs = []
    for key in sorted(set(a) | set(b)):
        where = f"{prefix}{key}"
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            inner = _dict_diff(a[key], b[key], where + ".")
            if inner:
                diffs.append(inner)
        elif a.get(key) != b.get(key):
            diffs.append(f"{where}: file {a.get(key)!r} vs model {b.get(key)!r}")
    return "; ".join(diffs)
