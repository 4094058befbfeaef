"""``bilm evaluate``: full-softmax perplexity of the forward LM, the backward LM and their average.

Stateful like training: each batch row carries its LSTM states across batches, every
heldout token is predicted exactly once (the final partial batch is masked, not dropped).
Because rows concatenate sentences, the batch size decides which sentences precede which
and so changes the result slightly; ``per_sentence`` resets the states at every sentence,
making the result independent of batch size and unroll length.
"""
from __future__ import annotations

import os
import sys
import tempfile
import warnings
from typing import Optional

import torch

from bilm.core.errors import InputError
from bilm.data import LMDataset, resolve_shards
from bilm.core.distributed import DistEnv, all_reduce_sum, init_distributed, shutdown, to_device
from bilm.core.precision import autocast, check_precision
from bilm.runs.trained_model import model_from_checkpoint
from bilm.core.progress import progress_bar
from bilm.modules.language_model import DIRECTIONS, LanguageModel, reset_state_rows
from bilm.core.vocab import Vocabulary
from bilm.core.finite import non_finite_note
from bilm.runs.config import DIVERGENCE_LOSS_FACTOR
from bilm.scoring.perplexity import diverged_directions, diverged_line, perplexity as loss_perplexity
from bilm.core.text import TextPipeline, warn_suspicious_lines


@torch.no_grad()
def perplexity(model: LanguageModel, dataset: LMDataset, device: torch.device, progress: bool = True) -> dict:
    """Sums over this process's share of ``dataset``: NLL, token and <UNK>-target counts per direction."""
    model.eval()
    unk = dataset.vocab.unk_id
    sums = {f"{d}/{k}": 0.0 for d in DIRECTIONS for k in ("nll", "tokens", "unk")}
    state = None
    with progress_bar(total=dataset.count_targets() if progress else None, disable=not progress, unit="token",
                      unit_scale=True, desc="evaluate") as bar:
        for batch in dataset:
            batch = to_device(batch, device)
            state = reset_state_rows(state, batch["reset_state"])
            losses, state = model.evaluate(batch, state)
            for d in DIRECTIONS:
                sums[f"{d}/nll"] += float(losses[d].loss_sum)
                sums[f"{d}/tokens"] += float(losses[d].count)
                b = batch[d]
                sums[f"{d}/unk"] += float(((b["next_token_ids"] == unk) & b["mask"]).sum())
            bar.update(float(losses[DIRECTIONS[0]].count))
    return sums


def score(model: LanguageModel, dataset: LMDataset, env: DistEnv, precision: str = "fp32",
          progress: bool = False) -> dict:
    """Full-softmax perplexity of ``model`` on ``dataset``: every rank scores its share and the sums
    are all-reduced, so each rank returns the figures of the whole data (``summarize``'s form).
    ``bilm evaluate`` and the heldout evaluation during training both call this."""
    with autocast(env.device, precision):
        sums = perplexity(model, dataset, env.device, progress and env.is_main)
    keys = sorted(sums)
    return summarize(dict(zip(keys, all_reduce_sum([sums[k] for k in keys], env))))


def summarize(sums: dict) -> dict:
    """Per direction: perplexity, mean loss, tokens and <UNK> targets; the average perplexity and its
    mean loss. A diverged model's perplexity is ``inf`` (``bilm.scoring.perplexity``), never an error."""
    out = {}
    for d in DIRECTIONS:
        mean = sums[f"{d}/nll"] / max(sums[f"{d}/tokens"], 1.0)
        out[d] = {"perplexity": loss_perplexity(mean), "mean_loss": mean, "tokens": int(sums[f"{d}/tokens"]),
                  "unk_targets": int(sums[f"{d}/unk"])}
    # bilm-tf reports exp of the mean of the two mean losses.
    out["average_mean_loss"] = 0.5 * (out["forward"]["mean_loss"] + out["backward"]["mean_loss"])
    out["average_perplexity"] = loss_perplexity(out["average_mean_loss"])
    return out


