"""Import a bilm-tf training run: its TensorFlow checkpoint becomes a bilm checkpoint, without TensorFlow.

``bilm import-bilm-tf --tf-save-dir SAVE_DIR --vocab vocab.txt --out RUN_DIR`` reads the newest
checkpoint of a bilm-tf ``train()`` run (the ``save_dir`` holding ``checkpoint``, ``options.json``
and ``model.ckpt-N.*``) and writes ``RUN_DIR/checkpoints/step-N.pt`` and ``RUN_DIR/config.yaml``:
the weights, the softmax and the Adagrad accumulators, with the training settings of bilm-tf's
``options.json``. Then ``bilm evaluate --checkpoint RUN_DIR`` scores it with bilm's evaluator,
``bilm export --include-softmax`` writes ``weights.hdf5`` (identical to bilm-tf's
``dump_weights``) plus ``softmax.hdf5``, and ``bilm train --config RUN_DIR/config.yaml --out RUN_DIR
--resume`` continues the run in bilm with the optimizer state it had.

The checkpoint is read directly: TensorFlow's V2 format is an index file (a LevelDB-style table of
tensor name -> dtype, shape, offset) and a data file of raw little-endian tensors.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import torch

from bilm.core.errors import InputError
from bilm.core.vocab import Vocabulary
from bilm.formats.bilmtf import config_from_bilmtf_options, latest_tf_checkpoint, read_tf_checkpoint, split_tensors
from bilm.modules.tf_checkpoint import load_bilmtf_state
from bilm.runs.checkpoint import checkpoint_payload, save_checkpoint
from bilm.runs.lock import RunLock
from bilm.runs.run_dir import checkpoint_path, list_checkpoints
from bilm.runs.config import config_from_dict, config_to_dict, save_config
from bilm.runs.model_builder import build_model
from bilm.training.optimizers import build_optimizer


def import_bilmtf(save_dir: str, vocab_file: str, out_dir: str, overrides: Sequence[str] = (),
                  force: bool = False) -> dict:
    """Write ``out_dir/checkpoints/step-N.pt`` and ``out_dir/config.yaml`` from a bilm-tf save_dir."""
    options_path = os.path.join(save_dir, "options.json")
    try:
        with open(options_path, encoding="utf-8") as f:
            options = json.load(f)
    except OSError as e:
        raise FileNotFoundError(f"{options_path}: cannot read ({e.strerror}); is {save_dir} a bilm-tf save_dir?") from None
    except ValueError as e:  # not JSON, not UTF-8
        raise InputError(f"{options_path}: not a JSON options file ({e})") from None
    prefix = latest_tf_checkpoint(save_dir)
    weights, accumulators, step = split_tensors(read_tf_checkpoint(prefix))
    cfg = config_from_dict(config_from_bilmtf_options(options), where=options_path, overrides=overrides)
    vocab = Vocabulary.from_file(vocab_file)
    if options.get("n_tokens_vocab") not in (None, len(vocab)):
        raise InputError(f"{vocab_file} has {len(vocab)} tokens, {options_path} says n_tokens_vocab "
                         f"{options['n_tokens_vocab']}: give the vocab the run was trained with")

    ckpt_dir = os.path.join(out_dir, "checkpoints")
    with RunLock(out_dir):  # not while a bilm train writes into the same directory
        return _write_import(cfg, vocab, weights, accumulators, step, prefix, out_dir, ckpt_dir, force)


def _write_import(cfg, vocab, weights, accumulators, step, prefix, out_dir, ckpt_dir, force) -> dict:
    if list_checkpoints(ckpt_dir) and not force:
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints; pass --force to add the imported one")
    torch.manual_seed(0)
    model = build_model(cfg, len(vocab))
    optimizer = build_optimizer(cfg, model)
    load_bilmtf_state(model, optimizer, weights, accumulators, step, prefix)
    os.makedirs(ckpt_dir, exist_ok=True)
    save_config(cfg, os.path.join(out_dir, "config.yaml"))
    path = checkpoint_path(ckpt_dir, step)
    # No rank states: a resumed run starts its data order and LSTM states afresh, as bilm-tf's restart does.
    save_checkpoint(checkpoint_payload(step, config_to_dict(cfg), model.state_dict(), vocab.tokens,
                                       optimizer.state_dict(), imported_from=prefix), path)
    return {"checkpoint": path, "step": step, "source": prefix, "config": os.path.join(out_dir, "config.yaml")}
