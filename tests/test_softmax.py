"""Sampled softmax (TF sampled_softmax_loss semantics) and its sampler."""
from __future__ import annotations

import math

import pytest
import torch

from bilm.modules.softmax import LogUniformSampler, SoftmaxLayer


def tf_probability(k: int, vocab_size: int) -> float:
    return (math.log(k + 2) - math.log(k + 1)) / math.log(vocab_size + 1)


def tf_unique_sample(uniforms: list[float], vocab_size: int, n_unique: int) -> tuple[list[int], int]:
    """TF's RangeSampler loop, one draw at a time, on a given stream of uniforms."""
    seen: list[int] = []
    for tries, u in enumerate(uniforms, start=1):
        value = int(math.exp(u * math.log(vocab_size + 1))) - 1
        if value not in seen:
            seen.append(value)
            if len(seen) == n_unique:
                return seen, tries
    raise AssertionError("stream too short")


def reference_sampled_loss(hidden, targets, weight, bias, candidates, q_candidates, q_targets, remove_hits=True):
    """tf.nn.sampled_softmax_loss written out row by row."""
    losses = []
    for row in range(hidden.shape[0]):
        t = int(targets[row])
        true_logit = hidden[row] @ weight[t] + bias[t] - math.log(q_targets[row])
        logits = [true_logit]
        for c, q in zip(candidates.tolist(), q_candidates.tolist()):
            if remove_hits and c == t:
                continue
            logits.append(hidden[row] @ weight[c] + bias[c] - math.log(q))
        losses.append(torch.logsumexp(torch.stack(logits), 0) - true_logit)
    return torch.stack(losses)


# ----- sampler -----

def test_probabilities_sum_to_one_and_match_formula():
    sampler = LogUniformSampler(1000)
    p = sampler.probability(torch.arange(1000))
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-12)
    for k in (0, 1, 17, 999):
        assert float(p[k]) == pytest.approx(tf_probability(k, 1000), rel=1e-12)


def test_expected_count_matches_tf_formula():
    vocab_size = 500
    sampler = LogUniformSampler(vocab_size)
    ids = torch.tensor([0, 1, 5, 250, 499])
    num_tries = 137
    got = sampler.expected_count(ids, num_tries, n_unique=100)
    want = [1.0 - (1.0 - tf_probability(k, vocab_size)) ** num_tries for k in ids.tolist()]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), rtol=1e-6, atol=0)
    # TF's shortcut when there were no repeats: P * n.
    shortcut = sampler.expected_count(ids, 100, n_unique=100)
    want = [100 * tf_probability(k, vocab_size) for k in ids.tolist()]
    torch.testing.assert_close(shortcut, torch.tensor(want, dtype=torch.float32), rtol=1e-6, atol=0)


def test_draw_frequencies_approach_probabilities():
    vocab_size = 20
    sampler = LogUniformSampler(vocab_size)
    draws = sampler.draw(400_000, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=vocab_size).double() / draws.numel()
    p = sampler.probability(torch.arange(vocab_size))
    # 400k draws: the standard error of each frequency is < 0.0008.
    torch.testing.assert_close(freq, p, atol=3e-3, rtol=0)


def test_unique_inclusion_rate_matches_expected_count():
    # The expected count is what TF's loss corrects for: P(id in the sample), approximately.
    vocab_size, n_unique, trials = 100, 10, 3000
    sampler = LogUniformSampler(vocab_size)
    generator = torch.Generator().manual_seed(1)
    included = torch.zeros(vocab_size)
    expected = torch.zeros(vocab_size)
    ids = torch.arange(vocab_size)
    for _ in range(trials):
        candidates, num_tries = sampler.sample(n_unique, generator)
        included[candidates] += 1
        expected += sampler.expected_count(ids, num_tries)
    torch.testing.assert_close(included / trials, expected / trials, atol=0.03, rtol=0)


@pytest.mark.parametrize("vocab_size,n_unique", [(1000, 50), (10, 10), (30, 29), (800, 1)])
def test_sample_matches_tf_loop_on_same_uniforms(vocab_size, n_unique):
    sampler = LogUniformSampler(vocab_size)
    for seed in range(5):
        candidates, num_tries = sampler.sample(n_unique, torch.Generator().manual_seed(seed))
        # Replay the uniforms the sampler drew (same chunk sizes) through TF's loop.
        replay = torch.Generator().manual_seed(seed)
        chunk = sampler._draws_per_chunk(n_unique)
        uniforms: list[float] = []
        while len(uniforms) < num_tries:
            uniforms += torch.rand(chunk, generator=replay, dtype=torch.float64).tolist()
        want, want_tries = tf_unique_sample(uniforms, vocab_size, n_unique)
        assert candidates.tolist() == want
        assert num_tries == want_tries
        assert len(set(candidates.tolist())) == n_unique
        assert candidates.dtype == torch.int64


