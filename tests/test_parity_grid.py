"""benchmarks/parity_bilmtf.py's grid mode, without training: what it compares and how it reports.

The grid's runs take hours (``--grid``; ``--grid --smoke`` checks the whole path in minutes). These
tests pin the cheap parts: the grid spans the axes issue 22 names, both tools are given the same
configuration, and the table reports the worst ratio, per direction, with medians over seeds.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import parity_bilmtf as parity  # noqa: E402  (benchmarks/parity_bilmtf.py)

from bilm.formats.bilmtf import config_from_bilmtf_options  # noqa: E402
from bilm.runs.config import config_from_dict, load_config  # noqa: E402

HARNESS = os.path.join(parity.SHARED, "peers", "harness", "bilmtf_train.py")


def _args(**over) -> argparse.Namespace:
    base = dict(batch_size=32, unroll=20, negatives=1024, dropout=0.1, batches=300, log_every=10, bilm_set=[])
    return argparse.Namespace(**{**base, **over})


def test_grid_spans_the_axes_of_the_issue():
    archs = parity.grid("/corpus")
    assert len(archs) >= 4 and len({a.name for a in archs}) == len(archs)
    assert {a.lstm_dim for a in archs} == {512, 1024}
    assert {a.n_highway for a in archs} == {1, 2}
    assert len({a.filters for a in archs}) >= 2
    assert {a.train_split for a in archs} == {"valid", "test"}
    for a in archs:  # the split that trains is not the one held out
        assert os.path.basename(a.train_text) == f"{a.train_split}.txt" and a.heldout_text != a.train_text
    smoke = [parity.smoke_arch(a, "/sample") for a in archs]
    assert all(s.lstm_dim < 64 and s.heldout_text != s.train_text for s in smoke)


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


@pytest.mark.skipif(not os.path.exists(HARNESS), reason="needs ../shared/peers/harness (set BILM_SHARED)")
@pytest.mark.parametrize("smoke", [False, True])
def test_both_tools_train_the_same_configuration(smoke):
    """bilm's config (elmo_small.yaml + the grid's --set keys) equals what bilm-tf trains: the harness's
    defaults merged with the grid's options, read as bilm reads an imported bilm-tf run."""
    spec = importlib.util.spec_from_file_location("bilmtf_train", HARNESS)
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    a = _args(batch_size=4, unroll=5, negatives=32) if smoke else _args()
    for arch in parity.grid("/corpus"):
        arch = parity.smoke_arch(arch, "/sample") if smoke else arch
        ours = load_config(os.path.join(ROOT, "configs", "elmo_small.yaml"), parity.bilm_overrides(a, arch, seed=3))
        theirs = config_from_dict(config_from_bilmtf_options(
            _merge(harness.default_options(1000), parity.bilmtf_options(a, arch))))
        # Neither is architecture: n_characters says training (261) or prediction (262) and bilm's char
        # embedding has the same rows for both; a char-CNN model takes its vocabulary size from the data.
        theirs.model.char_cnn.n_characters, theirs.model.n_tokens_vocab = ours.model.char_cnn.n_characters, None
        assert ours.model == theirs.model, arch.name
        for key in ("batch_size", "unroll_steps", "dropout", "n_negative_samples_batch"):
            assert getattr(ours.train, key) == getattr(theirs.train, key), (arch.name, key)
        for key in ("name", "lr", "initial_accumulator_value", "max_grad_norm", "loss_scale", "warmup_steps", "decay"):
            assert getattr(ours.optim, key) == getattr(theirs.optim, key), (arch.name, key)
        assert ours.train.max_steps == a.batches and ours.train.seed == 3


def _run(ppl: float, forward: float, backward: float, rate: float) -> dict:
    return {"tokens_per_s": rate, "bilm_eval": {"ppl": ppl, "forward": forward, "backward": backward}}


