"""bilm score / LanguageModelScorer: per-line log-probabilities under the full softmax."""
from __future__ import annotations

import json
import math
import random

import pytest

from bilm.cli import main as bilm_main
from bilm.scoring.evaluate import evaluate
from bilm.commands.export import export
from bilm.inference.score import LanguageModelScorer, corpus_summary
from bilm.training.run import train
from train_helpers import TRAIN_DATA, TRAIN_VOCAB, tiny_config

EXTRA_LINES = ["", "zzyzx qwertyuiop the", "the"]  # an empty line, unknown words, a one-word line


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(tiny_config("train.max_steps=30", "train.seed=4"), TRAIN_DATA, str(out), vocab_file=TRAIN_VOCAB,
          progress=False)
    return str(out)


@pytest.fixture(scope="module")
def lines():
    with open(TRAIN_DATA, encoding="utf-8") as f:
        return f.read().splitlines()[:40] + EXTRA_LINES


def test_file_totals_equal_evaluate_per_sentence(run, lines, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    expected = evaluate(run, str(text), batch_size=3, unroll_steps=4, per_sentence=True, device="cpu", progress=False)
    records = LanguageModelScorer(run, batch_size=5).score(lines)
    assert len(records) == len(lines)
    got = corpus_summary(records)
    for d in ("forward", "backward"):
        assert got["predictions"] == expected[d]["tokens"]
        assert got["unk_targets"] == expected[d]["unk_targets"] > 0
        assert got[d]["perplexity"] == pytest.approx(expected[d]["perplexity"], rel=1e-5)
    assert got["average_perplexity"] == pytest.approx(expected["average_perplexity"], rel=1e-5)


def test_scores_do_not_depend_on_batch_composition(run, lines):
    scorer = LanguageModelScorer(run, batch_size=1)
    alone = {r["text"]: r for r in scorer.score(lines)}
    shuffled = lines[:]
    random.Random(0).shuffle(shuffled)
    scorer.batch_size = 7
    for r in scorer.score(shuffled):
        for d in ("forward", "backward", "average"):
            assert r[d]["log_prob"] == pytest.approx(alone[r["text"]][d]["log_prob"], abs=1e-4)


def test_per_token_and_unk_flags(run):
    [record] = LanguageModelScorer(run).score(["zzyzx qwertyuiop the"], per_token=True)
    assert record["tokens"] == ["zzyzx", "qwertyuiop", "the"]
    assert record["unk_targets"] == 2 and record["unk_positions"] == [0, 1]
    assert record["predictions"] == 4  # three words and the sentence end (</S>, or <S> backward)
    for d in ("forward", "backward"):
        per_token = record["token_log_probs"][d]
        assert len(per_token) == 4 and all(v < 0 for v in per_token)
        assert sum(per_token) == pytest.approx(record[d]["log_prob"], abs=1e-4)
        assert record[d]["perplexity"] == pytest.approx(math.exp(-record[d]["log_prob"] / 4))
    [empty] = LanguageModelScorer(run).score([""])
    assert empty["predictions"] == 0 and empty["average"]["perplexity"] is None


def test_export_with_softmax_scores_the_same_and_without_is_refused(run, lines, tmp_path, capsys):
    with_softmax = tmp_path / "with"
    export(run, str(with_softmax), include_softmax=True)
    from_run = LanguageModelScorer(run).score(lines[:6])
    from_export = LanguageModelScorer(str(with_softmax)).score(lines[:6])
    for a, b in zip(from_run, from_export):
        assert a["average"]["log_prob"] == pytest.approx(b["average"]["log_prob"], abs=1e-4)
    without = tmp_path / "without"
    export(run, str(without))
    text = tmp_path / "text.txt"
    text.write_text("\n".join(lines[:6]) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert bilm_main(["score", "--model", str(without), "--input", str(text), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(without) in err[0] and "--include-softmax" in err[0]


def test_command_writes_json_lines_and_never_overwrites(run, lines, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("\n".join(lines[:6]) + "\n", encoding="utf-8")
    out = tmp_path / "scores.jsonl"
    assert bilm_main(["score", "--model", run, "--input", str(text), "--out", str(out), "--per-token",
                      "--no-progress"]) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in records] == lines[:6]
    for a, b in zip(records, LanguageModelScorer(run).score(lines[:6])):
        assert a["average"]["log_prob"] == pytest.approx(b["average"]["log_prob"], abs=1e-4)
        assert len(a["token_log_probs"]["forward"]) == a["predictions"]
    assert "perplexity forward" in capsys.readouterr().err
    before = out.read_bytes()
    assert bilm_main(["score", "--model", run, "--input", str(text), "--out", str(out), "--no-progress"]) == 1
    assert "--force" in capsys.readouterr().err and out.read_bytes() == before


def test_a_file_without_tokens_is_scored_and_said_so(run, tmp_path, capsys):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n", encoding="utf-8")
    assert bilm_main(["score", "--model", run, "--input", str(blank), "--out", str(tmp_path / "s.jsonl"),
                      "--no-progress"]) == 0
    assert [json.loads(line)["predictions"] for line in open(tmp_path / "s.jsonl")] == [0, 0]
    assert capsys.readouterr().err == f"scored 2 lines: no tokens in {blank} (empty, or blank lines only)\n"
