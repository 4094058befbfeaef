"""``bilm score``: log-probabilities and perplexity of raw text under the language model.

Each line is scored on its own (zero LSTM states at its start, as ``bilm evaluate
--per-sentence``), so its numbers do not depend on the lines batched with it. A line is
tokenized with the model's own pipeline and cut into sentences as ``bilm prepare`` cut the
training data; each sentence is read as ``<S> w1 .. wn </S>``: the forward LM predicts
``w1 .. wn </S>``, the backward LM ``wn .. w1 <S>``. Log-probabilities are natural logs under
the full softmax. Over a file, exp(total NLL / predictions) per direction is what ``bilm
evaluate --per-sentence`` reports on the same text (tested).

The model is a run directory or checkpoint, or an export made with ``--include-softmax``
(``softmax.hdf5`` + ``vocab.txt`` beside ``options.json`` + ``weights.hdf5``).
"""
from __future__ import annotations

import os
from itertools import islice
from typing import Iterable, Iterator, Optional

import numpy as np
import torch

from bilm.core.chars import BOS_TOKEN, EOS_TOKEN, char_id_table
from bilm.core.errors import InputError
from bilm.core.files import OPTIONS_FILE, SOFTMAX_FILE, VOCAB_FILE, WEIGHTS_FILE
from bilm.modules.language_model import DIRECTIONS, LanguageModel
from bilm.core.precision import autocast, check_precision
from bilm.core.progress import progress_bar
from bilm.core.vocab import Vocabulary
from bilm.core.finite import non_finite_weights
from bilm.runs.config import DIVERGENCE_LOSS_FACTOR
from bilm.scoring.perplexity import diverged_directions, diverged_line, perplexity
from bilm.core.text import TextPipeline



def load_scoring_model(path: str) -> tuple[LanguageModel, Vocabulary, Optional[TextPipeline]]:
    """A run directory or checkpoint (``model_from_checkpoint``), or an export directory with the
    softmax; the model in eval mode on the CPU, its vocabulary and its text pipeline."""

    if os.path.isdir(path) and os.path.isfile(os.path.join(path, OPTIONS_FILE)):
        from bilm.core.options import BiLMOptions
        from bilm.modules.pretrained import load_pretrained

        softmax, vocab_file = os.path.join(path, SOFTMAX_FILE), os.path.join(path, VOCAB_FILE)
        if not os.path.isfile(softmax):
            raise InputError(f"{path} has no {SOFTMAX_FILE}: scoring needs the softmax; export the model with "
                             "`bilm export --include-softmax`, or score its run directory")
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"{path} has no vocab.txt (the softmax rows' tokens)")
        vocab = Vocabulary.from_file(vocab_file)
        model = LanguageModel(BiLMOptions.from_file(os.path.join(path, OPTIONS_FILE)), len(vocab), dropout=0.0,
                              sparse_softmax=False)
        load_pretrained(model, os.path.join(path, WEIGHTS_FILE), softmax_file=softmax)
        return model.eval(), vocab, TextPipeline.load(path)
    from bilm.runs.trained_model import model_from_checkpoint

    model, _, tokens, found, pipeline = model_from_checkpoint(path)
    return model, Vocabulary(tokens, source=found), pipeline


