"""Start a bilm run from a bilm-tf training checkpoint: everything it learned, with the run's own words.

``bilm train --init-model original-tf`` (the published ELMo's training checkpoint, downloaded once)
or ``--init-model SAVE_DIR --init-vocab VOCAB`` (any bilm-tf ``save_dir``) starts the char CNN, the
LSTMs and the softmax from the checkpoint, with bilm-tf's Adagrad accumulators where the run uses
Adagrad. The run's vocabulary (``bilm prepare`` of the domain corpus) decides the softmax: a word
the checkpoint knows gets its row and that row's accumulator, bit for bit; a new word gets a row by
``NEW_ROW_RULES`` (the default chosen by measurement: docs/continued-pretraining.md) and a fresh accumulator, as a parameter that was never updated. ``--keep-vocab`` trains
with the checkpoint's vocabulary instead (bilm-tf's own fine-tuning recipe): every row carried.

The checkpoint is mapped, not read: the rows are gathered in chunks straight from the file, so the
memory added to the model and its optimizer state is one chunk, whatever the checkpoint's vocabulary.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from bilm.formats.bilmtf import latest_tf_checkpoint, read_tf_checkpoint, split_tensors
from bilm.modules.tf_checkpoint import load_bilmtf_body, softmax_arrays
from bilm.core.errors import InputError
from bilm.core.files import OPTIONS_FILE
from bilm.core.progress import progress_bar
from bilm.core.vocab import SPECIAL_TOKENS, Vocabulary, VocabularyError, read_tokens

# How a word the checkpoint never saw gets its softmax row (weight and bias):
#   unk:   the checkpoint's <UNK> row; its bias less log(new words + 1): the probability the
#          checkpoint gave to an unknown word is shared by <UNK> and the new words
#   char:  a ridge regression from the char CNN's vector of a word to its row, fitted on the carried
#          words, applied to the new word's char CNN vector (word-input models: mean)
#   mean:  the mean of the checkpoint's rows
#   fresh: bilm's initialization of a new softmax (what --init-model with published weights gives)
NEW_ROW_RULES = ("unk", "char", "mean", "fresh")
DEFAULT_NEW_ROW_RULE = "unk"  # the lowest heldout perplexity of the four (benchmarks/continue_tf.py)
ROWS_PER_CHUNK = 1 << 15      # rows gathered from the mapped checkpoint at a time
CHAR_FIT_MAX_WORDS = 20_000   # carried words the char rule is fitted on (the run's most frequent)
CHAR_FIT_RIDGE = 1e-3         # ridge penalty, relative to the mean diagonal of X'X


class TFStartError(InputError):
    """A bilm-tf checkpoint or vocabulary that cannot start this run; the message names the file."""


def is_tf_save_dir(path: str) -> bool:
    """A bilm-tf ``save_dir``: TensorFlow's ``checkpoint`` listing beside the ``model.ckpt-N`` files."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "checkpoint"))


