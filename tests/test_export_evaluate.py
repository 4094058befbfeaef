"""Perplexity evaluation, export to the published format, and continued pretraining."""
import json
import math
import os

import h5py
import numpy as np
import pytest
import torch

from bilm import ElmoEmbedder
from bilm.runs.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from bilm.runs.run_dir import list_checkpoints
from bilm.scoring.evaluate import evaluate
from bilm.commands.export import export
from bilm.runs.trained_model import model_from_checkpoint
from bilm.runs.config import config_to_dict
from bilm.core.distributed import DistEnv
from bilm.training.run import train
from bilm.training.step import TrainStep
from bilm.core.vocab import Vocabulary
from conftest import OPTIONS, WEIGHTS
from train_helpers import TRAIN_DATA, TRAIN_VOCAB, tiny_config


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    train(tiny_config("train.max_steps=40", "train.seed=2"), TRAIN_DATA, str(run), vocab_file=TRAIN_VOCAB,
          progress=False)
    return str(run)


def _ppl(run, **kw):
    return evaluate(run, TRAIN_DATA, progress=False, device="cpu", **kw)


def test_perplexity_does_not_depend_on_unroll(trained_run):
    a = _ppl(trained_run, batch_size=2, unroll_steps=3)
    b = _ppl(trained_run, batch_size=2, unroll_steps=17)
    assert a["forward"]["tokens"] == b["forward"]["tokens"] == sum(len(l.split()) + 1 for l in open(TRAIN_DATA))
    assert a["average_perplexity"] == pytest.approx(b["average_perplexity"], rel=1e-4)


def test_per_sentence_depends_on_neither_batch_nor_unroll(trained_run):
    results = [_ppl(trained_run, batch_size=b, unroll_steps=u, per_sentence=True)["average_perplexity"]
               for b in (1, 3) for u in (4, 25)]
    for r in results[1:]:
        assert r == pytest.approx(results[0], rel=1e-4)


def test_uniform_softmax_gives_vocab_size(trained_run, tmp_path):
    path, payload = list_checkpoints(os.path.join(trained_run, "checkpoints"))[-1], None
    payload = load_checkpoint(path)
    payload["model"]["softmax.weight"].zero_()
    payload["model"]["softmax.bias"].zero_()
    uniform = str(tmp_path / "step-00000001.pt")
    save_checkpoint({k: v for k, v in payload.items() if k != "format"}, uniform)
    result = _ppl(uniform)
    vocab_size = sum(1 for _ in open(TRAIN_VOCAB))
    for d in ("forward", "backward"):
        assert result[d]["perplexity"] == pytest.approx(vocab_size, rel=1e-5)


def test_export_loads_in_embedder_and_matches_trainer(trained_run, tmp_path):
    out = str(tmp_path / "export")
    result = export(trained_run, out, include_softmax=True)
    assert result["problems"] == []
    with h5py.File(os.path.join(out, "weights.hdf5")) as f:
        assert f["char_embed"].shape == (261, 4)
        assert "CNN_proj/W_proj" in f and "RNN_1/RNN/MultiRNNCell/Cell1/LSTMCell/W_P_0" in f
    options = json.load(open(os.path.join(out, "options.json")))
    assert options["char_cnn"]["n_characters"] == 262 and options["lstm"]["use_skip_connections"] is True
    sentences = [line.split() for line in open(TRAIN_DATA)][:3]
    embedder = ElmoEmbedder(os.path.join(out, "options.json"), os.path.join(out, "weights.hdf5"), stateful=False)
    got = embedder.embed_batch(sentences)
    model = model_from_checkpoint(trained_run).model
    from bilm.core.chars import CharIdMapper
    ids = torch.from_numpy(CharIdMapper().batch(sentences))
    with torch.no_grad():
        layers, _ = model.bilm(ids, ids[..., 0] > 0)
    for i, s in enumerate(sentences):
        want = torch.stack(layers)[:, i, 1 : len(s) + 1].numpy()
        assert np.abs(got[i] - want).max() <= 1e-5


