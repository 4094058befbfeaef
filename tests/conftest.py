import os

import pytest

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "bilm-tf")
MODEL_DIR = os.path.join(FIXTURES, "model")
OPTIONS = os.path.join(MODEL_DIR, "options.json")
WEIGHTS = os.path.join(MODEL_DIR, "lm_weights.hdf5")
TRAIN_DIR = os.path.join(FIXTURES, "train")


def tf_embedding_batches():
    """The fixture's 10 batches of 3 sentences with what bilm-tf computed for them: yields
    (sentences, [top-layer (n_tokens, 32) per sentence]), forward and backward concatenated."""
    import json

    import h5py
    import numpy as np

    with open(os.path.join(MODEL_DIR, "lm_embeddings_sentences.json"), encoding="utf-8") as f:
        lists = json.load(f)
    expected = []
    for k in range(3):
        with h5py.File(os.path.join(MODEL_DIR, f"lm_embeddings_{k}.hdf5")) as f:
            expected.append([np.concatenate([f[str(i)][0], f[str(i)][1]], axis=-1) for i in range(10)])
    for i in range(10):
        yield [lists[k][i].split() for k in range(3)], [expected[k][i] for k in range(3)]


@pytest.fixture
def fixture_model_files():
    return OPTIONS, WEIGHTS