@dataclass
class TFStart:
    """A bilm-tf checkpoint to start from, and how its softmax meets the run's vocabulary."""
    save_dir: str
    vocab_file: str
    keep_vocab: bool = False
    new_rows: str = DEFAULT_NEW_ROW_RULE

    def __post_init__(self):
        if self.new_rows not in NEW_ROW_RULES:
            raise InputError(f"new softmax row rule must be one of {', '.join(NEW_ROW_RULES)}, got {self.new_rows!r}")

    @property
    def options_file(self) -> str:
        return os.path.join(self.save_dir, OPTIONS_FILE)

    def checkpoint_tokens(self) -> list[str]:
        """The checkpoint's vocabulary, in its softmax's row order."""
        return read_tokens(self.vocab_file)

    def vocabulary(self) -> Vocabulary:
        """``--keep-vocab``: the checkpoint's words as a bilm vocabulary (``<S>``, ``</S>``, ``<UNK>`` first,
        the rest in the checkpoint's order; the published vocabulary starts ``</S>``, ``<S>``, ``<UNK>``)."""
        tokens = self.checkpoint_tokens()
        missing = [t for t in SPECIAL_TOKENS if t not in tokens]
        if missing:
            raise VocabularyError(f"{self.vocab_file}: no {', '.join(missing)} (a bilm-tf vocabulary holds <S>, "
                                  "</S> and <UNK>)")
        special = set(SPECIAL_TOKENS)
        return Vocabulary([*SPECIAL_TOKENS, *(t for t in tokens if t not in special)], source=self.vocab_file)

    def start(self, model, optimizer, tokens: list[str]) -> str:
        """Load the checkpoint into a new run's model and optimizer; the line the run logs about it
        (what ``bilm.training.run`` calls: it knows the object, not this module)."""
        return report_line(self.load_into(model, optimizer, tokens))

    def load_into(self, model, optimizer, tokens: list[str], progress: bool = False) -> dict:
        """Start ``model`` (a ``LanguageModel`` over ``tokens``) and ``optimizer`` from the checkpoint.
        Returns a report: the checkpoint, its step, rows carried and new, the rule, accumulators carried."""
        prefix = latest_tf_checkpoint(self.save_dir)
        weights, accumulators, step = split_tensors(read_tf_checkpoint(prefix, mmap=True))
        if model.bilm.char_inputs is False and not self.keep_vocab:
            raise TFStartError(f"{self.options_file}: a word-input model (no char_cnn) has an input row per word of "
                               "its vocabulary: continue it with --keep-vocab")
        carried_state = load_bilmtf_body(model, optimizer, weights, accumulators, step, prefix)
        weight, bias = softmax_arrays(weights, prefix)
        old_tokens = self.checkpoint_tokens()
        if len(old_tokens) != weight.shape[0]:
            raise TFStartError(f"{self.vocab_file} has {len(old_tokens):,} tokens, {prefix} has a softmax of "
                               f"{weight.shape[0]:,} rows: give the vocab the checkpoint was trained with")
        if weight.shape[1] != model.softmax.dim:
            raise TFStartError(f"{prefix}: softmax rows of {weight.shape[1]} values, the model's projection_dim is "
                               f"{model.softmax.dim}")
        row_of = {t: i for i, t in enumerate(old_tokens)}
        source_row = np.fromiter((row_of.get(t, -1) for t in tokens), dtype=np.int64, count=len(tokens))
        carried = np.flatnonzero(source_row >= 0)
        new = np.flatnonzero(source_row < 0)
        params = (model.softmax.weight, model.softmax.bias)
        with torch.no_grad():
            _copy_rows(params, (weight, bias), carried, source_row)
            if carried_state:
                acc = softmax_arrays(accumulators, f"{prefix} (Adagrad accumulators)")
                sums = tuple(optimizer.state[p]["sum"] for p in params)
                _copy_rows(sums, acc, carried, source_row)
                for p in params:  # new rows keep the initial accumulator of a parameter never updated
                    optimizer.state[p]["step"].fill_(float(step))
            rule = self.new_rows
            if len(new) and rule == "char" and not model.bilm.char_inputs:
                rule = "mean"
            if len(new) and rule != "fresh":
                rows, biases = _NEW_ROWS[rule](model, weight, bias, tokens, carried, source_row, new, row_of)
                model.softmax.weight[torch.from_numpy(new).to(params[0].device)] = rows.to(params[0])
                model.softmax.bias[torch.from_numpy(new).to(params[1].device)] = biases.to(params[1])
        return {"checkpoint": prefix, "step": step, "carried": int(len(carried)), "new": int(len(new)),
                "dropped": len(old_tokens) - int(len(carried)), "rule": rule if len(new) else None,
                "accumulators": carried_state}


def report_line(report: dict) -> str:
    """The one line a run logs about where its softmax came from."""
    line = (f"initialized from bilm-tf {report['checkpoint']} (step {report['step']:,}): softmax rows "
            f"{report['carried']:,} from the checkpoint, {report['new']:,} new")
    if report["new"]:
        line += f" (rule: {report['rule']})"
    if report["dropped"]:
        line += f"; {report['dropped']:,} checkpoint words not in this run's vocabulary"
    line += "; Adagrad accumulators carried" if report["accumulators"] else "; optimizer state fresh"
    return line


def _copy_rows(targets: tuple[torch.Tensor, ...], sources: tuple[np.ndarray, ...], carried: np.ndarray,
               source_row: np.ndarray) -> None:
    """``target[i] = source[source_row[i]]`` for the carried ``i``, a chunk of rows at a time (the
    sources are mapped: only the rows used are read)."""
    for start in range(0, len(carried), ROWS_PER_CHUNK):
        ours = carried[start:start + ROWS_PER_CHUNK]
        theirs = source_row[ours]
        order = np.argsort(theirs, kind="stable")  # read the file forwards
        ours, theirs = ours[order], theirs[order]
        for target, source in zip(targets, sources):
            rows = torch.from_numpy(np.ascontiguousarray(source[theirs]))
            target[torch.from_numpy(ours).to(target.device)] = rows.to(target)