class LanguageModelScorer:
    """``LanguageModelScorer("runs/small").score(["a line", ...])`` -> one dict per line (see
    ``score_tokens``). ``pretokenized``: lines are split on whitespace instead of the model's
    pipeline (then not cut into sentences, as ``bilm evaluate --pretokenized`` reads them)."""

    def __init__(self, model: str, device: str = "cpu", batch_size: int = 32, precision: str = "fp32",
                 pretokenized: bool = False):
        self.precision = check_precision(precision)
        self.device = torch.device(device)
        self.model, self.vocab, self.text_pipeline = load_scoring_model(model)
        self.model.to(self.device)
        self.batch_size = batch_size
        self.pretokenized = pretokenized
        char_cnn = self.model.options.char_cnn
        self.max_characters = char_cnn.max_characters_per_token if char_cnn else 50

    def health_line(self, summary: dict) -> Optional[str]:
        """One line when ``corpus_summary``'s figures or the weights say the model has diverged (a
        mean loss that is not finite or above ``DIVERGENCE_LOSS_FACTOR`` x log(V); weights holding
        NaN or inf), else None."""
        found = non_finite_weights(self.model)
        losses = {d: summary[d]["mean_loss"] for d in DIRECTIONS} if summary.get("predictions") else {}
        diverged = diverged_directions(losses, len(self.vocab), DIVERGENCE_LOSS_FACTOR)
        if diverged:
            return diverged_line(diverged, losses, len(self.vocab), DIVERGENCE_LOSS_FACTOR,
                                 f"; its weights hold {found}" if found else "")
        return f"the model's weights hold {found}" if found else None

    def sentences_of(self, lines: list[str]) -> list[list[list[str]]]:
        """Each line's sentences: tokenized, cut as prepare cut the training data; none for an empty line."""
        if self.pretokenized:
            return [[line.split()] if line.split() else [] for line in lines]
        return (self.text_pipeline or TextPipeline()).line_sentences(lines)

    def score(self, texts: Iterable[str], per_token: bool = False) -> list[dict]:
        return list(self.iter_scores(texts, per_token))

    def iter_scores(self, texts: Iterable[str], per_token: bool = False, progress: bool = False,
                    total: Optional[int] = None) -> Iterator[dict]:
        """One dict per line, in order; ``progress``: a progress bar over lines."""
        iterator = iter(texts)
        with progress_bar(total=total, unit="line", desc="score", disable=not progress) as bar:
            while lines := list(islice(iterator, self.batch_size)):
                per_line = self.sentences_of(lines)
                flat = [s for sentences in per_line for s in sentences]
                scored = iter(self.score_tokens(flat, per_token))
                for line, sentences in zip(lines, per_line):
                    yield _line_record(line, [next(scored) for _ in sentences], per_token)
                bar.update(len(lines))

    @torch.no_grad()
    def score_tokens(self, sentences: list[list[str]], per_token: bool = False) -> list[dict]:
        """Per sentence (a token list): for each direction the summed log-probability of its n + 1
        predictions; the tokens that are <UNK> in the vocabulary; with ``per_token`` each
        prediction's log-probability (forward in reading order, ending with </S>; backward
        aligned to the same tokens, then <S>)."""
        if not sentences:
            return []
        self.model.eval()
        batch = self._batch(sentences)
        with autocast(self.device, self.precision):
            top, _ = self.model.top_outputs(batch, None)
        out = []
        log_probs = {}
        for d in DIRECTIONS:
            b = batch[d]
            flat = self.model.softmax.target_log_probs(top[d].reshape(-1, top[d].shape[-1]),
                                                       b["next_token_ids"].reshape(-1))
            log_probs[d] = flat.view(b["mask"].shape).cpu().numpy()
        unk = self.vocab.unk_id
        for i, tokens in enumerate(sentences):
            n = len(tokens) + 1
            forward = log_probs["forward"][i, :n]
            backward = log_probs["backward"][i, :n][::-1]  # predictions of <S>, w1 .. wn: w1 first
            ids = self.vocab.encode(tokens)
            record = {"tokens": list(tokens), "forward": float(forward.sum(dtype=np.float64)),
                      "backward": float(backward.sum(dtype=np.float64)), "predictions": n,
                      "unk": [k for k in range(len(tokens)) if ids[k] == unk]}
            if per_token:
                record["forward_tokens"] = forward.tolist()        # w1 .. wn, </S>
                record["backward_tokens"] = backward[1:].tolist() + backward[:1].tolist()  # w1 .. wn, <S>
            out.append(record)
        return out

    def _batch(self, sentences: list[list[str]]) -> dict:
        """The ``bilm.data`` batch layout (``LMDataset``), one sentence a row from zero states."""
        n_rows, n_steps = len(sentences), max(len(s) for s in sentences) + 1
        batch = {}
        for d in DIRECTIONS:
            token_ids = np.zeros((n_rows, n_steps), dtype=np.int64)
            next_ids = np.zeros((n_rows, n_steps), dtype=np.int64)
            mask = np.zeros((n_rows, n_steps), dtype=bool)
            char_ids = np.zeros((n_rows, n_steps, self.max_characters), dtype=np.int32)
            for i, tokens in enumerate(sentences):
                words = [BOS_TOKEN, *tokens, EOS_TOKEN]
                if d == "backward":
                    words.reverse()
                ids = self.vocab.encode(words)
                n = len(words) - 1
                token_ids[i, :n], next_ids[i, :n], mask[i, :n] = ids[:-1], ids[1:], True
                if self.model.bilm.char_inputs:
                    char_ids[i, :n] = char_id_table(words[:-1], self.max_characters)
            direction = {"token_ids": torch.from_numpy(token_ids), "next_token_ids": torch.from_numpy(next_ids),
                         "mask": torch.from_numpy(mask), "all_valid": bool(mask.all())}
            if self.model.bilm.char_inputs:
                direction["char_ids"] = torch.from_numpy(char_ids)
            batch[d] = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in direction.items()}
        return batch


