"""Smoke test of examples/classify.py: the fixture biLM, a few sentences, one epoch."""
import importlib.util
import os
import re

import pytest

from conftest import OPTIONS, WEIGHTS

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "classify.py")


@pytest.fixture(scope="module")
def classify():
    # examples/ is not a package: load the script as a module so its main() can be called.
    spec = importlib.util.spec_from_file_location("classify_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ARGS = ["--options", OPTIONS, "--weights", WEIGHTS, "--epochs", "1", "--limit", "80", "--seed", "0"]


def test_classify_prints_both_accuracies(classify, capsys):
    result = classify.main(ARGS)
    out = capsys.readouterr().out
    printed = {}
    for name, pattern in (("elmo", r"test accuracy, ELMo .*:\s+([0-9.]+)"),
                          ("baseline", r"test accuracy, layer 0 only .*:\s+([0-9.]+)")):
        match = re.search(pattern, out)
        assert match, f"no {name} accuracy line in:\n{out}"
        printed[name] = float(match.group(1))
        assert 0.0 <= printed[name] <= 1.0
        assert 0.0 <= result[name] <= 1.0
        assert printed[name] == pytest.approx(result[name], abs=1e-3)
    assert "learned layer weights" in out


def test_classify_is_deterministic(classify, capsys):
    assert classify.main(ARGS) == classify.main(ARGS)


def test_classify_falls_back_to_fixture_model(classify, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(classify, "DEMO_OPTIONS", str(tmp_path / "options.json"))
    monkeypatch.setattr(classify, "DEMO_WEIGHTS", str(tmp_path / "weights.hdf5"))
    args = classify.parse_args([])
    assert classify.resolve_model(args) == (classify.FIXTURE_OPTIONS, classify.FIXTURE_WEIGHTS)
    assert "note: no demo model" in capsys.readouterr().out
    assert os.path.exists(classify.FIXTURE_OPTIONS) and os.path.exists(classify.FIXTURE_WEIGHTS)


def test_classify_cnn_trains_and_prints_accuracy(tmp_path, capsys):
    """The tutorial-style example: ElmoEmbedder vectors -> Conv1d classifier, on a model directory."""
    import shutil

    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(OPTIONS, model / "options.json")
    shutil.copy(WEIGHTS, model / "weights.hdf5")
    path = os.path.join(os.path.dirname(EXAMPLE), "classify_cnn.py")
    spec = importlib.util.spec_from_file_location("classify_cnn_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    accuracy = module.main(["--model", str(model), "--epochs", "3", "--limit", "120"])
    out = capsys.readouterr().out
    match = re.search(r"test accuracy ([0-9.]+)", out)
    assert match and float(match.group(1)) == pytest.approx(accuracy, abs=1e-3)
    assert "vectors of 32" in out
