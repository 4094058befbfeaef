"""A run that truly blows up, end to end through the command line (issue 37): no mock, no injected NaN.

configs/tiny.yaml on the bundled sample at learning rate 5000 (``BLOW_UP``): its sampled training loss
passes 10,000 within a few steps. With and without heldout data, for each ``train.on_divergence``:
``stop`` exits 3 with one line naming the step and the figure, ``rollback`` lands on the last healthy
checkpoint and recovers (at a learning rate it lowered enough) or stops after ``train.max_rollbacks``,
``warn`` finishes with every firing in metrics.jsonl. Then ``bilm evaluate``, ``score``, ``export`` and
``embed`` on the diverged checkpoint: figures or one line, exit 0 where there are figures. No
traceback anywhere, and every line of every JSON output is JSON (no ``NaN``, no ``Infinity``)."""
from __future__ import annotations

import json
import math
import os
import re
import sys

import h5py
import numpy as np
import pytest

from bilm.cli import EXIT_DIVERGED, main as bilm_main
from bilm.runs.checkpoint import load_checkpoint
from bilm.runs.run_dir import list_checkpoints
from train_helpers import ROOT, TINY, TRAIN_DATA, TRAIN_VOCAB, BILM_TF_TEST_MODEL

BLOW_UP = "optim.lr=5000"
SAMPLE = os.path.join(ROOT, "data", "sample")
# Small and quick; a checkpoint every 10 steps; logs (and so guard checks) every 5.
QUICK = ["train.device=cpu", "train.seed=0", "train.log_every_steps=5", "train.checkpoint_every_steps=10",
         "train.eval_tokens=1000", "train.keep_checkpoints=5"]
STOPPED = re.compile(r"divergence at step (\d+): (forward|backward) (training loss averaged over \d+ steps?|heldout "
                     r"perplexity) is ([\d,.]+|inf)\b.*; stopped \((.*)\); state saved to (\S+); last good "
                     r"checkpoint: (\S+)$")