def test_grid_table_reports_median_ratios_and_the_worst_configuration():
    results = {
        "small": {"unigram": 900.0,
                  "bilm-tf": {0: _run(617, 609, 627, 400), 1: _run(613, 624, 601, 420), 2: _run(651, 629, 674, 410)},
                  "bilm": {0: _run(639, 655, 623, 600), 1: _run(649, 674, 625, 640), 2: _run(1506, 3368, 673, 620)}},
        "large": {"unigram": 900.0,
                  "bilm-tf": {0: _run(554, 573, 536, 370), 1: _run(4251, 30956, 584, 390)},
                  "bilm": {0: _run(573, 569, 540, 630), 1: _run(850, 1100, 657, 600)}},  # forward diverged only
    }
    lines = parity.grid_table(results)
    text = "\n".join(lines)
    ratios = parity.median_ratios(list(results["small"]["bilm-tf"].values()), list(results["small"]["bilm"].values()))
    assert ratios["forward"] == pytest.approx(674 / 624)  # medians over seeds: one divergence moves neither
    assert ratios["tokens_per_s"] == pytest.approx(620 / 410)
    assert "| small | **bilm / bilm-tf** | **1.052** | **1.080** | **0.997** | 1.51 | |" in text
    assert "| small | bilm | median 649.0 (seeds: 639.0, 649.0, 1506.0)" in text
    assert text.count("1 of 3") == 1
    rows = {line.split(" | ")[1]: line for line in lines if line.startswith("| large | bilm")}
    assert rows["bilm-tf"].endswith("| 1 of 2 |") and rows["bilm"].endswith("| 1 of 2 |"), rows
    assert "worst median ratio: 1.080 (small, forward); goal <= 1.03 everywhere" in lines


def test_pooled_ratio_over_the_grid_leaves_diverged_directions_out():
    """The grid-wide figure: geometric mean over configuration-directions of the ratio of geometric means over
    healthy seeds; a direction above the unigram model is left out, its other direction kept."""

    results = {"a": {"unigram": 900.0,
                     "bilm-tf": {0: _run(1, 500, 600, 1), 1: _run(1, 500, 600, 1)},
                     "bilm": {0: _run(1, 600, 500, 1), 1: _run(1, 600, 5000, 1)}},  # seed 1's backward diverged
             "b": {"unigram": 900.0,
                   "bilm-tf": {0: _run(1, 950, 400, 1)},  # forward diverged: no forward cell for "b"
                   "bilm": {0: _run(1, 700, 400, 1)}}}
    ratio, low, high, cells = parity.pooled_ratio(results)
    assert cells == 3
    assert ratio == pytest.approx(math.exp((math.log(600 / 500) + math.log(500 / 600) + 0) / 3))
    assert (low, high) == pytest.approx((ratio, ratio))  # no spread within any tool's healthy seeds
    results["b"]["bilm"][1] = _run(1, 700, 480, 1)
    ratio, low, high, _ = parity.pooled_ratio(results)
    assert low < ratio < high and high <= math.exp(math.log(480 / 400) / 3) + 1e-9
    line = [ln for ln in parity.grid_table(results) if ln.startswith("pooled")][0]
    assert line.startswith(f"pooled over 3 configuration-directions, healthy seeds: bilm / bilm-tf {ratio:.3f} (")
    assert parity.pooled_ratio({"c": {"unigram": 1.0, "bilm-tf": {0: _run(1, 5, 5, 1)}, "bilm": {}}}) is None


def test_null_pass_rate_is_how_often_equal_tools_meet_the_goal():
    """Runs shuffled between the two sides: identical runs always meet the goal; runs whose spread is wide
    (one of three 20% higher) fail it in a fifth of the deals, the same share on every call (a fixed seed)."""
    same = {"c": {"unigram": 900.0, "bilm-tf": {s: _run(600, 600, 600, 1) for s in range(3)},
                  "bilm": {s: _run(600, 600, 600, 1) for s in range(3)}}}
    assert parity.null_pass_rate(same) == 1.0
    wide = {"c": {"unigram": 900.0, "bilm-tf": {0: _run(600, 600, 600, 1), 1: _run(600, 600, 600, 1),
                                                 2: _run(720, 720, 720, 1)},
                  "bilm": {0: _run(600, 600, 600, 1), 1: _run(600, 600, 600, 1), 2: _run(720, 720, 720, 1)}}}
    # a side's median is 720 only when it is dealt both high runs: 4 of the 20 deals of 3 + 3 give them to the
    # bilm side (ratio 1.2, a failure), 4 to bilm-tf's (0.83, a pass)
    rate = parity.null_pass_rate(wide)
    assert rate == parity.null_pass_rate(wide) and 0.75 < rate < 0.85
    assert parity.null_pass_rate(wide, goal=1.25) == 1.0
    assert parity.null_pass_rate({"c": {"unigram": 1.0, "bilm-tf": {}, "bilm": {0: _run(1, 1, 1, 1)}}}) is None
    assert any(line.startswith("two tools equal by construction") for line in parity.grid_table(wide))