def _mean_rows(model, weight, bias, tokens, carried, source_row, new, row_of):
    total_w, total_b = np.zeros(weight.shape[1], np.float64), 0.0
    for start in range(0, weight.shape[0], ROWS_PER_CHUNK):
        total_w += weight[start:start + ROWS_PER_CHUNK].sum(axis=0, dtype=np.float64)
        total_b += float(bias[start:start + ROWS_PER_CHUNK].sum(dtype=np.float64))
    n = weight.shape[0]
    mean_w = torch.from_numpy(total_w / n).float()
    return mean_w.expand(len(new), -1), torch.full((len(new),), total_b / n)


def _unk_rows(model, weight, bias, tokens, carried, source_row, new, row_of):
    unk = row_of.get(SPECIAL_TOKENS[2])
    if unk is None:
        raise TFStartError("the checkpoint's vocabulary has no <UNK>: the unk rule has no row to copy")
    row = torch.from_numpy(np.array(weight[unk], dtype=np.float32))
    return row.expand(len(new), -1), torch.full((len(new),), float(bias[unk]) - math.log(len(new) + 1))


def _char_rows(model, weight, bias, tokens, carried, source_row, new, row_of):
    """Rows predicted from the char CNN: [W | b] of a word ~ [e(word), 1] @ beta, least squares with a
    small ridge, fitted on the run's most frequent carried words (the special tokens left out)."""
    special = {row_of.get(t) for t in SPECIAL_TOKENS}
    fit = np.array([i for i in carried if source_row[i] not in special][:CHAR_FIT_MAX_WORDS], dtype=np.int64)
    if len(fit) < 2:
        return _mean_rows(model, weight, bias, tokens, carried, source_row, new, row_of)
    x_fit = _with_ones(_token_vectors(model, [tokens[i] for i in fit]))
    y_fit = torch.from_numpy(np.concatenate([weight[source_row[fit]], bias[source_row[fit], None]], axis=1))
    y_fit = y_fit.double()
    gram = x_fit.T @ x_fit
    gram += torch.eye(gram.shape[0], dtype=gram.dtype) * CHAR_FIT_RIDGE * float(gram.diagonal().mean())
    beta = torch.linalg.solve(gram, x_fit.T @ y_fit)
    predicted = (_with_ones(_token_vectors(model, [tokens[i] for i in new])) @ beta).float()
    return predicted[:, :-1], predicted[:, -1]


def _with_ones(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)


def _token_vectors(model, tokens: list[str], batch_size: int = 512) -> torch.Tensor:
    """The char CNN's context-free vector of each token (what bilm-tf's dump_token_embeddings writes), CPU."""
    from bilm.core.chars import char_id_table

    bilm = model.bilm
    device = next(bilm.parameters()).device
    width = bilm.options.char_cnn.max_characters_per_token
    was_training = bilm.training
    bilm.eval()
    try:
        starts = progress_bar(range(0, len(tokens), batch_size), desc="char CNN of the softmax words", unit="batch",
                              disable=None, leave=False)  # minutes on a CPU at elmo_original's size: shown on a terminal
        out = [bilm.embed_tokens(torch.from_numpy(char_id_table(tokens[s:s + batch_size], width)).long().to(device))
               .float().cpu() for s in starts]
    finally:
        bilm.train(was_training)
    return torch.cat(out)


_NEW_ROWS = {"char": _char_rows, "mean": _mean_rows, "unk": _unk_rows}


def resolve_start(init_model: str, vocab_file: Optional[str], keep_vocab: bool, new_rows: Optional[str],
                  progress: bool = True) -> Optional[TFStart]:
    """``--init-model`` as a bilm-tf checkpoint (a published name of one, or a ``save_dir``), else None."""
    from bilm.modules.published import resolve_tf_checkpoint, tf_checkpoint_entry

    if not (is_tf_save_dir(init_model) or tf_checkpoint_entry(init_model) is not None):
        return None
    save_dir, vocab_file = resolve_tf_checkpoint(init_model, vocab_file, progress)
    return TFStart(save_dir, vocab_file, keep_vocab, new_rows or DEFAULT_NEW_ROW_RULE)
