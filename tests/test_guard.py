"""Heldout perplexity while training, the divergence guard and the best checkpoint (issue 21).

A small prepared corpus (1,500 lines of the bundled WikiText-2 slice, a tenth held out) and the
bilm-tf test model; figures are forced where a test needs a divergence."""
from __future__ import annotations

import io
import json
import logging
import math
import os
import subprocess
import sys

import pytest
import torch

import bilm.training.heldout as heldout_module
import bilm.training.run as train_module
from bilm.runs.checkpoint import load_checkpoint
from bilm.runs.run_dir import best_checkpoint_path, list_checkpoints
from bilm.cli import EXIT_DIVERGED, main as bilm_main
from bilm.data import load_manifest
from bilm.scoring.evaluate import evaluate
from bilm.commands.export import export
from bilm.training.guard import DivergenceGuard
from bilm.training.heldout import SAMPLE_NAME, unigram_perplexity
from bilm.core.logs import log
from bilm.core.progress import progress_bar
from bilm.training.run import train
from bilm.core.vocab import Vocabulary
from train_helpers import BILM_TF_TEST_MODEL, ROOT, TRAIN_DATA, TRAIN_VOCAB, tiny_config

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """manifest.json of a prepared corpus with a heldout split and vocab_counts.tsv."""
    tmp = tmp_path_factory.mktemp("corpus")
    with open(os.path.join(ROOT, "data", "sample", "train.txt"), encoding="utf-8") as f:
        lines = [next(f) for _ in range(1500)]
    (tmp / "corpus.txt").write_text("".join(lines), encoding="utf-8")
    assert bilm_main(["prepare", str(tmp / "corpus.txt"), "--out", str(tmp / "data"), "--heldout-fraction", "0.1",
                      "--workers", "1"]) == 0
    return str(tmp / "data" / "manifest.json")


def _config(*overrides):
    return tiny_config("train.eval_tokens=600", "train.log_every_steps=1", "train.seed=3", *overrides)


def _rows(run):
    return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


def _heldout(run):
    return {r["step"]: (r["heldout_perplexity/forward"], r["heldout_perplexity/backward"])
            for r in _rows(run) if "heldout_perplexity/forward" in r}


def _events(run):
    return [r for r in _rows(run) if r.get("event") == "divergence"]


def _fake(perplexity):
    """A heldout result in ``bilm.scoring.evaluate.summarize``'s form."""
    d = {"perplexity": perplexity, "mean_loss": math.log(perplexity)}
    return {"forward": d, "backward": dict(d), "average_perplexity": perplexity, "average_mean_loss": d["mean_loss"]}


@pytest.fixture
def messages():
    """What bilm logs (the CLI shows it on rank 0)."""
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)
    yield records
    log.removeHandler(handler)
    log.setLevel(level)


# ----- heldout perplexity while training

def test_heldout_figures_equal_bilm_evaluate_and_the_series_resumes_once(tmp_path, corpus):
    run = str(tmp_path / "run")
    overrides = ("train.eval_every_steps=10", "train.checkpoint_every_steps=10", "train.keep_checkpoints=5")
    train(_config(*overrides, "train.max_steps=20"), corpus, run, progress=False)
    sample = os.path.join(run, SAMPLE_NAME)
    sentences = open(sample).read().splitlines()
    assert 0 < sum(len(s.split()) for s in sentences) <= 600
    # The first sentences of the heldout split, in its order (bilm prepare shuffled it).
    with open(load_manifest(corpus)["heldout"]["shards"][0], encoding="utf-8") as f:
        assert sentences == [line.rstrip("\n") for _, line in zip(sentences, f)]
    figures = _heldout(run)
    assert sorted(figures) == [10, 20]
    # The figure of step 20 is what `bilm evaluate` says of that checkpoint on the sample by default
    # (streams carrying their states), and not what it says sentence by sentence.
    checkpoint = os.path.join(run, "checkpoints", "step-00000020.pt")
    result = evaluate(checkpoint, sample, pretokenized=True, progress=False, device="cpu")
    assert figures[20] == (result["forward"]["perplexity"], result["backward"]["perplexity"])
    fresh = evaluate(checkpoint, sample, pretokenized=True, per_sentence=True, progress=False, device="cpu")
    assert fresh["forward"]["perplexity"] != figures[20][0]
    assert load_checkpoint(list_checkpoints(os.path.join(run, "checkpoints"))[-1])["heldout"][
        "heldout_perplexity/forward"] == figures[20][0]
    # Killed after logging step 23: the resumed run drops it and continues the series once.
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 23, "loss": 1.0}) + "\n")
    train(_config(*overrides, "train.max_steps=40"), corpus, run, resume=True, progress=False)
    steps = [r["step"] for r in _rows(run)]
    assert steps == list(range(1, 41))
    assert sorted(_heldout(run)) == [10, 20, 30, 40]