def test_sample_is_reproducible_from_generator_state():
    sampler = LogUniformSampler(5000)
    generator = torch.Generator().manual_seed(3)
    sampler.sample(100, generator)
    state = generator.get_state()
    first = sampler.sample(100, generator)
    generator.set_state(state)
    again = sampler.sample(100, generator)
    assert torch.equal(first[0], again[0]) and first[1] == again[1]


def test_sample_rejects_impossible_size():
    with pytest.raises(ValueError):
        LogUniformSampler(10).sample(11)


# ----- losses -----

def make_layer(vocab_size=50, dim=6, sparse=True, seed=0):
    torch.manual_seed(seed)
    layer = SoftmaxLayer(vocab_size, dim, sparse=sparse)
    with torch.no_grad():
        layer.bias.normal_()  # zeros at init would hide bias mistakes
    return layer


def test_initialization_follows_bilm_tf():
    layer = SoftmaxLayer(20_000, 64)
    weight = layer.weight.detach()
    assert float(weight.std()) == pytest.approx(1 / 8, rel=0.02)
    assert float(weight.mean()) == pytest.approx(0.0, abs=0.002)
    assert torch.count_nonzero(layer.bias) == 0


def test_sampled_loss_matches_reference_with_accidental_hits():
    layer = make_layer(vocab_size=30)
    hidden = torch.randn(7, 6)
    candidates = torch.tensor([4, 0, 9, 21, 2])
    targets = torch.tensor([0, 9, 3, 21, 21, 7, 4])  # rows 0, 1, 3, 4, 6 hit a candidate
    q_candidates = torch.rand(5) * 0.9 + 0.05
    q_targets = torch.rand(7) * 0.9 + 0.05
    hidden.requires_grad_(True)
    got = layer.sampled_loss(hidden, targets, candidates, q_candidates, q_targets)
    (got_grad,) = torch.autograd.grad(got.sum(), hidden)
    want = reference_sampled_loss(hidden, targets, layer.weight, layer.bias, candidates, q_candidates, q_targets)
    (want_grad,) = torch.autograd.grad(want.sum(), hidden)
    with torch.no_grad():
        with_hits = reference_sampled_loss(hidden, targets, layer.weight, layer.bias, candidates, q_candidates,
                                           q_targets, remove_hits=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-5)
    # The rows whose true id is among the candidates would differ without hit removal.
    differs = (with_hits - want.detach()).abs() > 1e-4
    assert differs.tolist() == [True, True, False, True, True, False, True]


def test_all_classes_with_unit_counts_is_the_full_softmax():
    layer = make_layer(vocab_size=50)
    hidden = torch.randn(2, 5, 6)
    targets = torch.randint(0, 50, (2, 5))
    candidates = torch.randperm(50)
    losses = layer.sampled_loss(hidden.reshape(10, 6), targets.reshape(10), candidates,
                                torch.ones(50), torch.ones(10))
    full_log_probs = layer.full_log_probs(hidden)
    want = -full_log_probs.gather(-1, targets[..., None]).squeeze(-1).reshape(10)
    torch.testing.assert_close(losses, want, rtol=1e-5, atol=1e-5)


def test_sampled_loss_approaches_full_loss_as_samples_grow():
    layer = make_layer(vocab_size=50)
    hidden = torch.randn(64, 6)
    targets = LogUniformSampler(50).draw(64, torch.Generator().manual_seed(5))
    with torch.no_grad():
        full, count = layer.full_loss(hidden, targets)
        full_mean = float(full / count)
        errors = {}
        for n_samples in (5, 20, 50):
            generator = torch.Generator().manual_seed(11)
            means = []
            for _ in range(20):
                # sampled_loss directly: forward() would switch to the full loss at n_samples = V.
                candidates, num_tries = layer.sampler.sample(n_samples, generator)
                losses = layer.sampled_loss(hidden, targets, candidates,
                                            layer.sampler.expected_count(candidates, num_tries, n_samples),
                                            layer.sampler.expected_count(targets, num_tries, n_samples))
                means.append(float(losses.mean()))
            errors[n_samples] = abs(sum(means) / len(means) - full_mean)
    # Sampling all 50 classes: expected counts are ~1, so the loss is ~ the full loss.
    assert errors[50] < 0.02
    assert errors[50] < errors[20] < errors[5]