def evaluate(checkpoint: str, data: str, batch_size: Optional[int] = None, unroll_steps: Optional[int] = None,
             per_sentence: bool = False, device: str = "auto", progress: bool = True,
             pretokenized: bool = False, precision: str = "fp32") -> dict:
    """Perplexity of a checkpoint on ``data``: a manifest.json (its heldout shards, tokenized by ``bilm
    prepare``), or raw text files, which get the model's own text pipeline (as ``prepare`` applied it to
    the training data) unless ``pretokenized`` (then: whitespace-split, as given)."""
    check_precision(precision)
    env = init_distributed(device)
    try:
        model, cfg, vocab_tokens, found, pipeline = model_from_checkpoint(checkpoint)
        model.to(env.device)
        char_cnn = cfg.model.char_cnn
        with tempfile.TemporaryDirectory(prefix="bilm-evaluate-") as tmp:
            source, note = data, None
            if not data.endswith(".json") and not pretokenized:
                source, note = tokenize_files(resolve_shards(data), pipeline, tmp,
                                              char_cnn.max_characters_per_token if char_cnn else 50)
            if note and env.is_main and progress:
                print(note, file=sys.stderr)
            dataset = LMDataset(source, Vocabulary(vocab_tokens, source=found), batch_size or cfg.train.batch_size,
                                unroll_steps or cfg.train.unroll_steps, mode="eval", per_sentence=per_sentence,
                                rank=env.rank, world_size=env.world_size, char_inputs=char_cnn is not None,
                                max_characters_per_token=char_cnn.max_characters_per_token if char_cnn else 50)
            result = score(model, dataset, env, precision, progress)
        factor = cfg.train.divergence_loss_factor or DIVERGENCE_LOSS_FACTOR
        losses = {d: result[d]["mean_loss"] for d in DIRECTIONS}
        result["diverged"] = diverged_directions(losses, len(vocab_tokens), factor)
        result["diverged_note"] = diverged_line(result["diverged"], losses, len(vocab_tokens), factor,
                                                non_finite_note(model)) if result["diverged"] else None
        result.update(checkpoint=found, data=data, batch_size=dataset.batch_size, unroll_steps=dataset.unroll_steps,
                      per_sentence=per_sentence, world_size=env.world_size, precision=precision,
                      tokenizer=None if pretokenized or data.endswith(".json") else
                      (pipeline.describe() if pipeline else {"tokenizer": "whitespace", "recorded": False}))
        return result
    finally:
        shutdown()


def tokenize_files(paths: list[str], pipeline: Optional[TextPipeline], directory: str,
                   max_characters: int = 50) -> tuple[list[str], str]:
    """Raw text files -> token files in ``directory`` (one sentence per line), made as ``bilm prepare``
    made the training data: the model's pipeline, empty lines dropped, long lines cut. Returns the
    new paths and a one-line note of what was done."""
    recorded = pipeline is not None
    pipeline = pipeline or TextPipeline()
    out_paths, n_lines, n_sentences, n_tokens = [], 0, 0, 0
    empty: list[str] = []
    for k, path in enumerate(paths):
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        per_line = pipeline.line_sentences(lines)  # split into sentences and cut as prepare did
        warn_suspicious_lines(pipeline, ((i + 1, [t for s in sentences for t in s]) for i, sentences in
                                         enumerate(per_line)), path, max_characters)
        n_lines += len(lines)
        if not any(sentences for sentences in per_line):
            empty.append(path)  # named as the user gave it (the reader would name the temporary token file)
            continue
        out_path = os.path.join(directory, f"{k:05d}-{os.path.basename(path)}")
        with open(out_path, "w", encoding="utf-8") as f:
            for sentences in per_line:
                for sentence in sentences:
                    f.write(" ".join(sentence) + "\n")
                    n_sentences += 1
                    n_tokens += len(sentence)
        out_paths.append(out_path)
    if not out_paths:
        raise InputError(f"{', '.join(paths)}: no tokens to evaluate (empty, or blank lines only)")
    for path in empty:
        warnings.warn(f"{path}: no tokens (empty, or blank lines only); skipped")
    how = (f"the model's {pipeline.tokenizer} pipeline" + (" with NFKC" if pipeline.nfkc else "")
           + (f", split into sentences ({pipeline.split_sentences})" if pipeline.split_sentences else "")) if recorded else \
        "whitespace (the checkpoint records no tokenizer)"
    return out_paths, (f"tokenized {n_lines:,} lines of {len(paths)} file(s) with {how}: {n_sentences:,} sentences, "
                       f"{n_tokens:,} tokens (--pretokenized: read them as whitespace-tokenized instead)")