def test_a_run_without_heldout_data_says_so_once(tmp_path, messages):
    train(_config("train.max_steps=3"), TRAIN_DATA, str(tmp_path / "run"), vocab_file=TRAIN_VOCAB, progress=False)
    said = [m for m in messages if "cannot watch its heldout perplexity" in m]
    assert len(said) == 1 and "--eval-data" in said[0]


def test_eval_data_given_as_raw_text_uses_the_run_tokenizer(tmp_path, corpus):
    raw = tmp_path / "raw.txt"
    raw.write_text("The cat sat on the mat .\nA second line here .\n", encoding="utf-8")
    run = str(tmp_path / "run")
    train(_config("train.max_steps=2", "train.eval_every_steps=2"), corpus, run, progress=False, eval_data=str(raw))
    assert open(os.path.join(run, SAMPLE_NAME)).read().splitlines() == ["The cat sat on the mat .",
                                                                      "A second line here ."]
    assert sorted(_heldout(run)) == [2]


def test_unigram_perplexity_is_add_one_over_the_training_counts():
    vocab = Vocabulary(["<S>", "</S>", "<UNK>", "a", "b"])
    counts = [2, 2, 0, 3, 1]  # 2 sentences; total 8, + 5 for add-one
    got = unigram_perplexity([["a", "b"], ["zzz"]], vocab, counts)
    p = {i: (c + 1) / 13 for i, c in enumerate(counts)}
    forward = math.exp(-(math.log(p[3]) + math.log(p[4]) + math.log(p[2]) + 2 * math.log(p[1])) / 5)
    assert got["forward"] == pytest.approx(forward, rel=1e-12)
    assert got["backward"] == pytest.approx(forward, rel=1e-12)  # <S> and </S> have the same count here


def test_progress_into_a_file_is_a_line_a_minute_not_one_per_update():
    out = io.StringIO()
    with progress_bar(range(5000), total=5000, file=out, desc="evaluate") as bar:
        for _ in bar:
            pass
    assert out.getvalue().count("evaluate") <= 3