def _perplexity(log_prob: float, count: int) -> Optional[float]:
    """exp(-log_prob / count); ``inf`` past float range (a diverged model), None for no predictions."""
    return perplexity(-log_prob / count) if count else None


def _line_record(line: str, sentences: list[dict], per_token: bool) -> dict:
    """One line's scores from its sentences' (a long line is several; an empty one none)."""
    count = sum(s["predictions"] for s in sentences)
    record = {"text": line, "tokens": [t for s in sentences for t in s["tokens"]], "predictions": count}
    offset = 0
    unk = []
    for s in sentences:
        unk += [offset + k for k in s["unk"]]
        offset += len(s["tokens"])
    for d in DIRECTIONS:
        log_prob = sum(s[d] for s in sentences)
        record[d] = {"log_prob": log_prob, "perplexity": _perplexity(log_prob, count)}
    # The two directions' average, as bilm evaluate: exp of the mean of their mean losses.
    mean = 0.5 * (record["forward"]["log_prob"] + record["backward"]["log_prob"])
    record["average"] = {"log_prob": mean, "perplexity": _perplexity(mean, count)}
    record["unk_targets"] = len(unk)
    record["unk_positions"] = unk
    if len(sentences) > 1:
        record["sentences"] = len(sentences)
    if per_token:
        record["token_log_probs"] = {
            "forward": [v for s in sentences for v in s["forward_tokens"]],
            "backward": [v for s in sentences for v in s["backward_tokens"]]}
    return record


def corpus_summary(records: Iterable[dict]) -> dict:
    """Totals over scored lines: what ``bilm evaluate --per-sentence`` reports on the same text."""
    totals = {d: 0.0 for d in DIRECTIONS}
    count = unk = lines = 0
    for r in records:
        lines += 1
        count += r["predictions"]
        unk += r["unk_targets"]
        for d in DIRECTIONS:
            totals[d] += r[d]["log_prob"]
    out = {"lines": lines, "predictions": count, "unk_targets": unk}
    for d in DIRECTIONS:
        out[d] = {"perplexity": _perplexity(totals[d], count), "mean_loss": -totals[d] / count if count else None}
    out["average_mean_loss"] = 0.5 * (out["forward"]["mean_loss"] + out["backward"]["mean_loss"]) if count else None
    out["average_perplexity"] = perplexity(out["average_mean_loss"]) if count else None
    return out
