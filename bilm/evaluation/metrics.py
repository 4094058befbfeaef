"""Scores of a probe: accuracy, and span F1 of BIO chunks computed as conlleval (CoNLL-2000) does."""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

_BIO = re.compile(r"^[BI]-.+$")


def accuracy(gold: Sequence, predicted: Sequence) -> float:
    """Percent of positions where the two agree."""
    if len(gold) == 0:
        return 0.0
    return 100.0 * float(np.mean(np.asarray(gold) == np.asarray(predicted)))


def is_bio(tags) -> bool:
    """Whether every tag is ``O``, ``B-X`` or ``I-X`` and at least one is a chunk tag."""
    tags = set(tags)
    return any(t != "O" for t in tags) and all(t == "O" or _BIO.match(t) for t in tags)


def _split(tag: str) -> tuple[str, str]:
    # conlleval: "B-NP" -> ("B", "NP"); a tag without a hyphen has type "" (hyphens may follow in the type).
    prefix, hyphen, kind = tag.partition("-")
    return (prefix, kind) if hyphen else (tag, "")


def _chunk_end(prev_tag: str, tag: str, prev_type: str, kind: str) -> bool:
    if (prev_tag, tag) in {("B", "B"), ("B", "O"), ("I", "B"), ("I", "O"), ("E", "E"), ("E", "I"), ("E", "O")}:
        return True
    if prev_tag not in ("O", ".") and prev_type != kind:
        return True
    return prev_tag in ("[", "]")


def _chunk_start(prev_tag: str, tag: str, prev_type: str, kind: str) -> bool:
    if (prev_tag, tag) in {("B", "B"), ("I", "B"), ("O", "B"), ("O", "I"), ("E", "E"), ("E", "I"), ("O", "E")}:
        return True
    if tag not in ("O", ".") and prev_type != kind:
        return True
    return tag in ("[", "]")


def chunk_counts(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> tuple[int, int, int]:
    """(correct chunks, gold chunks, predicted chunks) over sentences, as conlleval counts them:
    a blank line (tags O, O) after every sentence, so a chunk still open at a sentence's end ends
    there; ``I-X`` after ``O`` or after another type starts a chunk."""
    correct = found_gold = found_guessed = 0
    in_correct = False
    last_gold, last_gold_type, last_guess, last_guess_type = "O", "", "O", ""
    for gold_tags, guessed_tags in zip(gold, predicted):
        if len(gold_tags) != len(guessed_tags):
            raise ValueError("a sentence's predicted tags differ in number from its gold tags")
        for g, p in [*zip(gold_tags, guessed_tags), ("O", "O")]:  # the boundary after the sentence
            gold_tag, gold_type = _split(g)
            guess_tag, guess_type = _split(p)
            gold_end = _chunk_end(last_gold, gold_tag, last_gold_type, gold_type)
            guess_end = _chunk_end(last_guess, guess_tag, last_guess_type, guess_type)
            if in_correct:
                if gold_end and guess_end and last_guess_type == last_gold_type:
                    in_correct = False
                    correct += 1
                elif gold_end != guess_end or guess_type != gold_type:
                    in_correct = False
            gold_start = _chunk_start(last_gold, gold_tag, last_gold_type, gold_type)
            guess_start = _chunk_start(last_guess, guess_tag, last_guess_type, guess_type)
            if gold_start and guess_start and guess_type == gold_type:
                in_correct = True
            found_gold += gold_start
            found_guessed += guess_start
            last_gold, last_gold_type, last_guess, last_guess_type = gold_tag, gold_type, guess_tag, guess_type
    if in_correct:
        correct += 1
    return correct, found_gold, found_guessed


def span_f1(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, float]:
    """conlleval's overall precision, recall and FB1, in percent (0 where undefined, as it prints)."""
    correct, n_gold, n_guessed = chunk_counts(gold, predicted)
    precision = 100.0 * correct / n_guessed if n_guessed else 0.0
    recall = 100.0 * correct / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
