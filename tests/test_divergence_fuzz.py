"""Extremes of the numeric path, fuzzed with hypothesis (issue 37): losses from 0 to 1e30 and non-finite
through the perplexity conversion, the JSON writer and the guard; learning rates from 1e-8 to 1e6 on a
5-step tiny run; exported weights holding NaN or inf, embedded and scored; float16 vectors past
float16's range. Every case ends in figures or one line, never a traceback. Example counts are small
and derandomized (each training case is a run): the same cases every time, the file in well under a minute."""
from __future__ import annotations

import json
import math
import os
import re

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bilm.cli import EXIT_DIVERGED, main as bilm_main
from bilm.inference.score import _line_record, corpus_summary
from bilm.scoring.evaluate import summarize
from bilm.scoring.perplexity import diverged_directions, figure, json_safe, loss_bound, perplexity
from bilm.training.guard import DivergenceGuard
from train_helpers import BILM_TF_TEST_MODEL, TINY, TRAIN_DATA, TRAIN_VOCAB

FAST = settings(max_examples=200, deadline=None, derandomize=True, database=None)
RUNS = settings(max_examples=6, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FILES = settings(max_examples=8, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

LOSSES = st.one_of(st.floats(0.0, 1e30), st.sampled_from([math.inf, -math.inf, math.nan, 709.78, 709.79, 0.0]))


def strict_json(text: str):
    def refuse(constant):
        raise AssertionError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def error_line(err: str) -> str:
    """The one line of stderr besides the progress bar and the note that the model has no tokenizer."""
    lines = [line for line in err.strip().splitlines() if line.strip() and not line.startswith(("embed:", "note:"))]
    assert len(lines) == 1, lines
    return lines[0]


# ----- the conversion, the JSON and the guard

@FAST
@given(LOSSES)
def test_perplexity_of_any_loss_is_a_figure_never_an_error(loss):
    p = perplexity(loss)
    if math.isnan(loss):
        assert math.isnan(p)
    elif loss > math.log(1.7976931348623157e308):
        assert p == math.inf
    else:
        assert p == math.exp(loss)
    assert isinstance(figure(p), str) and isinstance(figure(loss, "{:,.1f}"), str)
    record = json_safe({"perplexity": p, "mean_loss": loss, "nested": [p, (loss,)]})
    back = strict_json(json.dumps(record, allow_nan=False))
    assert float(back["perplexity"]) == p or math.isnan(p)


@FAST
@given(st.dictionaries(st.sampled_from(["forward/nll", "backward/nll"]), st.floats(0.0, 1e30), min_size=2),
       st.integers(0, 10**6))
def test_summarize_never_raises(nll, tokens):
    sums = {**nll, "forward/tokens": float(tokens), "backward/tokens": float(tokens), "forward/unk": 0.0,
            "backward/unk": 0.0}
    out = summarize(sums)
    for d in ("forward", "backward"):
        assert out[d]["perplexity"] == perplexity(out[d]["mean_loss"])
    assert out["average_perplexity"] == perplexity(out["average_mean_loss"])
    strict_json(json.dumps(json_safe(out), allow_nan=False))


@FAST
@given(st.lists(st.one_of(st.floats(-1e30, 0.0), st.sampled_from([-math.inf, math.nan])), min_size=1, max_size=4),
       st.integers(1, 50))
def test_score_records_of_any_log_probability_are_json(log_probs, n):
    sentences = [{"tokens": ["w"] * (n - 1), "forward": lp, "backward": lp, "predictions": n, "unk": []}
                 for lp in log_probs]
    record = _line_record("a line", sentences, per_token=False)
    summary = corpus_summary([record])
    for d in ("forward", "backward"):
        assert summary[d]["perplexity"] == perplexity(summary[d]["mean_loss"]) or math.isnan(summary[d]["mean_loss"])
    strict_json(json.dumps(json_safe(record), allow_nan=False))
    strict_json(json.dumps(json_safe(summary), allow_nan=False))


@FAST
@given(LOSSES, LOSSES, st.integers(2, 10**6), st.floats(1.0, 100.0))
def test_the_guard_fires_exactly_past_the_bound_or_on_non_finite(forward, backward, vocab_size, factor):
    guard = DivergenceGuard(2.0, vocab_size=vocab_size, loss_factor=factor)
    bound = loss_bound(vocab_size, factor)
    fired = guard.check_training(9, {"forward": forward, "backward": backward}, 9)
    bad = [d for d, x in (("forward", forward), ("backward", backward)) if not x <= bound]
    assert (fired is not None) == bool(bad)
    if fired:
        assert fired.what.startswith(bad[0]) and fired.line().startswith("divergence at step 9: ")
    assert diverged_directions({"forward": forward, "backward": backward}, vocab_size, factor) == bad
    heldout = guard.check_heldout(9, {"forward": perplexity(forward), "backward": perplexity(backward)},
                                  {"forward": forward, "backward": backward})
    assert (heldout is not None) == bool(bad)


# ----- learning rates from 1e-8 to 1e6 on a 5-step tiny run

@RUNS
@given(st.floats(1e-8, 1e6).map(lambda x: float(f"{x:.3g}")))
def test_any_learning_rate_ends_in_figures_or_one_line(tmp_path_factory, capsys, lr):
    run = tmp_path_factory.mktemp("lr")
    argv = ["train", "--config", TINY, "--data", TRAIN_DATA, "--vocab", TRAIN_VOCAB, "--out", str(run), "--no-progress"]
    for override in (*BILM_TF_TEST_MODEL, "train.max_steps=5", "train.log_every_steps=1", f"optim.lr={lr}",
                     "train.on_divergence=stop"):
        argv += ["--set", override]
    code = bilm_main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert code in (0, EXIT_DIVERGED), (code, out, err)
    if code == 0:
        assert "trained 5 steps" in out
    else:
        (line,) = err.strip().splitlines()
        assert re.match(r"divergence at step [1-5]: .*; stopped", line)
    for line in open(os.path.join(run, "metrics.jsonl"), encoding="utf-8"):
        strict_json(line)


# ----- exported weights holding NaN or inf

@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A 2-step tiny model exported with its softmax."""
    tmp = tmp_path_factory.mktemp("export")
    argv = ["train", "--config", TINY, "--data", TRAIN_DATA, "--vocab", TRAIN_VOCAB, "--out", str(tmp / "run"),
            "--no-progress"]
    for override in (*BILM_TF_TEST_MODEL, "train.max_steps=2"):
        argv += ["--set", override]
    assert bilm_main(argv) == 0
    assert bilm_main(["export", "--checkpoint", str(tmp / "run"), "--out", str(tmp / "export"),
                      "--include-softmax"]) == 0
    (tmp / "text.txt").write_text("the cat sat on the mat .\nanother line here .\n", encoding="utf-8")
    return tmp


def _datasets(path: str) -> list[str]:
    names = []
    with h5py.File(path) as f:
        f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) and obj.size else None)
    return sorted(names)


def _damaged_copy(source, target, file_name: str, dataset: str, value: float, where: int) -> None:
    import shutil
    if os.path.exists(target):
        shutil.rmtree(target)
    shutil.copytree(source, target)
    with h5py.File(os.path.join(target, file_name), "r+") as f:
        data = f[dataset][...]
        flat = data.reshape(-1)
        flat[where % flat.size] = value
        f[dataset][...] = data


@FILES
@given(st.data(), st.sampled_from([math.nan, math.inf, -math.inf]))
def test_weights_holding_nan_or_inf_are_said_or_refused(export_dir, capsys, data, value):
    file_name = data.draw(st.sampled_from(["weights.hdf5", "softmax.hdf5"]))
    dataset = data.draw(st.sampled_from(_datasets(os.path.join(export_dir, "export", file_name))))
    damaged = export_dir / "damaged"
    _damaged_copy(export_dir / "export", damaged, file_name, dataset, value, data.draw(st.integers(0, 10**6)))
    text = str(export_dir / "text.txt")
    # embed: finite vectors written, or one line and no file
    vectors = export_dir / "vectors.hdf5"
    if vectors.exists():
        vectors.unlink()
    code = bilm_main(["embed", "--model", str(damaged), "--input", text, "--out", str(vectors), "--stateless"])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if code == 0:
        with h5py.File(vectors) as f:
            assert np.isfinite(f["0"][...]).all() and np.isfinite(f["1"][...]).all()
    else:
        assert code == 1 and not vectors.exists()
        line = error_line(err)
        assert re.match(r"bilm embed: error: .*, line 1: the model gives vectors holding NaN or inf", line), line
    # score: figures (JSON lines, strict), and a warning line whenever the weights or the figures are not finite
    code = bilm_main(["score", "--model", str(damaged), "--input", text, "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in out + err
    records = [strict_json(line) for line in out.splitlines()]
    assert len(records) == 2
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, err  # the value went into the weights: always said
    assert "NaN or inf" in warnings[0] or "diverged" in warnings[0]


def test_float16_vectors_past_float16s_range_are_refused(export_dir, capsys):
    damaged = export_dir / "loud"
    import shutil
    if damaged.exists():
        shutil.rmtree(damaged)
    shutil.copytree(export_dir / "export", damaged)
    # The token layer is the char CNN's projection: scaled up, its vectors pass float16's 65,504.
    with h5py.File(damaged / "weights.hdf5", "r+") as f:
        for name in ("CNN_proj/W_proj", "CNN_proj/b_proj"):
            f[name][...] = f[name][...] * 1e7 + (1e6 if name.endswith("b_proj") else 0.0)
    text = str(export_dir / "text.txt")
    half = export_dir / "half.hdf5"
    code = bilm_main(["embed", "--model", str(damaged), "--input", text, "--out", str(half), "--dtype", "float16"])
    out, err = capsys.readouterr()
    assert code == 1 and not half.exists() and "Traceback" not in out + err
    line = error_line(err)
    assert "exceeds float16's range" in line and "--dtype float32" in line
    full = export_dir / "full.hdf5"
    assert bilm_main(["embed", "--model", str(damaged), "--input", text, "--out", str(full)]) == 0
    capsys.readouterr()
    with h5py.File(full) as f:
        assert np.abs(f["0"][...]).max() > np.finfo(np.float16).max and np.isfinite(f["0"][...]).all()
