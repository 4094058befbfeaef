"""Heldout perplexity while training: a fixed sample of heldout sentences, scored with the full
softmax by ``bilm.scoring.evaluate.score`` (the code ``bilm evaluate`` runs), and the add-one unigram
model of the training counts on the same sample (the divergence guard's floor).

The sample is the first sentences of the heldout data, up to ``train.eval_tokens`` tokens, in
their order (``bilm prepare`` has shuffled the heldout split as it shuffled the training data),
written to ``RUN/heldout_sample.txt`` (one sentence per line, tokenized) by rank 0 at every start.

It is scored as ``bilm evaluate`` scores by default and as bilm-tf's ``test()`` does: ``batch_size``
streams of sentences (sentence i goes to stream i mod batch_size), each carrying its LSTM states
from sentence to sentence. Carried states are what a run's final evaluation sees, and they are
where a diverging LM shows first: on issue 21's diverged seed, sentences scored from fresh states
looked healthy (715) while the same sentences with carried states gave 18,732 (docs/training_parity.md,
"Divergence"). Under torchrun the streams are shared out, rank k scoring streams k, k+R, ..., and
the sums are all-reduced, so the figure is that of one process. The same figures come from ``bilm
evaluate --checkpoint CKPT --data RUN/heldout_sample.txt --pretokenized`` (default batch size: the
run's).
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from typing import Optional

import torch

from bilm.core.atomic import atomic_open
from bilm.runs.config import Config
from bilm.data import LMDataset, load_manifest, resolve_shards
from bilm.core.distributed import DistEnv
from bilm.core.errors import InputError
from bilm.scoring.evaluate import score, tokenize_files
from bilm.scoring.perplexity import perplexity
from bilm.modules.language_model import DIRECTIONS, LanguageModel
from bilm.core.vocab import Vocabulary
from bilm.core.text import TextPipeline

SAMPLE_NAME = "heldout_sample.txt"


@dataclass
class HeldoutEval:
    dataset: LMDataset
    path: str                                     # the sample file
    n_tokens: int                                 # words in the sample (without sentence boundaries)
    n_sentences: int
    source: str                                   # where the sentences came from, for the messages
    unigram: Optional[dict[str, float]]           # add-one unigram perplexity per direction; None: no counts
    precision: str = "fp32"

    def run(self, model: LanguageModel, env: DistEnv) -> dict:
        """``summarize``'s figures of ``model`` on the sample (the same on every rank)."""
        was_training = model.training
        try:
            return score(model, self.dataset, env, self.precision)
        finally:
            model.train(was_training)