def test_export_refuses_to_overwrite(trained_run, tmp_path):
    out = str(tmp_path / "export")
    export(trained_run, out)
    with pytest.raises(FileExistsError, match="--force"):
        export(trained_run, out)
    export(trained_run, out, force=True)


def test_export_reports_consumers_that_cannot_load(tmp_path):
    run = str(tmp_path / "run")
    cfg = tiny_config("train.max_steps=1", "model.lstm.use_skip_connections=false")
    train(cfg, TRAIN_DATA, run, vocab_file=TRAIN_VOCAB, progress=False)
    result = export(run, str(tmp_path / "out"))
    assert any("use_skip_connections" in p for p in result["problems"])
    with pytest.raises(ValueError, match="--strict"):
        export(run, str(tmp_path / "strict"), strict=True)


def test_export_init_export_is_bit_identical(trained_run, tmp_path):
    first = str(tmp_path / "first")
    export(trained_run, first, include_softmax=True)
    init = {"weights": os.path.join(first, "weights.hdf5"), "options": os.path.join(first, "options.json"),
            "softmax": os.path.join(first, "softmax.hdf5"), "vocab_tokens": Vocabulary.from_file(TRAIN_VOCAB).tokens}
    # The model `bilm train --init-weights ...` starts from, saved before any step.
    cfg = tiny_config()
    trainer = TrainStep(cfg, 32, DistEnv(), init)
    rerun = str(tmp_path / "step-00000000.pt")
    save_checkpoint({"step": 0, "config": config_to_dict(cfg), "model": trainer.model.state_dict(),
                     "vocab": init["vocab_tokens"]}, rerun)
    second = str(tmp_path / "second")
    export(rerun, second, include_softmax=True)
    for name in ("weights.hdf5", "softmax.hdf5"):
        with h5py.File(os.path.join(first, name)) as a, h5py.File(os.path.join(second, name)) as b:
            names = []
            a.visit(lambda n: names.append(n) if isinstance(a[n], h5py.Dataset) else None)
            for n in names:
                np.testing.assert_array_equal(a[n][...], b[n][...], err_msg=f"{name}:{n}")


def test_fixture_model_continues_training(tmp_path):
    run = str(tmp_path / "run")
    init = {"weights": WEIGHTS, "options": OPTIONS}
    summary = train(tiny_config("train.max_steps=5"), TRAIN_DATA, run, vocab_file=TRAIN_VOCAB, init=init,
                    progress=False)
    assert summary["step"] == 5
    payload = load_checkpoint(list_checkpoints(os.path.join(run, "checkpoints"))[-1])
    assert payload["config"]["model"]["lstm"]["dim"] == 64  # the architecture came from the fixture options
    assert math.isfinite(_ppl(run)["average_perplexity"])


def test_checkpoint_of_another_config_lists_keys(trained_run, tmp_path):
    payload = load_checkpoint(list_checkpoints(os.path.join(trained_run, "checkpoints"))[-1])
    payload["config"]["model"]["lstm"]["dim"] = 32
    other = str(tmp_path / "step-00000001.pt")
    save_checkpoint({k: v for k, v in payload.items() if k != "format"}, other)
    with pytest.raises(CheckpointError, match=r"shape mismatches: .*forward_lstm.layers.0.input_weight"):
        model_from_checkpoint(other)


@pytest.mark.distributed
def test_evaluate_under_torchrun_counts_every_token_once(trained_run):
    """Two ranks split the heldout sentences and all-reduce the sums: per sentence, the result
    is the one-process result."""
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "bilm.cli",
           "evaluate", "--checkpoint", trained_run, "--data", TRAIN_DATA, "--per-sentence", "--device", "cpu",
           "--batch-size", "3", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    two_ranks = json.loads(out.stdout[out.stdout.index("{"):])
    one = _ppl(trained_run, batch_size=3, per_sentence=True)
    for d in ("forward", "backward"):
        assert two_ranks[d]["tokens"] == one[d]["tokens"] == sum(len(l.split()) + 1 for l in open(TRAIN_DATA))
        assert two_ranks[d]["perplexity"] == pytest.approx(one[d]["perplexity"], rel=1e-5)