def test_bilm_evaluate_logs_few_progress_lines_into_a_file(tmp_path, corpus):
    run = str(tmp_path / "run")
    train(_config("train.max_steps=2", "train.batch_size=1", "train.eval_tokens=0"), corpus, run, progress=False)
    log_file = tmp_path / "evaluate.log"
    with open(log_file, "w") as err:
        subprocess.run([sys.executable, "-m", "bilm.cli", "evaluate", "--checkpoint", run, "--data", corpus,
                        "--device", "cpu", "--batch-size", "64"], stderr=err, stdout=subprocess.DEVNULL, check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    text = log_file.read_text()
    assert 1 <= text.count("evaluate:") <= 3, text[-2000:]
    assert "/" in text.split("evaluate:")[-1]  # a total, so an ETA


# ----- the divergence guard

def _nan_at(monkeypatch, k):
    """The softmax bias becomes NaN just before step k (once): the loss of step k is the first non-finite one."""
    original = train_module.TrainStep.step
    done = []

    def step(self, batch):
        if self.steps_done == k - 1 and not done:
            done.append(k)
            with torch.no_grad():
                self.model.softmax.bias[0] = float("nan")
        return original(self, batch)
    monkeypatch.setattr(train_module.TrainStep, "step", step)


def _train_argv(run, data, *overrides):
    argv = ["train", "--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--data", data, "--out", str(run),
            "--no-progress"]
    for override in (*BILM_TF_TEST_MODEL, "train.seed=3", *overrides):
        argv += ["--set", override]
    return argv


def test_injected_nan_at_step_k_stops_at_step_k_with_exit_3(tmp_path, monkeypatch, capsys):
    _nan_at(monkeypatch, 7)
    run = tmp_path / "run"
    code = bilm_main([*_train_argv(run, TRAIN_DATA, "train.max_steps=30", "train.log_every_steps=5",
                                   "train.checkpoint_every_steps=5", "train.on_divergence=stop"),
                      "--vocab", TRAIN_VOCAB])
    assert code == EXIT_DIVERGED == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("divergence at step 7: the training loss or gradient norm is not finite; stopped")
    assert "diverged-step-00000010.pt" in err[0] and "last good checkpoint: " in err[0] and "step-00000005.pt" in err[0]
    # Nothing non-finite in the series --resume continues from.
    assert [os.path.basename(p) for p in list_checkpoints(str(run / "checkpoints"))] == ["step-00000005.pt"]
    (event,) = _events(str(run))
    assert (event["diverged_step"], event["seen_step"], event["action"]) == (7, 10, "stop")


def test_warn_logs_the_firing_once_and_goes_on(tmp_path, monkeypatch, messages):
    _nan_at(monkeypatch, 4)
    run = str(tmp_path / "run")
    summary = train(_config("train.max_steps=12", "train.on_divergence=warn"), TRAIN_DATA, run,
                    vocab_file=TRAIN_VOCAB, progress=False)
    assert summary["step"] == 12 and summary["diverged"] is None
    fired = [m for m in messages if m.startswith("divergence at step")]
    assert fired == ["divergence at step 4: the training loss or gradient norm is not finite; training goes on "
                     "(train.on_divergence: warn)"]
    assert [e["action"] for e in _events(run)] == ["warn"]


def test_nan_rolls_back_to_the_last_checkpoint_and_finishes(tmp_path, monkeypatch):
    _nan_at(monkeypatch, 7)
    run = str(tmp_path / "run")
    summary = train(_config("train.max_steps=12", "train.checkpoint_every_steps=5"), TRAIN_DATA, run,
                    vocab_file=TRAIN_VOCAB, progress=False)
    assert summary["step"] == 12 and summary["diverged"] is None
    (event,) = _events(run)
    assert (event["diverged_step"], event["to_step"], event["lr_factor"]) == (7, 5, 0.5)
    final = load_checkpoint(list_checkpoints(os.path.join(run, "checkpoints"))[-1])
    assert all(torch.isfinite(v).all() for v in final["model"].values())
    assert [r["lr"] for r in _rows(run) if "lr" in r][-1] == pytest.approx(0.1)


def _heldout_blows_up(monkeypatch, blown):
    """The heldout figure of the evaluations whose number (from 1) ``blown`` accepts is made 100 times larger."""
    original = heldout_module.HeldoutEval.run
    calls = []

    def run(self, model, env):
        result = original(self, model, env)
        calls.append(1)
        return _fake(100 * result["forward"]["perplexity"]) if blown(len(calls)) else result
    monkeypatch.setattr(heldout_module.HeldoutEval, "run", run)
    return original


def test_heldout_blow_up_rolls_back_bit_exactly_and_lowers_the_rate(tmp_path, corpus, monkeypatch):
    overrides = ("train.eval_every_steps=10", "train.checkpoint_every_steps=10", "train.keep_checkpoints=5")
    # A: the heldout figure of step 20 blows up: back to step 10's checkpoint, learning rate 0.2 x 0.5.
    original = _heldout_blows_up(monkeypatch, lambda n: n == 2)
    a = str(tmp_path / "a")
    # Without the data skip (the default), a rollback is a resume with a lower rate (the skip: the next test).
    summary = train(_config(*overrides, "train.max_steps=30", "train.rollback_skip_data=false"), corpus, a,
                    progress=False)
    assert summary["step"] == 30 and summary["guard"]["lr_factor"] == 0.5
    (event,) = _events(a)
    assert (event["diverged_step"], event["to_step"], event["action"]) == (20, 10, "rollback")
    assert event["to_checkpoint"].endswith("step-00000010.pt")
    monkeypatch.setattr(heldout_module.HeldoutEval, "run", original)
    # B: the same run stopped at step 10, resumed with the learning rate 0.1: the same weights and losses.
    b = str(tmp_path / "b")
    train(_config(*overrides, "train.max_steps=10"), corpus, b, progress=False)
    train(_config(*overrides, "train.max_steps=30", "optim.lr=0.1"), corpus, b, resume=True, progress=False)
    final_a = load_checkpoint(os.path.join(a, "checkpoints", "step-00000030.pt"))
    final_b = load_checkpoint(os.path.join(b, "checkpoints", "step-00000030.pt"))
    for key in final_a["model"]:
        assert torch.equal(final_a["model"][key], final_b["model"][key]), key
    losses = lambda run: {r["step"]: (r["loss"], r["lr"]) for r in _rows(run) if "loss" in r}
    assert losses(a) == losses(b)
    assert losses(a)[11][1] == pytest.approx(0.1)
    # The abandoned stretch's lines moved aside; the series has each step once.
    assert [r["step"] for r in _rows(a) if "step" in r] == list(range(1, 31))
    assert [r["step"] for r in map(json.loads, open(os.path.join(a, "metrics-rolled-back.jsonl")))] == \
        list(range(11, 21))


def test_a_rollback_skips_the_batches_the_abandoned_stretch_trained_on(tmp_path, monkeypatch):
    seen = []
    original = train_module.TrainStep.step

    def step(self, batch):
        seen.append(batch["forward"]["token_ids"].clone())
        return original(self, batch)
    monkeypatch.setattr(train_module.TrainStep, "step", step)
    reference = str(tmp_path / "reference")
    train(_config("train.max_steps=10"), TRAIN_DATA, reference, vocab_file=TRAIN_VOCAB, progress=False)
    batches, seen[:] = list(seen), []
    _nan_at(monkeypatch, 7)  # over the recording step: the NaN comes before the batch is recorded
    run = str(tmp_path / "run")
    train(_config("train.max_steps=8", "train.checkpoint_every_steps=5", "train.rollback_skip_data=true"), TRAIN_DATA,
          run, vocab_file=TRAIN_VOCAB, progress=False)
    (event,) = _events(run)
    assert (event["diverged_step"], event["to_step"], event["skipped_batches"]) == (7, 5, 2)
    # Steps 1-7 trained on batches 1-7; back at step 5, steps 6-8 train on batches 8-10 (6 and 7 skipped).
    assert len(seen) == 10
    for got, want in zip(seen, batches[:7] + batches[7:10]):
        assert torch.equal(got, want)
    assert not torch.equal(seen[7], batches[5])


def test_a_repeated_rollback_goes_one_checkpoint_further_back(tmp_path, corpus, monkeypatch):
    _heldout_blows_up(monkeypatch, lambda n: n in (3, 4))
    run_dir = str(tmp_path / "run")
    # keep_checkpoints 1: the older healthy checkpoints survive pruning for the rollbacks that need them.
    summary = train(_config("train.eval_every_steps=5", "train.checkpoint_every_steps=5", "train.keep_checkpoints=1",
                            "train.max_steps=20", "train.rollback_further_back=true"), corpus, run_dir, progress=False)
    assert summary["step"] == 20
    # Step 15 blows up twice: back to 10, then (a rollback in a row) to 5.
    assert [(e["diverged_step"], e["to_step"]) for e in _events(run_dir)] == [(15, 10), (15, 5)]
    assert summary["guard"]["lr_factor"] == 0.25


def test_rollbacks_that_do_not_get_past_the_step_stop(tmp_path, corpus, monkeypatch):
    _heldout_blows_up(monkeypatch, lambda n: n > 1)
    run_dir = str(tmp_path / "run")
    summary = train(_config("train.eval_every_steps=5", "train.checkpoint_every_steps=5", "train.max_steps=40",
                            "train.max_rollbacks=2"), corpus, run_dir, progress=False)
    assert summary["diverged"] is not None and summary["step"] == 10
    assert "2 rollbacks in a row did not get past it" in summary["diverged"]
    assert [e["action"] for e in _events(run_dir)] == ["rollback", "rollback", "stop"]
    assert summary["guard"]["lr_factor"] == 0.25


def test_a_rollback_that_gets_healthy_past_the_step_starts_a_new_count(tmp_path, corpus, monkeypatch):
    # Issue 21's seed 4: step 350 fired, the third rollback's step 350 was healthy, step 400 fired: that is a
    # new divergence (roll back again), not a fourth failure to get past 350 (which stopped the run).
    # Checks: 5 ok, 10 blows up, (back to 5) 10 ok, 15 blows up, (back to 10) 15 ok, 20 ok.
    _heldout_blows_up(monkeypatch, lambda n: n in (2, 4))
    run_dir = str(tmp_path / "run")
    summary = train(_config("train.eval_every_steps=5", "train.checkpoint_every_steps=5", "train.max_steps=20",
                            "train.max_rollbacks=1"), corpus, run_dir, progress=False)
    assert summary["diverged"] is None and summary["step"] == 20
    assert [(e["diverged_step"], e["action"], e.get("to_step")) for e in _events(run_dir)] == \
        [(10, "rollback", 5), (15, "rollback", 10)]


def test_divergence_rules():
    guard = DivergenceGuard(2.0, unigram={"forward": 900.0, "backward": 900.0})
    # Not yet below the unigram model: learning, not diverging.
    assert guard.check_heldout(10, {"forward": 5000.0, "backward": 5000.0}) is None
    guard.record_healthy(10, {"forward": 5000.0, "backward": 5000.0})
    guard.record_healthy(20, {"forward": 500.0, "backward": 400.0})
    assert guard.check_heldout(30, {"forward": 950.0, "backward": 420.0}).what.startswith(
        "forward heldout perplexity 950.0 is above the add-one unigram model's 900.0")
    assert guard.check_heldout(30, {"forward": 600.0, "backward": 801.0}).what.startswith(
        "backward heldout perplexity 801.0 is above 2 x its best so far (400.0)")
    assert guard.check_heldout(30, {"forward": float("nan"), "backward": 400.0}) is not None
    assert guard.check_heldout(30, {"forward": 600.0, "backward": 790.0}) is None


def test_training_loss_bound_is_a_multiple_of_the_uniform_models_loss():
    guard = DivergenceGuard(2.0, vocab_size=1000, loss_factor=3.0)
    assert guard.loss_bound == pytest.approx(3 * math.log(1000))
    assert guard.check_training(5, {"forward": 20.0, "backward": 20.7}, 5) is None
    fired = guard.check_training(7, {"forward": 20.0, "backward": 80000.0}, 7)
    assert (fired.step, fired.figure, fired.bound) == (7, 80000.0, guard.loss_bound)
    assert fired.line() == ("divergence at step 7: backward training loss averaged over 7 steps is 80,000.0, "
                            "above 3 x log(vocabulary size 1,000) = 20.7")
    assert "is nan" in guard.check_training(3, {"forward": float("nan"), "backward": 1.0}, 1).what
    # The same bound holds for a heldout mean loss, even at the first evaluation (no best yet).
    heldout = guard.check_heldout(10, {"forward": float("inf"), "backward": 10.0}, {"forward": 800.0, "backward": 2.3})
    assert heldout.what == "forward heldout perplexity is inf (mean loss 800.0)"
    high = guard.check_heldout(10, {"forward": math.exp(30.0), "backward": 10.0}, {"forward": 30.0, "backward": 2.3})
    assert high.what.startswith("forward heldout mean loss 30.0 (perplexity 1.069e+13) is above 3 x log(vocabulary")
    # Off: only non-finite figures fire.
    off = DivergenceGuard(2.0, vocab_size=1000, loss_factor=None)
    assert off.loss_bound is None and off.check_training(1, {"forward": 1e30, "backward": 1e30}, 1) is None


# ----- the best checkpoint

def test_best_checkpoint_survives_pruning_and_resume_and_exports(tmp_path, corpus, monkeypatch):
    figures = {10: 500.0, 20: 300.0, 30: 400.0, 40: 450.0, 50: 350.0, 60: 320.0}
    steps = iter(sorted(figures))
    monkeypatch.setattr(heldout_module.HeldoutEval, "run", lambda self, model, env: _fake(figures[next(steps)]))
    run = str(tmp_path / "run")
    overrides = ("train.eval_every_steps=10", "train.checkpoint_every_steps=10", "train.keep_checkpoints=1")
    train(_config(*overrides, "train.max_steps=40"), corpus, run, progress=False)
    ckpts = os.path.join(run, "checkpoints")
    assert [os.path.basename(p) for p in list_checkpoints(ckpts)] == ["step-00000040.pt"]
    assert load_checkpoint(best_checkpoint_path(ckpts))["step"] == 20
    train(_config(*overrides, "train.max_steps=60"), corpus, run, resume=True, progress=False)
    best = load_checkpoint(best_checkpoint_path(ckpts))
    assert best["step"] == 20 and best["guard"]["best_average"] == 300.0
    result = export(run, str(tmp_path / "export"), best=True)
    assert result["checkpoint"] == best_checkpoint_path(ckpts)
    newest = export(run, str(tmp_path / "newest"))
    assert newest["checkpoint"].endswith("step-00000060.pt")


def test_export_best_without_one_says_why(tmp_path, capsys):
    run = tmp_path / "run"
    train(_config("train.max_steps=2"), TRAIN_DATA, str(run), vocab_file=TRAIN_VOCAB, progress=False)
    assert bilm_main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "x"), "--best"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no best.pt in" in err and "heldout data" in err