def strict_json(text: str):
    """``json.loads`` that refuses ``NaN`` and ``Infinity`` (Python writes them; they are not JSON)."""
    def refuse(constant):
        raise AssertionError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The first 400 lines of the bundled sample, a tenth held out: manifest.json."""
    tmp = tmp_path_factory.mktemp("corpus")
    with open(os.path.join(SAMPLE, "train.txt"), encoding="utf-8") as f:
        (tmp / "corpus.txt").write_text("".join(next(f) for _ in range(400)), encoding="utf-8")
    assert bilm_main(["prepare", str(tmp / "corpus.txt"), "--out", str(tmp / "data"), "--heldout-fraction", "0.1",
                      "--workers", "1", "--no-progress"]) == 0
    return str(tmp / "data" / "manifest.json")


def bilm(capsys, *argv: str) -> tuple[int, str, str]:
    """``bilm ARGV`` in this process: (exit code, stdout, stderr); never a traceback."""
    code = bilm_main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err, captured.out + captured.err
    return code, captured.out, captured.err


def train(capsys, run, data, *overrides: str, flags=()) -> tuple[int, str, str]:
    argv = ["train", "--config", TINY, "--data", data, "--out", run, "--no-progress", *flags]
    for override in (*QUICK, *overrides):
        argv += ["--set", override]
    return bilm(capsys, *argv)


def rows(run) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as f:
        return [strict_json(line) for line in f]


def events(run) -> list[dict]:
    return [r for r in rows(run) if r.get("event") == "divergence"]


def stop_line(err: str) -> re.Match:
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    match = STOPPED.match(lines[0])
    assert match, lines[0]
    return match


# ----- stop

@pytest.mark.parametrize("heldout", [False, True], ids=["no-heldout", "heldout"])
def test_stop_exits_3_with_a_line_naming_the_step_and_the_figure(tmp_path, corpus, capsys, heldout):
    run = tmp_path / "run"
    code, out, err = train(capsys, run, corpus, BLOW_UP, "train.max_steps=30", "train.on_divergence=stop",
                           f"train.eval_every_steps={5 if heldout else 0}")
    assert code == EXIT_DIVERGED == 3
    match = stop_line(err)
    step, figure = int(match[1]), float(match[4].replace(",", ""))
    assert "training loss" in match[3] and figure > 3 * math.log(10000) and step <= 5
    assert match[5] == "train.on_divergence: stop" and match[7] == "none"  # it blew up before the first checkpoint
    assert os.path.basename(match[6]) == "diverged-step-00000005.pt" and os.path.exists(match[6])
    (event,) = events(run)
    assert (event["diverged_step"], event["seen_step"], event["action"]) == (step, 5, "stop")
    assert ("heldout perplexity every 5 steps" in out) == heldout
    assert ("no heldout evaluation (train.eval_every_steps is 0)" in out) == (not heldout)


def test_the_heldout_check_scores_a_blown_up_model_without_an_overflow(tmp_path, corpus, capsys):
    """The training-loss check off: the heldout check is the one to meet the blow-up, at a mean loss
    past exp's range (the OverflowError of the issue)."""
    run = tmp_path / "run"
    code, out, err = train(capsys, run, corpus, BLOW_UP, "train.max_steps=30", "train.on_divergence=stop",
                           "train.eval_every_steps=5", "train.divergence_loss_factor=null")
    assert code == EXIT_DIVERGED
    match = stop_line(err)
    assert (match[1], match[3], match[4]) == ("5", "heldout perplexity", "inf")
    (heldout,) = [r for r in rows(run) if "heldout_perplexity/forward" in r]
    assert heldout["heldout_perplexity/forward"] == "inf"  # metrics.jsonl's word for it: the string "inf"
    assert heldout["heldout_loss/forward"] > math.log(sys.float_info.max)  # and the finite mean loss beside it
    assert "heldout" in load_checkpoint(match[6])  # the figures the stop saw travel with the diverged state


# ----- warn

@pytest.mark.parametrize("heldout", [False, True], ids=["no-heldout", "heldout"])
def test_warn_finishes_and_every_firing_is_in_metrics_jsonl(tmp_path, corpus, capsys, heldout):
    run = tmp_path / "run"
    code, out, err = train(capsys, run, corpus, BLOW_UP, "train.max_steps=30", "train.on_divergence=warn",
                           f"train.eval_every_steps={10 if heldout else 0}")
    assert code == 0 and "trained 30 steps" in out
    warned = [line for line in out.splitlines() if line.startswith("divergence at step")]
    fired = events(run)
    assert len(warned) == len(fired) >= 1
    for line, event in zip(warned, fired):
        assert event["action"] == "warn" and line.startswith(f"divergence at step {event['diverged_step']}: "
                                                             f"{event['what']}; training goes on")
    if heldout:  # every heldout check of the blown-up model fires (the mean loss is far past the bound)
        assert [e["seen_step"] for e in fired if "heldout" in e["what"]] == [10, 20, 30]


# ----- rollback

def _healthy_start(capsys, run, data, *overrides):
    """Ten healthy steps at the preset's learning rate (checkpoint at 10), then the rate that blows up."""
    code, _, _ = train(capsys, run, data, "train.max_steps=10", *overrides)
    assert code == 0


