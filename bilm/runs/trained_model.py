"""A run's checkpoint as the trained model (``bilm evaluate``, ``bilm export``, ``bilm score``)."""
from __future__ import annotations

import glob
import os
from typing import NamedTuple, Optional

import torch

from bilm.runs.checkpoint import CheckpointError, load_checkpoint, load_model_state
from bilm.runs.run_dir import BEST_NAME, best_checkpoint_path, load_latest_valid
from bilm.runs.config import Config, config_from_dict
from bilm.core.errors import InputError
from bilm.modules.language_model import LanguageModel
from bilm.runs.model_builder import build_model
from bilm.core.text import TextPipeline

def resolve_checkpoint(path: str, mmap: bool = False, best: bool = False) -> tuple[str, dict]:
    """A checkpoint file, or a run directory (its newest valid checkpoint, or with ``best`` its
    ``best.pt``: the lowest heldout perplexity); ``mmap`` as in ``load_checkpoint``."""
    if best and not os.path.isdir(path):
        raise InputError(f"--best takes a run directory (it exports RUN/checkpoints/{BEST_NAME}), got the file {path}")
    if os.path.isdir(path):
        directory = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
        if best:
            found = best_checkpoint_path(directory)
            if not os.path.exists(found):
                raise FileNotFoundError(f"no {BEST_NAME} in {directory}: it is written at a checkpoint with the lowest "
                                        "heldout perplexity so far, so the run needs heldout data (see --eval-data)")
            return found, load_checkpoint(found, mmap=mmap)
        found, payload = load_latest_valid(directory, mmap=mmap)
        if payload is None:
            # A run stopped by the divergence guard before its first checkpoint has only its diverged state.
            diverged = sorted(glob.glob(os.path.join(directory, "diverged-step-*.pt")))
            hint = (f" (the run diverged: its state is in {diverged[-1]}; pass that file to look at it)"
                    if diverged else "")
            raise FileNotFoundError(f"no readable checkpoint in {directory}{hint}")
        return found, payload
    return path, load_checkpoint(path, mmap=mmap)


class Trained(NamedTuple):
    model: LanguageModel          # eval mode, CPU
    config: Config
    vocab: list[str]
    path: str                     # the checkpoint file it came from
    text_pipeline: Optional[TextPipeline]  # how raw text became its training tokens; None: not recorded


def model_from_checkpoint(path: str, best: bool = False) -> Trained:
    """The trained ``LanguageModel``, its config, vocab and text pipeline, from a checkpoint or run directory.

    The weights stay one copy, mapped from the checkpoint file: the model is built on the meta
    device and takes the checkpoint's tensors, and the optimizer state (as large as the model
    with Adagrad) is never read (loading the file and then copying it into a fresh model held
    several copies: docs/measurements.md, "checkpoint-model")."""
    found, payload = resolve_checkpoint(path, mmap=True, best=best)
    try:
        cfg = config_from_dict(payload["config"], where=f"{found} (its config)")
    except ValueError as e:
        raise CheckpointError(str(e).replace("\n", "; ")) from None
    vocab = payload.get("vocab")
    if not isinstance(vocab, list) or not all(isinstance(t, str) for t in vocab):
        raise CheckpointError(f"{found}: checkpoint has no vocabulary (key 'vocab': a list of tokens)")
    with torch.device("meta"):
        model = build_model(cfg, len(vocab), training=False)
    load_model_state(model, {k: v.float() if v.is_floating_point() else v for k, v in payload["model"].items()},
                     found, assign=True)
    state = payload.get("text_pipeline")
    try:
        pipeline = TextPipeline.from_state(state) if state else None
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{found}: its text pipeline does not load ({e})") from None
    return Trained(model.eval(), cfg, vocab, found, pipeline)
