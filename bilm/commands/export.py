"""``bilm export``: a checkpoint -> ``weights.hdf5`` + ``options.json`` + ``vocab.txt`` (the published
ELMo format), with the tokenizer beside them. The reverse, for continued pretraining, is
``bilm.runs.trained_model.load_pretrained``."""
from __future__ import annotations

import json
import os
import shutil

import h5py

from bilm.core.atomic import fsync_path, remove_stale, temporary_name
from bilm.core.errors import InputError
from bilm.core.finite import non_finite_weights
from bilm.core.options import BiLMOptions
from bilm.formats.weights import SOFTMAX_BIAS, SOFTMAX_WEIGHT
from bilm.modules.weight_file import save_weights
from bilm.runs.trained_model import model_from_checkpoint
from bilm.core.files import (OPTIONS_FILE, SOFTMAX_FILE, SP_MODEL_FILE, TOKENIZER_FILE, VOCAB_FILE,
                             WEIGHTS_FILE)

STAGING = ".export"  # the staging directory inside --out: .export.tmpPID


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
           strict: bool = False, best: bool = False) -> dict:
    """Write the published files into ``out_dir``; returns what was written and any consumer problems.
    ``best``: the run's ``best.pt`` (lowest heldout perplexity) instead of its newest checkpoint."""
    model, cfg, vocab, found, pipeline = model_from_checkpoint(checkpoint, best=best)
    options = cfg.model
    problems = consumer_problems(options)
    non_finite = non_finite_weights(model)
    if non_finite:  # a diverged run's checkpoint: the files are written (the user asked), but not silently
        problems.append(f"the weights hold {non_finite}: vectors and scores computed from them will be NaN or inf")
    if problems and strict:
        raise InputError("--strict: these weights would not load everywhere:\n  " + "\n  ".join(problems))
    names = [WEIGHTS_FILE, OPTIONS_FILE, VOCAB_FILE] + ([SOFTMAX_FILE] if include_softmax else [])
    if pipeline is not None:
        names += [TOKENIZER_FILE] + ([SP_MODEL_FILE] if pipeline.tokenizer == "sentencepiece" else [])
    # A tokenizer left by an earlier export of another model would be applied to this one: replace it too.
    stale = [n for n in (TOKENIZER_FILE, SP_MODEL_FILE) if n not in names and os.path.exists(os.path.join(out_dir, n))]
    existing = [n for n in names if os.path.exists(os.path.join(out_dir, n))] + stale
    if existing and not force:
        raise FileExistsError(f"{out_dir} already holds {', '.join(existing)}; pass --force to overwrite")
    os.makedirs(out_dir, exist_ok=True)
    # Everything is written into a staging directory inside the target and flushed to disk, then
    # moved in with options.json last, and an old options.json removed first: a consumer needs
    # options.json, so a kill at any moment leaves the previous export, the new one, or no loadable
    # model; never new weights read with old options. A killed export's staging directory is
    # removed by the next one.
    base = os.path.join(out_dir, STAGING)
    remove_stale(base)
    staging = temporary_name(base)
    os.makedirs(staging)
    try:
        save_weights(model.bilm, os.path.join(staging, WEIGHTS_FILE))
        with open(os.path.join(staging, OPTIONS_FILE), "w", encoding="utf-8") as f:
            json.dump(options.to_dict(), f, indent=2)
        with open(os.path.join(staging, VOCAB_FILE), "w", encoding="utf-8") as f:
            f.write("".join(f"{t}\n" for t in vocab))
        if pipeline is not None:  # the tokenizer travels with the model (AllenNLP ignores these files)
            pipeline.save(staging)
        if include_softmax:
            with h5py.File(os.path.join(staging, SOFTMAX_FILE), "w") as f:
                f.create_dataset(SOFTMAX_WEIGHT, data=model.softmax.weight.detach().numpy())
                f.create_dataset(SOFTMAX_BIAS, data=model.softmax.bias.detach().numpy())
        fsync_path(staging)
        if os.path.exists(os.path.join(out_dir, OPTIONS_FILE)):
            os.remove(os.path.join(out_dir, OPTIONS_FILE))
        for name in stale:
            os.remove(os.path.join(out_dir, name))
        for name in sorted(names, key=lambda n: n == OPTIONS_FILE):
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
        fsync_path(out_dir, recursive=False)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"checkpoint": found, "out_dir": out_dir, "files": names, "problems": problems,
            "text_pipeline": pipeline}