def test_rollback_lands_on_the_last_healthy_checkpoint_and_recovers(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    _healthy_start(capsys, run, corpus, "train.eval_every_steps=0")
    # Back at step 10, learning rate 5000 x 1e-4 = 0.5 trains on.
    code, out, err = train(capsys, run, corpus, BLOW_UP, "train.max_steps=30", "train.eval_every_steps=0",
                           "train.rollback_lr_factor=0.0001", flags=["--resume"])
    assert code == 0 and "trained 30 steps" in out, out + err
    (event,) = events(run)
    assert (event["action"], event["to_step"]) == ("rollback", 10) and event["diverged_step"] > 10
    assert event["to_checkpoint"].endswith("step-00000010.pt")
    assert [r["lr"] for r in rows(run) if "lr" in r][-1] == pytest.approx(0.5)
    final = load_checkpoint(list_checkpoints(os.path.join(run, "checkpoints"))[-1])
    assert final["step"] == 30 and all(bool(np.isfinite(v.numpy()).all()) for v in final["model"].values())
    assert max(r["loss/forward"] for r in rows(run) if r.get("step", 0) > 10 and "loss/forward" in r) < 20


@pytest.mark.parametrize("heldout", [False, True], ids=["no-heldout", "heldout"])
def test_rollbacks_that_keep_diverging_stop_after_max_rollbacks(tmp_path, corpus, capsys, heldout):
    run = tmp_path / "run"
    every = f"train.eval_every_steps={5 if heldout else 0}"
    _healthy_start(capsys, run, corpus, every)
    # 5000 x 0.5 and x 0.25 blow up as well.
    code, out, err = train(capsys, run, corpus, BLOW_UP, "train.max_steps=40", every, "train.max_rollbacks=2",
                           flags=["--resume"])
    assert code == EXIT_DIVERGED
    match = stop_line(err)
    assert match[5] == "2 rollbacks in a row did not get past it (train.max_rollbacks)"
    assert match[7].endswith("step-00000010.pt")
    fired = events(run)
    assert [(e["action"], e.get("to_step")) for e in fired] == [("rollback", 10), ("rollback", 10), ("stop", None)]
    assert [e["lr_factor"] for e in fired] == [0.5, 0.25, 0.25]
    warned = [line for line in out.splitlines() if line.startswith("divergence at step")]
    assert len(warned) == 2 and all("rolled back to" in line for line in warned)


# ----- the diverged checkpoint, scored, exported, embedded

@pytest.fixture(scope="module")
def diverged(tmp_path_factory, corpus):
    """The diverged state a stopped run saved."""
    run = tmp_path_factory.mktemp("diverged") / "run"
    argv = ["train", "--config", TINY, "--data", corpus, "--out", str(run), "--no-progress"]
    for override in (*QUICK, BLOW_UP, "train.max_steps=30", "train.on_divergence=stop", "train.eval_every_steps=0"):
        argv += ["--set", override]
    assert bilm_main(argv) == EXIT_DIVERGED
    return os.path.join(run, "checkpoints", "diverged-step-00000005.pt")


def _says_diverged(err: str) -> str:
    (line,) = [x for x in err.splitlines() if x.startswith("warning: ")]
    assert line.startswith("warning: the model has diverged: ") and re.search(r"\b(forward|backward) \(mean loss", line)
    return line


def test_evaluate_on_the_diverged_checkpoint_prints_its_figures_and_says_so(diverged, capsys, tmp_path):
    heldout = tmp_path / "heldout.txt"
    with open(os.path.join(SAMPLE, "heldout.txt"), encoding="utf-8") as f:
        heldout.write_text("".join(next(f) for _ in range(10)), encoding="utf-8")
    code, out, err = bilm(capsys, "evaluate", "--checkpoint", diverged, "--data", heldout, "--device", "cpu",
                          "--batch-size", "8")
    assert code == 0
    table = [line for line in out.splitlines() if "perplexity" in line]
    assert [line.split()[0] for line in table] == ["forward", "backward", "average"]
    assert all(re.search(r"perplexity +(inf|[\d.]+) +mean loss [\d.]+", line) for line in table), table
    _says_diverged(err)
    code, out, err = bilm(capsys, "evaluate", "--checkpoint", diverged, "--data", heldout, "--device", "cpu",
                          "--batch-size", "8", "--json")
    result = strict_json(out)
    assert code == 0 and result["diverged"] and result["forward"]["mean_loss"] > 3 * math.log(10000)
    for d in ("forward", "backward"):  # a perplexity past float range is "inf", its mean loss a number beside it
        assert result[d]["perplexity"] == "inf" or result[d]["perplexity"] == math.exp(result[d]["mean_loss"])
    # The run directory has no healthy checkpoint: the error says where the diverged state is.
    code, out, err = bilm(capsys, "evaluate", "--checkpoint", os.path.dirname(os.path.dirname(diverged)),
                          "--data", heldout, "--device", "cpu")
    assert code != 0 and f"the run diverged: its state is in {diverged}" in err and "Traceback" not in err


def test_score_export_and_embed_on_the_diverged_checkpoint(diverged, capsys, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The game began in 1998 .\nA second line .\n", encoding="utf-8")
    code, out, err = bilm(capsys, "score", "--model", diverged, "--input", text, "--no-progress")
    assert code == 0
    records = [strict_json(line) for line in out.splitlines()]
    assert [r["text"] for r in records] == text.read_text().splitlines()
    assert err.splitlines()[0].startswith("scored 2 lines")
    _says_diverged(err)
    # Export: written, and it says what the weights are if they are not finite.
    export = tmp_path / "export"
    code, out, err = bilm(capsys, "export", "--checkpoint", diverged, "--out", export, "--include-softmax")
    assert code == 0 and out.startswith(f"exported {diverged} -> ")
    assert all(line.startswith("warning: ") for line in err.splitlines())
    code, out, err = bilm(capsys, "score", "--model", export, "--input", text, "--no-progress")
    assert code == 0 and len(out.splitlines()) == 2
    _says_diverged(err)
    # Embed: finite vectors are written; anything else is refused in one line and nothing is written.
    for dtype in ("float32", "float16"):
        vectors = tmp_path / f"vectors-{dtype}.hdf5"
        code, out, err = bilm(capsys, "embed", "--model", export, "--input", text, "--out", vectors, "--dtype", dtype)
        if code == 0:
            with h5py.File(vectors) as f:
                assert all(np.isfinite(f[k][...]).all() for k in ("0", "1"))
        else:
            (line,) = [x for x in err.strip().splitlines() if not x.startswith("embed:")]  # not the progress bar
            assert code == 1 and not vectors.exists() and line.startswith("bilm embed: error: ")
            assert re.search(r"line 1: .*(NaN or inf|exceeds float16's range)", line)


@pytest.fixture(scope="module")
def non_finite_weights(tmp_path_factory, corpus):
    """A blow-up that reaches the weights: at learning rate 1e30 the step-2 update overflows float32,
    and the state the stop saved holds NaN/inf (at 5000 the clipped Adagrad steps keep them finite)."""
    run = tmp_path_factory.mktemp("nan-weights") / "run"
    argv = ["train", "--config", TINY, "--data", corpus, "--out", str(run), "--no-progress"]
    for override in (*QUICK, "optim.lr=1e30", "train.max_steps=30", "train.on_divergence=stop",
                     "train.eval_every_steps=0"):
        argv += ["--set", override]
    assert bilm_main(argv) == EXIT_DIVERGED
    diverged = os.path.join(run, "checkpoints", "diverged-step-00000005.pt")
    assert not all(bool(np.isfinite(v.numpy()).all()) for v in load_checkpoint(diverged)["model"].values())
    return diverged


def test_weights_holding_nan_or_inf_are_named_by_export_evaluate_score_and_refused_by_embed(
        non_finite_weights, capsys, tmp_path):
    """What each command says of a real diverged state whose weights are not finite: export writes
    it and warns (``--strict`` refuses), evaluate and score print their figures and name the tensors,
    embed and dump-token-embeddings write nothing and say why in one line."""
    named = re.compile(r"NaN or inf in \d+ tensors? \(\S")
    text = tmp_path / "text.txt"
    text.write_text("The game began in 1998 .\nA second line .\n", encoding="utf-8")
    export = tmp_path / "export"
    code, out, err = bilm(capsys, "export", "--checkpoint", non_finite_weights, "--out", export, "--strict")
    assert code == 1 and not export.exists() and "--strict" in err and named.search(err)
    code, out, err = bilm(capsys, "export", "--checkpoint", non_finite_weights, "--out", export, "--include-softmax")
    (warning,) = err.splitlines()
    assert code == 0 and warning.startswith("warning: the weights hold NaN or inf") and named.search(warning)
    code, out, err = bilm(capsys, "evaluate", "--checkpoint", non_finite_weights, "--data", text, "--device", "cpu",
                          "--json")
    result = strict_json(out)
    assert code == 0 and result["diverged"] == ["forward", "backward"]
    assert result["forward"]["mean_loss"] == "nan" and result["forward"]["perplexity"] == "nan"
    assert "its weights hold NaN or inf" in _says_diverged(err)
    code, out, err = bilm(capsys, "score", "--model", export, "--input", text, "--no-progress")
    assert code == 0 and [strict_json(line)["forward"]["perplexity"] for line in out.splitlines()] == ["nan", "nan"]
    assert "its weights hold NaN or inf" in _says_diverged(err)
    for dtype in ("float32", "float16"):
        vectors = tmp_path / f"vectors-{dtype}.hdf5"
        code, out, err = bilm(capsys, "embed", "--model", export, "--input", text, "--out", vectors, "--dtype", dtype)
        (line,) = [x for x in err.strip().splitlines() if not x.startswith(("embed:", "note:"))]
        assert code == 1 and not vectors.exists()
        assert line.startswith(f"bilm embed: error: {text}, line 1: the model gives vectors holding NaN or inf "
                               "(its weights hold NaN or inf in ") and line.endswith("; nothing written")
    tokens = tmp_path / "tokens.hdf5"
    code, out, err = bilm(capsys, "dump-token-embeddings", "--model", export, "--vocab", export / "vocab.txt",
                          "--out", tokens)
    (line,) = [x for x in err.strip().splitlines() if not x.startswith("tokens:")]  # not the progress bar
    assert code == 1 and not tokens.exists() and "hold NaN or inf (the weights hold NaN or inf in " in line


# ----- no false alarm

def test_no_false_alarm_in_the_first_100_steps_of_the_tiny_preset(tmp_path, corpus, capsys):
    """The preset's own learning rate on the sample, the guard ready to stop: it never fires (docs/divergence.md
    gives the measured margins: the sampled loss stays near 0.8 x log(V), the bound is 3 x log(V))."""
    run = tmp_path / "run"
    code, out, _ = train(capsys, run, corpus, "train.max_steps=100", "train.on_divergence=stop",
                         "train.eval_every_steps=50", "train.log_every_steps=1")
    assert code == 0 and not events(run)
    bound = 3 * math.log(sum(1 for _ in open(os.path.join(os.path.dirname(corpus), "vocab.txt"))))
    assert max(max(r["loss/forward"], r["loss/backward"]) for r in rows(run) if "loss/forward" in r) < bound / 2


@pytest.mark.parametrize("recipe", [None, "adam", "adam-warmup"])
def test_no_false_alarm_in_the_first_100_steps_of_a_fixture_run(tmp_path, capsys, recipe):
    """bilm-tf's test model on its own fixture data (a 31-word vocabulary: the full softmax), with each
    recipe laid over the preset."""
    run = tmp_path / "run"
    argv = ["train", "--config", TINY, *(["--config", os.path.join(ROOT, "configs", "recipes", f"{recipe}.yaml")]
                                         if recipe else []),
            "--data", TRAIN_DATA, "--vocab", TRAIN_VOCAB, "--out", run, "--no-progress"]
    for override in (*BILM_TF_TEST_MODEL, "train.max_steps=100", "train.on_divergence=stop", "train.log_every_steps=1"):
        argv += ["--set", override]
    code, out, _ = bilm(capsys, *argv)
    assert code == 0 and not events(run), out
