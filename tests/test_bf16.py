"""bf16 on the CPU too: training, the embedder, Elmo and evaluate under bf16 autocast stay close to fp32
(matrix multiplies in bfloat16, the LSTM cell state and the full softmax in fp32)."""
import numpy as np
import pytest
import torch

from bilm import ElmoEmbedder
from bilm.core.distributed import DistEnv
from bilm.elmo import Elmo, batch_to_ids
from bilm.scoring.evaluate import evaluate
from bilm.training.run import train
from bilm.training.step import TrainStep
from conftest import OPTIONS, WEIGHTS
from train_helpers import TRAIN_DATA, TRAIN_VOCAB, tiny_config

SENTENCES = [["The", "bank", "of", "the", "river", "."], ["Money", "in", "the", "bank", "."]]


def test_embedder_bf16_is_close_to_fp32():
    fp32 = ElmoEmbedder(OPTIONS, WEIGHTS, stateful=False).embed_batch(SENTENCES)
    bf16 = ElmoEmbedder(OPTIONS, WEIGHTS, stateful=False, precision="bf16").embed_batch(SENTENCES)
    for a, b in zip(fp32, bf16):
        assert b.dtype == np.float32 and b.shape == a.shape
        # bfloat16 keeps 8 bits of mantissa (relative error about 2^-8 per product).
        scale = np.abs(a).max()
        assert 0 < np.abs(a - b).max() <= 0.01 * scale, np.abs(a - b).max() / scale  # measured 0.3%
    with pytest.raises(ValueError, match="precision"):
        ElmoEmbedder(OPTIONS, WEIGHTS, precision="fp16")


def test_elmo_bf16_is_close_to_fp32():
    ids = batch_to_ids(SENTENCES)
    outs = []
    for precision in ("fp32", "bf16"):
        elmo = Elmo(OPTIONS, WEIGHTS, 1, dropout=0.0, stateful=False, precision=precision)
        with torch.no_grad():
            outs.append(elmo(ids)["elmo_representations"][0])
    assert outs[1].dtype == torch.float32
    scale = outs[0].abs().max()
    assert 0 < (outs[0] - outs[1]).abs().max() <= 0.01 * scale


def test_training_step_in_bf16_on_cpu_follows_fp32():
    losses = {}
    for precision in ("fp32", "bf16"):
        trainer = TrainStep(tiny_config(f"train.precision={precision}", "train.dropout=0.0"), 32, DistEnv())
        from bilm.data import LMDataset
        data = iter(LMDataset(TRAIN_DATA, TRAIN_VOCAB, 2, 10, mode="train", seed=0))
        losses[precision] = [float(trainer.step(next(data)).loss) for _ in range(3)]
    assert losses["bf16"] != losses["fp32"]  # autocast did run in bf16
    np.testing.assert_allclose(losses["bf16"], losses["fp32"], rtol=2e-2)


def test_evaluate_bf16_perplexity_is_close(tmp_path):
    train(tiny_config("train.max_steps=20"), TRAIN_DATA, str(tmp_path), vocab_file=TRAIN_VOCAB, progress=False)
    fp32 = evaluate(str(tmp_path), TRAIN_DATA, progress=False, device="cpu", pretokenized=True)
    bf16 = evaluate(str(tmp_path), TRAIN_DATA, progress=False, device="cpu", pretokenized=True, precision="bf16")
    assert bf16["precision"] == "bf16"
    assert bf16["average_perplexity"] == pytest.approx(fp32["average_perplexity"], rel=1e-2)
    assert bf16["average_perplexity"] != fp32["average_perplexity"]


def test_precision_means_the_same_everywhere(tmp_path):
    """One helper: an unknown precision is refused by every entry point before any work, and
    "fp32" is fp32 even inside a caller's bf16 autocast."""
    from bilm.core.precision import autocast

    with pytest.raises(ValueError, match="precision must be one of 'fp32', 'bf16', got 'fp16'"):
        ElmoEmbedder(OPTIONS, WEIGHTS, precision="fp16")
    with pytest.raises(ValueError, match="got 'fp16'"):
        Elmo(OPTIONS, WEIGHTS, 1, precision="fp16")
    with pytest.raises(ValueError, match="got 'fp16'"):
        evaluate(str(tmp_path / "no-run"), TRAIN_DATA, precision="fp16", progress=False)
    a = torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
        with autocast("cpu", "fp32"):
            assert (a @ a).dtype == torch.float32
    with autocast(torch.device("cpu"), "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    # The embedder under a caller's autocast still computes in fp32 when asked to.
    embedder = ElmoEmbedder(OPTIONS, WEIGHTS)
    expected = embedder.embed_sentence(SENTENCES[0])
    embedder = ElmoEmbedder(OPTIONS, WEIGHTS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        np.testing.assert_array_equal(embedder.embed_sentence(SENTENCES[0]), expected)