# ----- under torchrun

GUARD_RANKS = os.path.join(HERE, "dist_scripts", "guard_ranks.py")


def _torchrun(n, *args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", GUARD_RANKS,
           *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.mark.distributed
def test_two_ranks_give_the_heldout_figure_of_one(tmp_path, corpus):
    run = str(tmp_path / "run")
    train(_config("train.max_steps=10", "train.eval_tokens=2000", "train.batch_size=4"), corpus, run, progress=False)
    ckpt = list_checkpoints(os.path.join(run, "checkpoints"))[-1]
    subprocess.run([sys.executable, GUARD_RANKS, "eval", ckpt, corpus, tmp_path / "one", tmp_path / "one.json"],
                   check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    _torchrun(2, "eval", ckpt, corpus, tmp_path / "two", tmp_path / "two.json")
    one, two = (json.load(open(tmp_path / f"{n}.json")) for n in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for d in ("forward", "backward"):
        assert one[d]["tokens"] == two[d]["tokens"] > 1000
        # The same 4 streams, 2 on each rank: only the float sums' order and the matmuls' batch differ.
        assert two[d]["perplexity"] == pytest.approx(one[d]["perplexity"], rel=1e-6)


@pytest.mark.distributed
def test_a_rollback_under_torchrun_is_exact_on_every_rank(tmp_path, corpus):
    sets = ["train.eval_every_steps=4", "train.checkpoint_every_steps=4", "train.keep_checkpoints=5",
            "train.log_every_steps=1", "train.eval_tokens=600", "train.device=cpu"]

    def argv(run, *more):
        return _train_argv(run, corpus, *sets, *more)
    # A: the second evaluation (step 8) blows up: every rank goes back to step 4, learning rate x 0.5.
    _torchrun(2, "train", 2, *argv(tmp_path / "a", "train.max_steps=12", "train.rollback_skip_data=false"))
    (event,) = _events(str(tmp_path / "a"))
    assert (event["diverged_step"], event["to_step"]) == (8, 4)
    # B: the same run stopped at step 4 and resumed with the learning rate 0.1.
    _torchrun(2, "train", 0, *argv(tmp_path / "b", "train.max_steps=4"))
    _torchrun(2, "train", 0, *argv(tmp_path / "b", "train.max_steps=12", "optim.lr=0.1"), "--resume")
    final_a, final_b = (load_checkpoint(str(tmp_path / r / "checkpoints" / "step-00000012.pt")) for r in "ab")
    for key in final_a["model"]:
        assert torch.equal(final_a["model"][key], final_b["model"][key]), key
    assert final_a["rank_states"][1]["data"] == final_b["rank_states"][1]["data"]


# ----- the seeds x recipes benchmark (issue 21, item 4), in its smoke mode

def test_divergence_benchmark_smoke_writes_the_table(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "divergence.py"), "--smoke", "--seeds", "0",
                          "--recipes", "bilmtf", "rollback", "--work", str(tmp_path)], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    table = (tmp_path / "divergence.md").read_text()
    assert "| recipe | seed | forward | backward | diverged | scored step | tokens/s | wall s | guard firings |" in table
    assert "| bilmtf | 0 |" in table and "| rollback | 0 |" in table
    runs = json.load(open(tmp_path / "divergence.json"))["runs"]
    # No firing: the guard leaves the numbers alone, whether it only watches or may act.
    assert runs["bilmtf"]["0"]["bilm_eval"] == runs["rollback"]["0"]["bilm_eval"]


def test_a_rollback_under_deepspeed_reloads_its_optimizer_state(tmp_path, corpus):
    pytest.importorskip("deepspeed", reason="deepspeed extra not installed")
    ds_config = os.path.join(ROOT, "configs", "deepspeed", "zero1.json")
    sets = ["train.eval_every_steps=4", "train.checkpoint_every_steps=2", "train.keep_checkpoints=5",
            "train.log_every_steps=1", "train.eval_tokens=600", "train.device=cpu", "train.strategy=deepspeed",
            f"train.deepspeed_config={ds_config}", "train.sparse_softmax=false"]

    def bilm(blow_up_at, run, *more, flags=()):
        out = subprocess.run([sys.executable, GUARD_RANKS, "train", str(blow_up_at),
                              *_train_argv(run, corpus, *sets, *more), *flags], capture_output=True, text=True,
                             timeout=600,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    # The evaluation of step 8 blows up: back to step 4 (its DeepSpeed state too); step 6's are deleted.
    bilm(2, tmp_path / "a", "train.max_steps=10", "train.rollback_skip_data=false")
    (event,) = _events(str(tmp_path / "a"))
    assert (event["diverged_step"], event["to_step"]) == (8, 4)
    # The same as stopping at 4 and resuming with half the learning rate (no data skipped).
    bilm(0, tmp_path / "b", "train.max_steps=4")
    bilm(0, tmp_path / "b", "train.max_steps=10", "optim.lr=0.1", flags=["--resume"])
    final_a, final_b = (load_checkpoint(str(tmp_path / r / "checkpoints" / "step-00000010.pt")) for r in "ab")
    for key in final_a["model"]:
        assert torch.equal(final_a["model"][key], final_b["model"][key]), key


@pytest.mark.parametrize("manifest, expected_why, expected_fix", [
    ({"heldout_fraction": 0.01}, "the manifest's heldout split is empty: --heldout-fraction 0.01 of a corpus this "
                                 "small held out no line", "a larger --heldout-fraction, or more text"),
    ({"heldout_fraction": 0}, "the manifest has no heldout split", "bilm prepare --heldout-fraction 0.01"),
    (None, "--data is not a manifest.json", "bilm prepare --heldout-fraction 0.01"),
])
def test_no_heldout_says_why_and_what_to_do(manifest, expected_why, expected_fix):
    from bilm.training.heldout import no_heldout_message

    message = no_heldout_message(manifest, eval_tokens=1000, loss_factor=3)
    assert message.startswith(f"no heldout evaluation ({expected_why}): ")
    assert message.endswith(f"--eval-data FILE|manifest.json (or {expected_fix})")
