"""ScalarMix and Elmo against the formula of bilm-tf's weight_layers test."""
import numpy as np
import pytest
import torch

from bilm.elmo import Elmo, batch_to_ids
from bilm.modules.scalar_mix import ScalarMix
from conftest import OPTIONS, WEIGHTS, tf_embedding_batches

SENTENCES = [["The", "first", "sentence", "."], ["The", "second"], ["Third"]]
SETTINGS = [([0.1, 0.3, 0.5], 1.1), ([0.2, 0.4, 0.6], 0.88)]  # bilm-tf's test values


def _lm_embeddings():
    elmo = Elmo(OPTIONS, WEIGHTS, num_output_representations=1, dropout=0.0, stateful=False)
    char_ids = batch_to_ids(SENTENCES)
    mask = (char_ids[..., 0] > 0)
    with torch.no_grad():
        out = elmo(char_ids)
    assert out["mask"].tolist() == [[True] * 4, [True, True, False, False], [True, False, False, False]]
    # Recompute the raw layers for the expected formula.
    with_boundaries = batch_to_ids([["<S>", *s, "</S>"] for s in SENTENCES])
    with torch.no_grad():
        layers, _ = elmo.bilm(with_boundaries, with_boundaries[..., 0] > 0)
    layers = np.stack([(l[:, 1:-1] * mask.unsqueeze(-1)).numpy() for l in layers], axis=1)  # (B, 3, T, D)
    return layers, mask.numpy()


@pytest.mark.parametrize("do_layer_norm", [True, False])
def test_weighted_layers_formula(do_layer_norm):
    lm_embeddings, mask = _lm_embeddings()
    for weights, gamma in SETTINGS:
        mix = ScalarMix(3, do_layer_norm=do_layer_norm, initial_weights=weights, initial_gamma=gamma)
        with torch.no_grad():
            got = mix([torch.from_numpy(lm_embeddings[:, j]) for j in range(3)], torch.from_numpy(mask)).numpy()
        normed = np.exp(weights) / np.exp(weights).sum()
        expected = np.zeros_like(lm_embeddings[:, 0])
        for j in range(3):
            layer = lm_embeddings[:, j]
            if do_layer_norm:
                mean, std = layer[mask].mean(), layer[mask].std()
                layer = (layer - mean) / (std + 1e-12)
            expected += normed[j] * layer
        expected *= gamma
        np.testing.assert_allclose(got, expected, atol=1e-6)


def test_top_only():
    lm_embeddings, mask = _lm_embeddings()
    for _, gamma in SETTINGS:
        # Top only: all weight on the last layer, times gamma.
        mix = ScalarMix(3, initial_weights=[-1e4, -1e4, 0.0], initial_gamma=gamma)
        with torch.no_grad():
            got = mix([torch.from_numpy(lm_embeddings[:, j]) for j in range(3)]).numpy()
        np.testing.assert_allclose(got, lm_embeddings[:, -1] * gamma, atol=1e-6)


def test_elmo_module_outputs_and_grads():
    elmo = Elmo(OPTIONS, WEIGHTS, num_output_representations=2, dropout=0.0, do_layer_norm=True, stateful=False)
    out = elmo(batch_to_ids(SENTENCES))
    reps = out["elmo_representations"]
    assert len(reps) == 2 and reps[0].shape == (3, 4, 32)
    reps[0][out["mask"]].sum().backward()
    assert elmo.scalar_mixes[0].weights.grad is not None
    assert all(p.grad is None for p in elmo.bilm.parameters())  # frozen biLM


def test_elmo_matches_embedder_top_layer():
    from bilm import ElmoEmbedder
    embedder = ElmoEmbedder(OPTIONS, WEIGHTS, stateful=False)
    expected = embedder.embed_batch(SENTENCES)
    elmo = Elmo(OPTIONS, WEIGHTS, num_output_representations=1, dropout=0.0, stateful=False)
    with torch.no_grad():
        elmo.scalar_mixes[0].weights.copy_(torch.tensor([-1e4, -1e4, 0.0]))
        out = elmo(batch_to_ids(SENTENCES))["elmo_representations"][0]
    for i, s in enumerate(SENTENCES):
        np.testing.assert_allclose(out[i, : len(s)].numpy(), expected[i][2], atol=1e-6)


def test_elmo_defaults_are_stateful_and_match_bilm_tf_batch_after_batch():
    """AllenNLP's Elmo is stateful: with its defaults, batch after batch, the top layer equals what
    bilm-tf's stateful inference computed for the fixture (10 batches of 3 sentences)."""
    elmo = Elmo(OPTIONS, WEIGHTS, 1, dropout=0.0, scalar_mix_parameters=[-1e9, -1e9, 0.0])  # top layer only
    assert elmo.stateful
    worst = 0.0
    for sentences, expected in tf_embedding_batches():
        with torch.no_grad():
            out = elmo(batch_to_ids(sentences))["elmo_representations"][0]
        for k, (s, want) in enumerate(zip(sentences, expected)):
            worst = max(worst, float(np.abs(out[k, : len(s)].numpy() - want).max()))
    assert worst <= 1e-5, worst
    assert not any(p.requires_grad for p in elmo.scalar_mixes[0].parameters())  # fixed parameters are not trained
    # Stateless: a fresh start for every batch gives other numbers from the second batch on.
    stateless = Elmo(OPTIONS, WEIGHTS, 1, dropout=0.0, scalar_mix_parameters=[-1e9, -1e9, 0.0], stateful=False)
    with torch.no_grad():
        first = [stateless(batch_to_ids(SENTENCES))["elmo_representations"][0] for _ in range(2)]
    torch.testing.assert_close(first[0], first[1])


def test_elmo_layer_norm_counts_the_sentence_boundaries_as_allennlp():
    """AllenNLP mixes the layers with <S> and </S> in place, then drops them: the layer norm's
    statistics include the boundary positions."""
    elmo = Elmo(OPTIONS, WEIGHTS, 1, dropout=0.0, do_layer_norm=True, stateful=False,
                keep_sentence_boundaries=True)
    char_ids = batch_to_ids(SENTENCES)
    with torch.no_grad():
        out = elmo(char_ids)
        kept = out["elmo_representations"][0]
        with_boundaries = batch_to_ids([["<S>", *s, "</S>"] for s in SENTENCES])
        layers, _ = elmo.bilm(with_boundaries, with_boundaries[..., 0] > 0)
    mask = (with_boundaries[..., 0] > 0).numpy()
    assert out["mask"].numpy().tolist() == mask.tolist() and kept.shape[1] == len(SENTENCES[0]) + 2
    expected = 0
    for layer in layers:
        x = layer.numpy()
        mean = x[mask].mean()
        std = np.sqrt(((x[mask] - mean) ** 2).mean())
        expected = expected + (x - mean) / np.sqrt(std ** 2 + 1e-12) / 3  # equal weights at init
    np.testing.assert_allclose(kept.numpy()[mask], expected[mask], atol=1e-5)
    elmo.keep_sentence_boundaries = False
    with torch.no_grad():
        dropped = elmo(char_ids)["elmo_representations"][0]
    np.testing.assert_allclose(dropped[0].numpy(), kept[0, 1:-1].numpy(), atol=1e-6)
    assert float(dropped[2, 1:].abs().max()) == 0.0  # padding is zero
