"""Shared bits of the training tests: the bilm-tf test model as a config, and fixture data."""
import os

from bilm.runs.config import load_config

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TRAIN_DATA = os.path.join(HERE, "fixtures", "bilm-tf", "train", "data.txt")
TRAIN_VOCAB = os.path.join(HERE, "fixtures", "bilm-tf", "train", "vocab.txt")
TINY = os.path.join(ROOT, "configs", "tiny.yaml")

# bilm-tf's test_training.py: 2 layers of 16 cells projected to 8, unroll 10, batch 2, 16 samples.
BILM_TF_TEST_MODEL = [
    "model.lstm.dim=16", "model.lstm.projection_dim=8", "model.lstm.n_layers=2",
    "model.lstm.use_skip_connections=true", "model.lstm.cell_clip=3", "model.lstm.proj_clip=3",
    "model.char_cnn.embedding.dim=4", "model.char_cnn.filters=[[1,8],[2,8],[3,16],[4,32],[5,64]]",
    "model.char_cnn.n_highway=1",
    "train.batch_size=2", "train.unroll_steps=10", "train.n_negative_samples_batch=16",
    "train.dropout=0.1", "train.log_every_steps=1000", "train.checkpoint_every_steps=100000",
    "train.checkpoint_every_minutes=1000", "train.device=cpu",
]


# BILM_TEST_FAST_TRAINING=1, for tests only (bilm never reads it): training as on a much faster machine.
# The runs that the fault tests start and wait on use the smallest model and batch bilm takes (steps come
# about twice as fast), and those tests look at them 50 times less often (POLL_SECONDS), so a run moves
# dozens of steps between two looks. They act on the run's progress, never on the clock, so they pass
# either way (docs/development.md, "Tests and time").
FAST = os.environ.get("BILM_TEST_FAST_TRAINING") == "1"
POLL_SECONDS = 0.5 if FAST else 0.01  # how often a test looks at a run it waits on
FAST_TRAINING = [
    "model.lstm.dim=4", "model.lstm.projection_dim=2", "model.lstm.n_layers=1", "model.char_cnn.embedding.dim=2",
    "model.char_cnn.filters=[[1,2],[2,2]]", "train.batch_size=1", "train.unroll_steps=2",
    "train.n_negative_samples_batch=4",
] if FAST else []


def tiny_config(*overrides: str, word_inputs: bool = False):
    cfg = load_config(TINY, [*BILM_TF_TEST_MODEL, *overrides])
    if word_inputs:
        cfg.model.char_cnn = None
    return cfg


def assert_same_trained_params(single_path: str, multi_path: str) -> None:
    """The parameters that ``dist_scripts/ddp_equivalence.py`` saved from one process and from
    several ranks are equal, and training moved them well beyond the tolerance (so equality
    means something)."""
    import torch

    a, b = torch.load(single_path), torch.load(multi_path)
    for key, value in a["params"].items():
        assert torch.allclose(value, b["params"][key], atol=1e-5, rtol=0), key
    moved = max((a["params"][k] - a["initial"][k]).abs().max().item() for k in a["params"])
    assert moved > 1e-2
