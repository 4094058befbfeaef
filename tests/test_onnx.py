"""The ONNX biLM (bilm.inference.onnx_export, bilm.inference.onnx_runtime): the stateless embedder's numbers under
onnxruntime, on the bilm-tf fixture model, an elmo_small-shaped random model and a SentencePiece
(Chinese) model; its files, cache and refusals."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[onnx]'; make test installs it)")
pytest.importorskip("onnx", reason="onnx is not installed (pip install -e '.[onnx]'; make test installs it)")

from bilm import ElmoEmbedder  # noqa: E402
from bilm.cli import main as bilm_main  # noqa: E402
from bilm.runs.config import load_config  # noqa: E402
from bilm.core.errors import MissingExtra  # noqa: E402
from bilm.commands.export import export  # noqa: E402
from bilm.modules.bidirectional import BidirectionalLM  # noqa: E402
from bilm.inference.onnx_export import write_onnx  # noqa: E402
from bilm.core.files import ONNX_FILE  # noqa: E402
from bilm.inference.onnx_runtime import META_FORMAT, OnnxBiLM, OnnxModelError  # noqa: E402
from bilm.training.run import train  # noqa: E402
from bilm.modules.weight_file import save_weights  # noqa: E402
from conftest import OPTIONS, WEIGHTS, tf_embedding_batches  # noqa: E402
from data_tools.prepare import main as prepare_main  # noqa: E402
from train_helpers import ROOT, tiny_config  # noqa: E402

TOLERANCE = 1e-4
ZH = os.path.join(ROOT, "data", "sample_zh", "zh.txt")
ODD_SENTENCES = [["a"], [], ["x" * 70, "é", "中文", "🙂", "naïve"], ["The", "cat", "sat", "on", "the", "mat", "."] * 3]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BILM_CACHE", str(tmp_path / "cache"))


def _max_diff(onnx_embedder, torch_embedder, batches) -> float:
    worst = 0.0
    for sentences in batches:
        for got, want in zip(onnx_embedder.embed_batch(sentences), torch_embedder.embed_batch(sentences)):
            assert got.shape == want.shape and got.dtype == np.float32
            worst = max(worst, float(np.abs(got - want).max(initial=0.0)))
    return worst


def test_fixture_model_equals_stateless_embedder_and_is_built_once(tmp_path):
    onnx_embedder = ElmoEmbedder(OPTIONS, WEIGHTS, runtime="onnx")
    assert not onnx_embedder.stateful
    built = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "cache") for f in files if f == ONNX_FILE]
    assert len(built) == 1
    batches = [sentences for sentences, _ in tf_embedding_batches()] + [ODD_SENTENCES]
    assert _max_diff(onnx_embedder, ElmoEmbedder(OPTIONS, WEIGHTS, stateful=False), batches) <= TOLERANCE
    # bilm-tf's own vectors too (the top layer; its first batch is where stateful and stateless agree).
    sentences, expected = next(tf_embedding_batches())
    for got, want in zip(onnx_embedder.embed_batch(sentences), expected):
        assert np.abs(got[2] - want).max() <= TOLERANCE
    mtime = os.path.getmtime(built[0])
    threads = torch.get_num_threads()
    try:  # onnxruntime runs on as many threads as PyTorch would (its own default counts the cores)
        torch.set_num_threads(1)
        one_thread = ElmoEmbedder(OPTIONS, WEIGHTS, runtime="onnx")  # from the cache, not rebuilt
    finally:
        torch.set_num_threads(threads)
    assert one_thread._onnx.session.get_session_options().intra_op_num_threads == 1
    assert os.path.getmtime(built[0]) == mtime


def test_elmo_small_shaped_random_model(tmp_path):
    torch.manual_seed(3)
    options = load_config(os.path.join(ROOT, "configs", "elmo_small.yaml")).model
    model = BidirectionalLM(options)
    with torch.no_grad():  # non-zero biases everywhere, so every term of the cell is exercised
        for layer in [*model.forward_lstm.layers, *model.backward_lstm.layers]:
            layer.bias.uniform_(-0.5, 0.5)
    directory = tmp_path / "small"
    directory.mkdir()
    with open(directory / "options.json", "w") as f:
        json.dump(options.to_dict(), f)
    save_weights(model, str(directory / "weights.hdf5"))
    write_onnx(str(directory / "options.json"), str(directory / "weights.hdf5"), str(directory / ONNX_FILE))
    onnx_embedder = ElmoEmbedder(str(directory), runtime="onnx")  # the directory's model.onnx
    assert onnx_embedder._onnx.path == str(directory / ONNX_FILE)
    assert not (tmp_path / "cache").exists()
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghij"), size=rng.integers(1, 12))) for _ in range(200)]
    batches = [[list(rng.choice(words, size=rng.integers(1, 25))) for _ in range(7)], ODD_SENTENCES]
    assert _max_diff(onnx_embedder, ElmoEmbedder(str(directory), stateful=False), batches) <= TOLERANCE


@pytest.fixture(scope="module")
def chinese_run(tmp_path_factory):
    """A SentencePiece model trained for a few steps on the Chinese sample."""
    tmp = tmp_path_factory.mktemp("zh")
    assert prepare_main([ZH, "--out", str(tmp / "data"), "--heldout-fraction", "0.1", "--seed", "1", "--no-progress",
                         "--tokenizer", "sentencepiece", "--sp-vocab-size", "1500", "--nfkc"]) == 0
    run = tmp / "run"
    train(tiny_config("train.max_steps=4", "train.checkpoint_every_steps=4"), str(tmp / "data" / "manifest.json"),
          str(run), progress=False)
    return str(run)


def test_sentencepiece_model_export_format_onnx_and_embed_runtime_onnx(chinese_run, tmp_path, capsys):
    out = tmp_path / "export"
    assert bilm_main(["export", "--checkpoint", chinese_run, "--out", str(out), "--format", "onnx"]) == 0
    assert {ONNX_FILE, "tokenizer.json", "sentencepiece.model", "options.json"} <= set(os.listdir(out))
    with open(ZH, encoding="utf-8") as f:
        raw = f.read().splitlines()[:24]
    onnx_embedder = ElmoEmbedder(str(out), runtime="onnx")
    torch_embedder = ElmoEmbedder(str(out), stateful=False)
    worst = 0.0
    for (tokens_a, a), (tokens_b, b) in zip(onnx_embedder.embed_texts(raw, 8), torch_embedder.embed_texts(raw, 8)):
        assert tokens_a == tokens_b and len(tokens_a) > 1  # the model's own SentencePiece pipeline
        worst = max(worst, float(np.abs(a - b).max()))
    assert worst <= TOLERANCE

    # The command line: the same file layout as the PyTorch embedder's, with the same vectors.
    text = tmp_path / "raw.txt"
    text.write_text("\n".join(raw[:5]) + "\n", encoding="utf-8")
    for runtime in ("onnx", "torch"):
        assert bilm_main(["embed", "--model", str(out), "--input", str(text), "--out", str(tmp_path / f"{runtime}.hdf5"),
                          "--runtime", runtime, "--stateless"]) == 0
    with h5py.File(tmp_path / "onnx.hdf5") as a, h5py.File(tmp_path / "torch.hdf5") as b:
        assert set(a) == set(b)
        for key in (k for k in a if k != "sentence_to_index"):
            assert a[key].attrs["tokens"] == b[key].attrs["tokens"]
            assert np.abs(a[key][...] - b[key][...]).max() <= TOLERANCE

    # A serving directory: model.onnx and the files beside it, no weights.hdf5, no PyTorch model.
    serving = tmp_path / "serving"
    assert bilm_main(["export-onnx", "--model", str(out), "--out", str(serving)]) == 0
    assert set(os.listdir(serving)) == {ONNX_FILE, "options.json", "tokenizer.json", "sentencepiece.model", "vocab.txt"}
    tokens, vectors = ElmoEmbedder(str(serving), runtime="onnx").embed_text(raw[0])
    want_tokens, want = torch_embedder.embed_text(raw[0])
    assert tokens == want_tokens and np.abs(vectors - want).max() <= TOLERANCE
    # ... and from the command line (which hands the embedder the directory's options.json).
    assert bilm_main(["embed", "--model", str(serving), "--input", str(text), "--out", str(tmp_path / "served.hdf5"),
                      "--runtime", "onnx"]) == 0
    with h5py.File(tmp_path / "served.hdf5") as a, h5py.File(tmp_path / "onnx.hdf5") as b:
        assert set(a) == set(b) and all(np.array_equal(a[k][...], b[k][...]) for k in a if k != "sentence_to_index")
    capsys.readouterr()
    assert bilm_main(["export-onnx", "--model", str(out), "--out", str(serving)]) == 1  # no --force
    assert "already exists; pass --force" in capsys.readouterr().err


def test_runtime_does_not_import_torch(tmp_path):
    write_onnx(OPTIONS, WEIGHTS, str(tmp_path / ONNX_FILE))
    code = ("import sys, numpy as np\n"
            "from bilm.core.chars import CharIdMapper\n"
            "from bilm.inference.onnx_runtime import OnnxBiLM\n"
            f"m = OnnxBiLM({str(tmp_path / ONNX_FILE)!r}, {OPTIONS!r}, {WEIGHTS!r})\n"
            "mapper = CharIdMapper()\n"
            "out = m.run(mapper.batch([['a', 'b'], ['c']]))\n"
            "assert out.shape == (2, 3, 4, 32), out.shape\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr


def test_refuses_files_of_another_format_options_or_weights(tmp_path, chinese_run):
    import onnx

    path = str(tmp_path / ONNX_FILE)
    write_onnx(OPTIONS, WEIGHTS, path)
    with pytest.raises(FileExistsError, match="--force"):
        write_onnx(OPTIONS, WEIGHTS, path)
    model = onnx.load(path)
    for prop in model.metadata_props:
        if prop.key == META_FORMAT:
            prop.value = "0"
    old = str(tmp_path / "old.onnx")
    onnx.save(model, old)
    with pytest.raises(OnnxModelError, match=r"old.onnx: ONNX format 0 \(bilm .*rebuild"):
        OnnxBiLM(old, OPTIONS)
    other = tmp_path / "other"
    export(chinese_run, str(other))
    with pytest.raises(OnnxModelError, match="built from other options"):
        OnnxBiLM(path, str(other / "options.json"))
    # Same architecture, other weights: a stale model.onnx beside new weights.
    fixture_copy = tmp_path / "fixture"
    fixture_copy.mkdir()
    for name in ("options.json", ONNX_FILE):
        src = OPTIONS if name == "options.json" else path
        (fixture_copy / name).write_bytes(open(src, "rb").read())
    changed = h5py.File(fixture_copy / "weights.hdf5", "w")
    with h5py.File(WEIGHTS) as f:
        for key in f:
            f.copy(key, changed)
    changed["char_embed"][0, 0] += 1.0
    changed.close()
    with pytest.raises(OnnxModelError, match="built from other weights than .*weights.hdf5"):
        ElmoEmbedder(str(fixture_copy / "options.json"), str(fixture_copy / "weights.hdf5"), runtime="onnx")
    bogus = tmp_path / "bogus.onnx"
    bogus.write_text("not onnx")
    with pytest.raises(OnnxModelError, match="bogus.onnx is not a readable ONNX model"):
        OnnxBiLM(str(bogus), OPTIONS)


def test_what_the_onnx_runtime_does_not_do(tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="stateless"):
        ElmoEmbedder(OPTIONS, WEIGHTS, runtime="onnx", stateful=True)
    with pytest.raises(ValueError, match="fp32"):
        ElmoEmbedder(OPTIONS, WEIGHTS, runtime="onnx", precision="bf16")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the extra were not installed
    with pytest.raises(MissingExtra, match=r"pip install 'bilm\[onnx\]'"):
        ElmoEmbedder(OPTIONS, WEIGHTS, runtime="onnx")
    text = tmp_path / "in.txt"
    text.write_text("a b\n")
    assert bilm_main(["embed", "--options", OPTIONS, "--weights", WEIGHTS, "--input", str(text),
                      "--out", str(tmp_path / "out.hdf5"), "--runtime", "onnx"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bilm[onnx]" in err[0]
    assert not (tmp_path / "out.hdf5").exists()