def test_null_pass_rate_at_n_seeds_draws_that_many_runs_per_side():
    """With ``seeds=n`` each side draws n runs with replacement from the configuration's pooled runs: a side's
    median is the high value when most of its n draws are (a binomial tail q), and only a high bilm median
    over a low bilm-tf one fails, so equal tools pass with probability 1 - q(1 - q), which grows with n."""
    wide = {"c": {"unigram": 900.0, "bilm-tf": {0: _run(600, 600, 600, 1), 1: _run(720, 720, 720, 1)},
                  "bilm": {0: _run(600, 600, 600, 1), 1: _run(600, 600, 600, 1), 2: _run(600, 600, 600, 1),
                           3: _run(720, 720, 720, 1)}}}  # a third of the pooled runs are high

    def expected(n: int) -> float:
        q = sum(math.comb(n, k) * (1 / 3) ** k * (2 / 3) ** (n - k) for k in range(n // 2 + 1, n + 1))
        return 1 - q * (1 - q)

    for n in (3, 31):
        assert abs(parity.null_pass_rate(wide, seeds=n) - expected(n)) < 0.03  # 2,000 draws: sd under 0.01
    assert parity.null_pass_rate(wide, seeds=3) < 0.85 and parity.null_pass_rate(wide, seeds=31) > 0.95
    lines = parity.grid_table(wide)
    assert any(line.startswith("the same, at N seeds per tool") and "30: " in line for line in lines)


def test_normal_pass_rate_projects_equal_tools_from_the_healthy_runs_spread():
    """Every tool's healthy log-perplexities spread by sd d in both directions: a ratio of two medians of n has sd
    sqrt(pi) d / sqrt(n) (the median's sqrt(pi / 2), times sqrt(2) for the ratio). With d chosen so that this is
    log(1.03), each of the configuration's two directions passes with probability Phi(1); a diverged run (above the
    unigram model) does not widen the spread."""
    n = 4
    d = math.log(1.03) * math.sqrt(n) / math.sqrt(math.pi)
    values = [600 * math.exp(d * z) for z in (-1, 0, 1)]  # sample sd of the logs: d
    res = {"unigram": 900.0, "bilm-tf": {s: _run(v, v, v, 1) for s, v in enumerate(values)},
           "bilm": {s: _run(v, v, v, 1) for s, v in enumerate(values)}}
    res["bilm"][3] = _run(5000, 9000, 600, 1)  # forward diverged; its backward 600 is healthy and in the spread
    rate, sd = parity.normal_pass_rate({"c": res}, seeds=n)
    # the sds per tool and direction: d, d, d and (bilm backward, with 600 twice) a little less; the median is d
    assert sd == pytest.approx(d)
    assert rate == pytest.approx(0.8413447 ** 2, abs=1e-6)
    assert parity.normal_pass_rate({"c": res}, seeds=4 * n)[0] == pytest.approx(0.9772499 ** 2, abs=1e-6)  # Phi(2)
    one_run = {"c": {"unigram": 1.0, "bilm-tf": {0: _run(1, 1, 1, 1)}, "bilm": {}}}
    assert parity.normal_pass_rate(one_run, seeds=3) is None
    assert any(line.startswith("the same in a normal model") for line in parity.grid_table({"c": res}))