def streams_per_rank(streams: int, world_size: int) -> int:
    """Rows of each rank's evaluation batch. Evaluation deals sentence i to row i mod rows, and each of R
    ranks reads every R-th sentence, so R ranks of ``streams / R`` rows score exactly the streams of one
    process of ``streams`` rows. When R does not divide ``streams`` the run scores R * ceil(streams / R)
    streams (a slightly different figure from one process's; ``bilm evaluate --batch-size`` that many)."""
    return -(-streams // world_size)


def heldout_sources(manifest: Optional[dict], eval_data: Optional[str]) -> tuple[list[str], str, bool]:
    """(files, description, tokenized) of the heldout data: ``eval_data`` (a manifest: its heldout
    shards; else raw text files) or the training manifest's heldout split. No files: none."""
    if eval_data:
        if eval_data.endswith(".json"):
            return load_manifest(eval_data)["heldout"]["shards"], f"the heldout split of {eval_data}", True
        return resolve_shards(eval_data), eval_data, False
    if manifest is not None:
        return manifest["heldout"]["shards"], "the manifest's heldout split", True
    return [], "", True


def no_heldout_message(manifest: Optional[dict], eval_tokens: int, eval_every_steps: int = 1,
                       loss_factor: Optional[float] = None) -> str:
    fraction = (manifest or {}).get("heldout_fraction")
    held_none = isinstance(fraction, (int, float)) and fraction > 0  # prepared with a split, too small to fill it
    why = ("train.eval_every_steps is 0" if eval_every_steps == 0 else "train.eval_tokens is 0" if eval_tokens == 0 else
           f"the manifest's heldout split is empty: --heldout-fraction {fraction:g} of a corpus this small held out "
           "no line" if manifest is not None and held_none else
           "the manifest has no heldout split" if manifest is not None else "--data is not a manifest.json")
    guard = (f"watches the training loss only (not finite, or averaged above {loss_factor:g} x log(vocabulary size))"
             if loss_factor else "sees only non-finite training losses (train.divergence_loss_factor is null)")
    prepare = "a larger --heldout-fraction, or more text" if held_none else "bilm prepare --heldout-fraction 0.01"
    return (f"no heldout evaluation ({why}): this run cannot watch its heldout perplexity, and the divergence guard "
            f"{guard}; give it data with --eval-data FILE|manifest.json (or {prepare})")


def prepare_heldout(cfg: Config, manifest: Optional[dict], eval_data: Optional[str], out_dir: str,
                    vocab: Vocabulary, pipeline: Optional[TextPipeline], env: DistEnv) -> Optional[HeldoutEval]:
    """The run's heldout sample and its dataset for this rank, or None when there is no heldout data
    or the check is off (``train.eval_every_steps`` or ``train.eval_tokens`` 0)."""
    t = cfg.train
    if t.eval_every_steps == 0 or t.eval_tokens == 0:
        return None
    files, source, tokenized = heldout_sources(manifest, eval_data)
    if not files:
        return None
    path = os.path.join(out_dir, SAMPLE_NAME)
    char_cnn = cfg.model.char_cnn
    max_characters = char_cnn.max_characters_per_token if char_cnn else 50
    if env.is_main:
        with tempfile.TemporaryDirectory(prefix="bilm-heldout-") as tmp:
            if not tokenized:  # raw text: the run's own pipeline, as bilm prepare made its training data
                files, _ = tokenize_files(files, pipeline, tmp, max_characters)
            sentences = first_sentences(files, t.eval_tokens)
        if not sentences:
            raise InputError(f"{source}: no heldout sentences (empty files)")
        with atomic_open(path) as f:
            f.writelines(" ".join(s) + "\n" for s in sentences)
    if env.distributed:
        torch.distributed.barrier()
    with open(path, encoding="utf-8") as f:
        sentences = [line.split() for line in f if line.strip()]
    dataset = LMDataset(path, vocab, streams_per_rank(t.batch_size, env.world_size), t.unroll_steps, mode="eval",
                        rank=env.rank, world_size=env.world_size, char_inputs=char_cnn is not None,
                        max_characters_per_token=max_characters)
    counts = (manifest or {}).get("vocab_counts")
    unigram = unigram_perplexity(sentences, vocab, read_counts(counts, vocab)) \
        if isinstance(counts, str) and os.path.exists(counts) else None
    return HeldoutEval(dataset, path, sum(map(len, sentences)), len(sentences), source, unigram, t.precision)


def first_sentences(files: list[str], max_tokens: int) -> list[list[str]]:
    """The first sentences of ``files`` (in order) whose words add up to at most ``max_tokens``
    (at least one sentence)."""
    sentences, total = [], 0
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                words = line.split()
                if not words:
                    continue
                if sentences and total + len(words) > max_tokens:
                    return sentences
                sentences.append(words)
                total += len(words)
    return sentences


def read_counts(path: str, vocab: Vocabulary) -> list[int]:
    """Training counts by vocabulary id, from ``vocab_counts.tsv`` (token TAB count per line)."""
    counts = [0] * len(vocab)
    index = vocab.token_to_id
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            token, _, count = line.rstrip("\n").rpartition("\t")
            try:
                value = int(count)
            except ValueError:
                raise InputError(f"{path}, line {number}: expected 'token<TAB>count', got {line.rstrip()!r}") from None
            if token in index:
                counts[index[token]] = value
    return counts


def unigram_perplexity(sentences: list[list[str]], vocab: Vocabulary, counts: list[int]) -> dict[str, float]:
    """Perplexity of the add-one unigram model of ``counts`` on ``sentences``, per direction: the
    forward LM predicts each word and the end of sentence, the backward LM each word and its start."""
    total = sum(counts) + len(counts)
    log_p = [math.log((c + 1) / total) for c in counts]
    words = [int(i) for s in sentences for i in vocab.encode(s)] if sentences else []
    nll = -sum(log_p[i] for i in words)
    n = len(words) + len(sentences)
    return {"forward": perplexity((nll - len(sentences) * log_p[vocab.eos_id]) / n),
            "backward": perplexity((nll - len(sentences) * log_p[vocab.bos_id]) / n)}


def figures(result: dict) -> dict[str, float]:
    """The metrics of one heldout evaluation (``summarize``'s form), as they are logged: each perplexity
    with its mean loss beside it (the perplexity may be ``inf``, the mean loss is finite)."""
    return {**{f"heldout_perplexity/{d}": result[d]["perplexity"] for d in DIRECTIONS},
            "heldout_perplexity/average": result["average_perplexity"],
            **{f"heldout_loss/{d}": result[d]["mean_loss"] for d in DIRECTIONS},
            "heldout_loss/average": result["average_mean_loss"]}
