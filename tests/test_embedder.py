"""Golden tests: the embedder against what bilm-tf computed with the fixture model."""
import json
import os

import h5py
import numpy as np
import pytest
import torch

from bilm import ElmoEmbedder
from bilm.inference.embedder import dump_token_embeddings
from bilm.formats.weights import WeightFileError
from conftest import MODEL_DIR, OPTIONS, WEIGHTS, tf_embedding_batches

TOLERANCE = 1e-5


def _check_fixture(embedder):
    for sentences, expected in tf_embedding_batches():
        got = embedder.embed_batch(sentences)
        for row, (vectors, want) in enumerate(zip(got, expected)):
            assert vectors.dtype == np.float32
            assert vectors.shape == (3, len(sentences[row]), 32)
            diff = np.abs(vectors[2] - want).max()
            assert diff <= TOLERANCE, f"row {row}: max abs diff {diff}"


def test_matches_bilm_tf_stateful():
    embedder = ElmoEmbedder(OPTIONS, WEIGHTS)
    _check_fixture(embedder)
    # A smaller batch leaves the state of row 2 untouched.
    before = [[t[2].clone() for t in layer] for layer in embedder._states.state["forward"]]
    embedder.embed_batch([["a", "b"], ["c"]])
    after = [[t[2] for t in layer] for layer in embedder._states.state["forward"]]
    for b_layer, a_layer in zip(before, after):
        for b, a in zip(b_layer, a_layer):
            assert torch.equal(a, b)
    changed = [[t[0] for t in layer] for layer in embedder._states.state["forward"]]
    assert not torch.equal(changed[0][0], before[0][0])


def test_state_carries_and_resets():
    embedder = ElmoEmbedder(OPTIONS, WEIGHTS)
    first = embedder.embed_sentence(["The", "cat", "sat", "."])
    second = embedder.embed_sentence(["The", "cat", "sat", "."])
    assert np.abs(first - second).max() > 1e-4  # stateful: context from the previous call
    embedder.reset_states()
    np.testing.assert_array_equal(embedder.embed_sentence(["The", "cat", "sat", "."]), first)


def test_stateless_is_deterministic():
    embedder = ElmoEmbedder(OPTIONS, WEIGHTS, stateful=False)
    first = embedder.embed_sentence(["The", "cat", "sat", "."])
    embedder.embed_batch([["something", "else"], ["entirely"]])
    np.testing.assert_array_equal(embedder.embed_sentence(["The", "cat", "sat", "."]), first)


def test_token_embedding_cache_equals_char_mode(tmp_path):
    vocab = os.path.join(MODEL_DIR, "vocab_test.txt")
    cache = str(tmp_path / "tokens.hdf5")
    n = dump_token_embeddings(vocab, OPTIONS, WEIGHTS, cache, progress=False)
    with h5py.File(cache) as f:
        assert f["embedding"].shape == (n, 16)
    cached = ElmoEmbedder(OPTIONS, WEIGHTS, token_embedding_file=cache, vocab_file=vocab)
    _check_fixture(cached)  # fixture tokens not in the vocab fall back to the char CNN


def test_embed_sentences_generator_and_batching():
    sentences = [["a"], ["b", "c"], [], ["d", "e", "f"], ["g"]]
    embedder = ElmoEmbedder(OPTIONS, WEIGHTS, stateful=False)
    out = list(embedder.embed_sentences(iter(sentences), batch_size=2))
    assert [o.shape for o in out] == [(3, len(s), 32) for s in sentences]


def test_edge_cases():
    embedder = ElmoEmbedder(OPTIONS, WEIGHTS, stateful=False)
    assert embedder.embed_batch([]) == []
    assert embedder.embed_sentence([]).shape == (3, 0, 32)
    long_token = "x" * 70
    vectors = embedder.embed_batch([[long_token, "é", "中文", "🙂", "naïve"]])[0]
    assert vectors.shape == (3, 5, 32) and np.isfinite(vectors).all()
    # 70 bytes are truncated to 48: two tokens with the same first 48 bytes look the same.
    same = embedder.embed_batch([["x" * 48]])[0]
    np.testing.assert_allclose(embedder.embed_batch([[long_token]])[0], same, atol=1e-6)
    with pytest.raises(TypeError, match=r"sentence 1, token 2 is a int"):
        embedder.embed_batch([["ok"], ["a", "b", 3]])
    with pytest.raises(TypeError, match="single string"):
        embedder.embed_batch("not a list")


def test_not_hdf5_gives_clear_error(tmp_path):
    bogus = tmp_path / "weights.hdf5"
    bogus.write_text("this is not hdf5")
    with pytest.raises(WeightFileError, match="not a readable HDF5 file"):
        ElmoEmbedder(OPTIONS, str(bogus))


def test_embed_file_formats(tmp_path):
    text = tmp_path / "in.txt"
    text.write_text("The cat sat .\nA dog\n\nThe cat sat .\n", encoding="utf-8")
    for fmt, shape0 in (("all", (3, 4, 32)), ("top", (4, 32)), ("average", (4, 32))):
        out = tmp_path / f"{fmt}.hdf5"
        embedder = ElmoEmbedder(OPTIONS, WEIGHTS)
        assert embedder.embed_file(str(text), str(out), output_format=fmt, progress=False) == 4
        with h5py.File(out) as f:
            assert f["0"].shape == shape0
            assert f["2"].shape[-2 if fmt == "all" else 0] == 0
            assert f["sentence_to_index"].shape == (1,)  # AllenNLP's layout
            index = json.loads(f["sentence_to_index"][0])
            assert index["A dog"] == "1"
    # "all" rows equal embed_batch on the same lines with the same state history.
    embedder = ElmoEmbedder(OPTIONS, WEIGHTS)
    expected = embedder.embed_batch([l.split() for l in text.read_text().splitlines()])
    with h5py.File(tmp_path / "all.hdf5") as f:
        np.testing.assert_array_equal(f["3"][...], expected[3])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_matches_bilm_tf_on_cuda():
    _check_fixture(ElmoEmbedder(OPTIONS, WEIGHTS, device="cuda"))
