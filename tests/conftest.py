import os

import pytest

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "bilm-tf")
MODEL_DIR = os.path.join(FIXTURES, "model")
OPTIONS = os.path.join(MODEL_DIR, "options.json")
WEIGHTS = os.path.join(MODEL_DIR, "lm_weights.hdf5")
TRAIN_DIR = os.path.join(FIXTURES, "train")


@pytest.fixture
def fixture_model_files():
    return OPTIONS, WEIGHTS