def test_full_loss_chunks_and_mask():
    layer = make_layer(vocab_size=50)
    hidden = torch.randn(3, 7, 6)
    targets = torch.randint(0, 50, (3, 7))
    mask = torch.rand(3, 7) > 0.3
    targets_padded = targets.masked_fill(~mask, -1)  # padding ids need not be valid
    chunked, count = layer.full_loss(hidden, targets_padded, mask, max_logits=50 * 4)
    nll = -layer.full_log_probs(hidden).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(chunked, nll[mask].sum())
    assert float(count) == int(mask.sum())


def test_forward_masks_positions():
    layer = make_layer(vocab_size=40)
    hidden = torch.randn(2, 6, 6)
    targets = torch.randint(0, 40, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    total, count = layer(hidden, targets, mask, 10, torch.Generator().manual_seed(0))
    # Same draw, only the kept rows.
    total_kept, count_kept = layer(hidden[mask], targets[mask], None, 10, torch.Generator().manual_seed(0))
    torch.testing.assert_close(total, total_kept)
    assert float(count) == float(count_kept) == 9


def test_forward_with_samples_beyond_vocab_is_the_full_loss():
    layer = make_layer(vocab_size=30)
    hidden = torch.randn(8, 6)
    targets = torch.randint(0, 30, (8,))
    total, count = layer(hidden, targets, None, 256, torch.Generator().manual_seed(0))
    want, want_count = layer.full_loss(hidden, targets)
    torch.testing.assert_close(total, want)
    assert float(count) == float(want_count) == 8


# ----- gradients -----

def touched_rows(layer, hidden, targets, n_samples, seed):
    generator = torch.Generator().manual_seed(seed)
    state = generator.get_state()
    total, count = layer(hidden, targets, None, n_samples, generator)
    (total / count).backward()
    generator.set_state(state)
    candidates, _ = layer.sampler.sample(n_samples, generator)
    return set(targets.tolist()) | set(candidates.tolist())


def test_sparse_gradient_touches_only_sampled_and_true_rows():
    layer = make_layer(vocab_size=200, sparse=True)
    hidden = torch.randn(12, 6)
    targets = torch.randint(100, 200, (12,))  # mostly rare ids, unlikely to be sampled
    want = touched_rows(layer, hidden, targets, 15, seed=2)
    for grad in (layer.weight.grad, layer.bias.grad):
        assert grad.is_sparse
        assert set(grad.coalesce().indices()[0].tolist()) == want
    assert layer.weight.grad.shape == (200, 6) and layer.bias.grad.shape == (200,)


def test_dense_gradient_is_zero_outside_sampled_and_true_rows():
    sparse_layer = make_layer(vocab_size=200, sparse=True)
    dense_layer = make_layer(vocab_size=200, sparse=False)
    hidden = torch.randn(12, 6)
    targets = torch.randint(100, 200, (12,))
    want = touched_rows(dense_layer, hidden, targets, 15, seed=2)
    touched_rows(sparse_layer, hidden, targets, 15, seed=2)
    assert not dense_layer.weight.grad.is_sparse
    nonzero = set(dense_layer.weight.grad.abs().sum(1).nonzero().squeeze(1).tolist())
    assert nonzero == want
    torch.testing.assert_close(sparse_layer.weight.grad.to_dense(), dense_layer.weight.grad)
    torch.testing.assert_close(sparse_layer.bias.grad.to_dense(), dense_layer.bias.grad)


def test_adagrad_takes_sparse_grad_and_updates_only_touched_rows():
    sparse_layer = make_layer(vocab_size=200, sparse=True)
    dense_layer = make_layer(vocab_size=200, sparse=False)
    hidden = torch.randn(12, 6)
    targets = torch.randint(100, 200, (12,))
    before = sparse_layer.weight.detach().clone()
    optimizers = [torch.optim.Adagrad(layer.parameters(), lr=0.2, initial_accumulator_value=1.0)
                  for layer in (sparse_layer, dense_layer)]
    touched: set[int] = set()
    for step in range(3):
        for layer, optimizer in zip((sparse_layer, dense_layer), optimizers):
            optimizer.zero_grad()
            touched |= touched_rows(layer, hidden, targets, 15, seed=step)
            optimizer.step()
    assert sparse_layer.weight.grad.is_sparse
    changed = set((sparse_layer.weight.detach() != before).any(1).nonzero().squeeze(1).tolist())
    assert changed == touched and len(changed) < 200
    # Dense and sparse Adagrad agree (untouched rows get zero grad in the dense case).
    torch.testing.assert_close(sparse_layer.weight, dense_layer.weight)
    torch.testing.assert_close(sparse_layer.bias, dense_layer.bias)
    accumulator = optimizers[0].state[sparse_layer.weight]["sum"]
    untouched = accumulator.eq(1.0).all(1)
    assert untouched.nonzero().squeeze(1).tolist() == sorted(set(range(200)) - touched)
