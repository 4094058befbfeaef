"""bilm's training against numbers bilm-tf's own TensorFlow code computed (tests/fixtures/bilmtf_training).

The golden fixture holds a tiny char-CNN biLM after one step of bilm-tf's unmodified ``train()``
(weights and Adagrad accumulators), three batches, and the state TensorFlow reached after
training on them (dropout 0, full softmax, clip active). Replaying those three steps in bilm
must land on the same weights and accumulators: this pins the loss scale (x unroll_steps), what
the global-norm clip sees, Adagrad's update and accumulators, the gradients of every layer and
the LSTM states carried from batch to batch.
"""
from __future__ import annotations

import json
import math
import os
from unittest import mock

import h5py
import numpy as np
import pytest
import torch

from bilm.formats.bilmtf import config_from_bilmtf_options, latest_tf_checkpoint, published_name, read_tf_checkpoint, split_tensors
from bilm.modules.tf_checkpoint import load_bilmtf_state
from bilm.runs.config import config_from_dict
from bilm.core.distributed import DistEnv
from bilm.modules.softmax import LogUniformSampler, SoftmaxLayer
from bilm.training.step import TrainStep
from bilm.modules.weight_file import save_weights

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "bilmtf_training")


def _read_h5(path: str) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[...]) if isinstance(obj, h5py.Dataset) else None)
    return out


def _read_npz(name: str) -> dict[str, np.ndarray]:
    """A fixture file (a path under FIXTURE) as a dict of arrays."""
    with np.load(os.path.join(FIXTURE, name)) as f:
        return {k: f[k] for k in f.files}


def _options() -> dict:
    with open(os.path.join(FIXTURE, "options.json")) as f:
        return json.load(f)


def _batches(name: str = "batches.npz") -> list[dict]:
    """A fixture's batches in bilm.data's format (char ids shifted by one: 0 is our mask)."""
    npz = np.load(os.path.join(FIXTURE, name))
    n = npz["token_ids"].shape[0]
    batches = []
    for i in range(n):
        batch = {"reset_state": torch.zeros(npz["token_ids"].shape[1], dtype=torch.bool)}
        for direction, suffix in (("forward", ""), ("backward", "_reverse")):
            ids = torch.from_numpy(npz["token_ids" + suffix][i].astype(np.int64))
            batch[direction] = {"token_ids": ids,
                                "next_token_ids": torch.from_numpy(npz["next_token_id" + suffix][i].astype(np.int64)),
                                "char_ids": torch.from_numpy(npz["tokens_characters" + suffix][i].astype(np.int64) + 1),
                                "mask": torch.ones(ids.shape, dtype=torch.bool)}
        batches.append(batch)
    return batches


def _trainer(*overrides: str) -> TrainStep:
    options = _options()
    cfg = config_from_dict(config_from_bilmtf_options(options), overrides=["train.device=cpu", *overrides])
    return TrainStep(cfg, options["n_tokens_vocab"], DistEnv())


def _start(trainer: TrainStep) -> None:
    weights, accumulators, step = split_tensors(_read_npz("start.npz"))
    load_bilmtf_state(trainer.model, trainer.optimizer, weights, accumulators, step, "start.npz")


def _as_published(trainer: TrainStep, tmp_path) -> tuple[dict, dict]:
    """The trainer's weights and Adagrad accumulators in bilm-tf's names and layouts."""
    import copy

    twin = copy.deepcopy(trainer.model)
    with torch.no_grad():
        for param, acc in zip(trainer.model.parameters(), twin.parameters()):
            acc.copy_(trainer.optimizer.state[param]["sum"])
    out = []
    for model in (trainer.model, twin):
        path = str(tmp_path / "w.hdf5")
        save_weights(model.bilm, path)
        arrays = _read_h5(path)
        arrays["softmax/W"] = model.softmax.weight.detach().numpy()
        arrays["softmax/b"] = model.softmax.bias.detach().numpy()
        out.append(arrays)
    return out[0], out[1]


@pytest.mark.parametrize("lstm_impl", ["exact", "reference"])
def test_three_steps_land_where_bilm_tf_landed(tmp_path, lstm_impl):
    trainer = _trainer(f"train.lstm_impl={lstm_impl}")
    _start(trainer)
    norms = [float(trainer.step(batch).grad_norm) for batch in _batches()]
    # The fixture must exercise the clip: bilm-tf's all_clip_norm_val is 1.0 there.
    assert max(norms) > 1.0, norms
    weights, accumulators = _as_published(trainer, tmp_path)
    want_weights, want_accumulators, step = split_tensors(_read_npz("end.npz"))
    assert step == 4
    assert set(weights) == set(want_weights) and set(accumulators) == set(want_accumulators)
    start_weights, _, _ = split_tensors(_read_npz("start.npz"))
    for name in sorted(want_weights):
        moved = np.abs(want_weights[name] - start_weights[name]).max()
        np.testing.assert_allclose(weights[name], want_weights[name], rtol=0, atol=1e-6,
                                   err_msg=f"{name} (moved {moved:.2e} in the 3 steps)")
        np.testing.assert_allclose(accumulators[name], want_accumulators[name], rtol=1e-6, atol=0, err_msg=name)


def test_three_sampled_softmax_steps_land_where_bilm_tf_landed(tmp_path):
    """The path bilm trains on: sampled softmax (8 of 33 classes, accidental hits, repeated targets), sparse
    softmax gradients deduplicated, clipped with the dense ones, and applied by sparse Adagrad. TF drew
    the fixture's fixed candidates (one set per direction); bilm's sampler is handed the same ones."""
    fixed = np.load(os.path.join(FIXTURE, "sampled_candidates.npz"))
    draws = [(torch.from_numpy(fixed[d]), int(fixed[f"{d}_tries"])) for d in ("forward", "backward")]
    trainer = _trainer("train.n_negative_samples_batch=8", "train.sparse_softmax=true")
    calls = []

    def sample(n_unique, generator=None, device=None):
        ids, tries = draws[len(calls) % 2]  # forward, then backward, as bilm-tf's graph
        calls.append(n_unique)
        assert n_unique == len(ids)
        return ids.clone(), tries

    trainer.model.softmax.sampler.sample = sample
    assert trainer.model.softmax.sparse  # sparse gradients and the softmax's own Adagrad group
    _start(trainer)
    batches = _batches()
    hits = sum(int(np.isin(b[d]["next_token_ids"].numpy(), draws[i][0].numpy()).sum())
               for b in batches for i, d in enumerate(("forward", "backward")))
    assert hits > 0  # accidental hits are exercised
    norms = [float(trainer.step(batch).grad_norm) for batch in batches]
    assert len(calls) == 6 and max(norms) > 1.0, (calls, norms)
    weights, accumulators = _as_published(trainer, tmp_path)
    want_weights, want_accumulators, step = split_tensors(_read_npz("end_sampled.npz"))
    assert step == 4
    for name in sorted(want_weights):
        np.testing.assert_allclose(weights[name], want_weights[name], rtol=0, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(accumulators[name], want_accumulators[name], rtol=1e-6, atol=0, err_msg=name)


def test_mean_loss_convention_is_not_bilm_tf(tmp_path):
    """loss_scale none differentiates the mean loss: the run no longer lands where bilm-tf did."""
    trainer = _trainer("optim.loss_scale=none")
    _start(trainer)
    for batch in _batches():
        trainer.step(batch)
    weights, _ = _as_published(trainer, tmp_path)
    want, _, _ = split_tensors(_read_npz("end.npz"))
    assert max(np.abs(weights[n] - want[n]).max() for n in want) > 1e-3


def test_gradient_is_unroll_steps_times_the_mean_loss_gradient():
    grads = {}
    for scale in ("unroll_steps", "none"):
        trainer = _trainer(f"optim.loss_scale={scale}", "optim.max_grad_norm=1e9")
        _start(trainer)
        grads[scale] = float(trainer.step(_batches()[0]).grad_norm)
    unroll = _options()["unroll_steps"]
    assert grads["unroll_steps"] == pytest.approx(unroll * grads["none"], rel=1e-5)


def test_one_adagrad_step_with_bilm_tf_scale_by_hand():
    """Two parameters, loss = mean over T=4 steps of (w1 x + w2)^2 / 2 at x = 1: bilm-tf differentiates
    T x loss, clips the global norm to 5, then Adagrad (lr 0.2, accumulator 1.0)."""
    from bilm.training.gradients import clip_grad_norm_

    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = torch.optim.Adagrad([w], lr=0.2, initial_accumulator_value=1.0)
    T = 4
    loss = ((w[0] * 1.0 + w[1]) ** 2 / 2).repeat(T).mean()  # = 4.5
    (loss * T).backward()  # d/dw of T * 4.5 = T * (w1 + w2) * [1, 1] = [12, 12]
    assert w.grad.tolist() == [12.0, 12.0]
    norm = clip_grad_norm_([w], 5.0)
    assert float(norm) == pytest.approx(12 * math.sqrt(2))
    g = 12 * 5.0 / (12 * math.sqrt(2) + 1e-6)  # each component after the clip
    opt.step()
    acc = 1.0 + g * g
    want = [1.0 - 0.2 * g / math.sqrt(acc), 2.0 - 0.2 * g / math.sqrt(acc)]
    assert w.detach().tolist() == pytest.approx(want, abs=1e-6)
    assert opt.state[w]["sum"].tolist() == pytest.approx([acc, acc], rel=1e-6)


def test_top_output_is_dropped_before_the_softmax():
    """bilm-tf drops the top LSTM output before the softmax (training.py: tf.nn.dropout(lstm_output_flat)):
    with everything dropped the softmax sees zeros, so with zero biases the loss is log V exactly."""
    from bilm.modules.language_model import LanguageModel

    options = _options()
    cfg = config_from_dict(config_from_bilmtf_options(options))
    model = LanguageModel(cfg.model, options["n_tokens_vocab"], dropout=1.0).train()
    loss, _, _ = model(_batches()[0], None, n_negative_samples=options["n_tokens_vocab"])
    assert float(loss.detach()) == pytest.approx(math.log(options["n_tokens_vocab"]), abs=1e-6)
    assert float(model.eval()(_batches()[0], None, n_negative_samples=options["n_tokens_vocab"])[0].detach()) != \
        pytest.approx(math.log(options["n_tokens_vocab"]), abs=1e-3)


def test_packing_equals_bilm_tf_batches():
    """bilm.data's training batches (file order) equal those bilm-tf's own _get_batch built for the fixture:
    token ids, targets and char ids of both directions (its batches 2-4; char ids there are unshifted)."""
    from bilm.data import LMDataset
    from bilm.core.vocab import Vocabulary

    options = _options()
    dataset = LMDataset(os.path.join(FIXTURE, "text.txt"), Vocabulary.from_file(os.path.join(FIXTURE, "vocab.txt")),
                        options["batch_size"], options["unroll_steps"], mode="train", shuffle=False)
    ours = iter(dataset)
    next(ours)  # bilm-tf's first batch trained checkpoint A; the fixture holds the next three
    for want in _batches():
        got = next(ours)
        for d in ("forward", "backward"):
            for key in ("token_ids", "next_token_ids", "char_ids", "mask"):
                assert torch.equal(got[d][key].long(), want[d][key].long()), (d, key)


# ----- initializers, against the distributions bilm-tf's own graph initialized -----

@pytest.mark.parametrize("case", ["relu", "tanh", "word"])
def test_initialization_matches_bilm_tf(case, tmp_path):
    """Every variable's quantiles (10% .. 90%) within 10% of TF's 1%-99% range; constants exactly."""
    from bilm.modules.language_model import LanguageModel

    with open(os.path.join(FIXTURE, "init_quantiles.json")) as f:
        fixture = json.load(f)
    levels, tf_case = fixture["quantiles"], fixture["cases"][case]
    options = tf_case["options"]
    cfg = config_from_dict(config_from_bilmtf_options(options))
    torch.manual_seed(0)
    model = LanguageModel(cfg.model, options["n_tokens_vocab"], dropout=options["dropout"])
    path = str(tmp_path / "w.hdf5")
    save_weights(model.bilm, path)
    ours = _read_h5(path)
    ours["softmax/W"], ours["softmax/b"] = model.softmax.weight.detach().numpy(), model.softmax.bias.detach().numpy()
    checked = set()
    for tf_name, stats in tf_case["variables"].items():
        name = split_tensors({tf_name: np.zeros(0)})[0].popitem()[0]
        want, values = stats["quantiles"], ours[name]
        assert list(values.shape) == stats["shape"], name
        got = np.quantile(values, levels)
        if want[0] == want[-1]:  # a constant initializer (biases)
            assert got[0] == got[-1] == want[0], name
        else:
            tolerance = 0.1 * (want[levels.index(0.99)] - want[levels.index(0.01)])
            for level in (0.1, 0.25, 0.5, 0.75, 0.9):
                i = levels.index(level)
                assert abs(got[i] - want[i]) <= tolerance, f"{name}: quantile {level}: {got[i]:.4f} vs TF {want[i]:.4f}"
        checked.add(name)
    assert checked == set(ours)


# ----- the sampled softmax and its sampler, against TensorFlow's own numbers -----

def test_sampled_softmax_loss_equals_tensorflow():
    f = np.load(os.path.join(FIXTURE, "sampled_softmax.npz"))
    layer = SoftmaxLayer(f["weight"].shape[0], f["weight"].shape[1], sparse=False)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(f["weight"]))
        layer.bias.copy_(torch.from_numpy(f["bias"]))
    loss = layer.sampled_loss(torch.from_numpy(f["hidden"]), torch.from_numpy(f["targets"]),
                              torch.from_numpy(f["candidates"]), torch.from_numpy(f["sampled_expected"]),
                              torch.from_numpy(f["true_expected"]))
    assert int(np.isin(f["targets"], f["candidates"]).sum()) >= 1  # an accidental hit is covered
    np.testing.assert_allclose(loss.detach().numpy(), f["loss"], rtol=1e-6, atol=1e-6)


def test_expected_counts_equal_tensorflow_sampler():
    """TF's log_uniform_candidate_sampler (unique) returned ids and expected counts; ours reproduce the
    counts for the number of draws that sample took (which TF does not return: found by search)."""
    f = np.load(os.path.join(FIXTURE, "sampled_softmax.npz"))
    sampler = LogUniformSampler(int(f["sampler_vocab"]))
    ids = torch.from_numpy(f["sampler_ids"])
    n = ids.numel()
    assert len(set(ids.tolist())) == n
    matches = [t for t in range(n, 20 * n)
               if np.allclose(sampler.expected_count(ids, t, n).numpy(), f["sampler_sampled_expected"], rtol=2e-6)]
    assert len(matches) == 1, matches
    true = sampler.expected_count(torch.from_numpy(f["sampler_true"]), matches[0], n)
    np.testing.assert_allclose(true.numpy(), f["sampler_true_expected"], rtol=2e-6)


# ----- reading bilm-tf's checkpoint without TensorFlow -----

def test_tf_checkpoint_reader_equals_tensorflow_reader():
    prefix = latest_tf_checkpoint(os.path.join(FIXTURE, "tf_checkpoint"))
    ours = read_tf_checkpoint(prefix)
    want = _read_npz("start.npz")  # written from tf.train.load_checkpoint
    assert set(ours) == set(want)
    for name in want:
        assert ours[name].dtype == want[name].dtype and ours[name].shape == want[name].shape, name
        np.testing.assert_array_equal(ours[name], want[name], err_msg=name)


def test_import_exports_what_dump_weights_wrote(tmp_path):
    from bilm.commands.import_bilmtf import import_bilmtf
    from bilm.commands.export import export

    result = import_bilmtf(os.path.join(FIXTURE, "tf_checkpoint"), os.path.join(FIXTURE, "vocab.txt"),
                           str(tmp_path / "run"))
    assert result["step"] == 1
    export(str(tmp_path / "run"), str(tmp_path / "export"), include_softmax=True)
    ours = _read_h5(str(tmp_path / "export" / "weights.hdf5"))
    want = _read_h5(os.path.join(FIXTURE, "dump_weights.hdf5"))
    assert set(ours) == set(want)
    for name in want:
        np.testing.assert_array_equal(ours[name], want[name], err_msg=name)
    start, _, _ = split_tensors(_read_npz("start.npz"))
    softmax = _read_h5(str(tmp_path / "export" / "softmax.hdf5"))
    np.testing.assert_array_equal(softmax["softmax/W"], start["softmax/W"])


def test_published_names_follow_dump_weights():
    assert published_name("lm/RNN_1/rnn/multi_rnn_cell/cell_0/lstm_cell/kernel") == \
        "RNN_1/RNN/MultiRNNCell/Cell0/LSTMCell/W_0"
    assert published_name("lm/RNN_0/rnn/multi_rnn_cell/cell_1/lstm_cell/projection/kernel") == \
        "RNN_0/RNN/MultiRNNCell/Cell1/LSTMCell/W_P_0"
    assert published_name("lm/RNN_0/rnn/multi_rnn_cell/cell_1/lstm_cell/bias") == \
        "RNN_0/RNN/MultiRNNCell/Cell1/LSTMCell/B"
    assert published_name("lm/CNN_high_0/W_carry") == "CNN_high_0/W_carry"
    assert published_name("lm/char_embed") == "char_embed"


def test_import_errors_name_the_file(tmp_path, capsys):
    import shutil

    from bilm.cli import main

    assert main(["import-bilm-tf", "--tf-save-dir", str(tmp_path / "nowhere"), "--vocab",
                 os.path.join(FIXTURE, "vocab.txt"), "--out", str(tmp_path / "run")]) == 1
    assert "nowhere/options.json: cannot read" in capsys.readouterr().err
    # A truncated data file, and a vocab of another size.
    broken = tmp_path / "ckpt"
    shutil.copytree(os.path.join(FIXTURE, "tf_checkpoint"), broken)
    data = next(broken.glob("*.data-*"))
    data.write_bytes(data.read_bytes()[:1000])
    assert main(["import-bilm-tf", "--tf-save-dir", str(broken), "--vocab", os.path.join(FIXTURE, "vocab.txt"),
                 "--out", str(tmp_path / "run")]) == 1
    assert "truncated data file?" in capsys.readouterr().err
    short_vocab = tmp_path / "vocab.txt"
    short_vocab.write_text("<S>\n</S>\n<UNK>\nthe\n")
    assert main(["import-bilm-tf", "--tf-save-dir", os.path.join(FIXTURE, "tf_checkpoint"), "--vocab",
                 str(short_vocab), "--out", str(tmp_path / "run")]) == 1
    assert "has 4 tokens" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing half-written


def test_imported_run_resumes_with_its_optimizer_state(tmp_path):
    """bilm train --resume on an imported run continues from TF's step and accumulators."""
    from bilm.commands.import_bilmtf import import_bilmtf
    from bilm.runs.checkpoint import load_checkpoint
    from bilm.runs.run_dir import list_checkpoints
    from bilm.runs.config import load_config
    from bilm.training.run import train

    run = tmp_path / "run"
    import_bilmtf(os.path.join(FIXTURE, "tf_checkpoint"), os.path.join(FIXTURE, "vocab.txt"), str(run))
    before = load_checkpoint(list_checkpoints(str(run / "checkpoints"))[-1])
    cfg = load_config(str(run / "config.yaml"), ["train.max_steps=3", "train.device=cpu"])
    train(cfg, os.path.join(FIXTURE, "text.txt"), str(run), resume=True, vocab_file=os.path.join(FIXTURE, "vocab.txt"),
          progress=False)
    after = load_checkpoint(list_checkpoints(str(run / "checkpoints"))[-1])
    assert (before["step"], after["step"]) == (1, 3)
    # Adagrad's accumulators only grow: from TF's values, not from a fresh 1.0.
    state_before = before["optimizer"]["state"]
    state_after = after["optimizer"]["state"]
    for key in state_before:
        assert torch.all(state_after[key]["sum"] >= state_before[key]["sum"] - 1e-6)
        assert float(state_after[key]["step"]) == 3.0
    assert any(float(state_before[k]["sum"].max()) > 1.0 for k in state_before)


# ----- 50 steps with dropout and the sampled softmax, on other architectures (fixtures/bilmtf_training/long) -----

LONG = os.path.join(FIXTURE, "long")
LONG_CASES = ("proj_two_highway", "noproj_one_highway", "one_layer")
UNROLL_LONG = 5  # make_long_fixture.UNROLL


class FixedDropout:
    """Stands in for ``torch.nn.functional.dropout`` during a replay: hands out, call by call, the masks
    make_long_fixture.py fed TensorFlow's dropout ops, and applies them as TF does (x * scale * mask).

    The masks are TF's: per direction, layer k's input (step, time, row, feature) and the top output
    (step, row x time, feature). bilm drops a layer's input for all time steps at once, in lock step for
    both directions (D, T, B, F) or one stack at a time (B, T, F), then the top output of each direction
    (B, T, P); ``expect`` lists the calls of one step in that order."""

    def __init__(self, masks, n_layers: int, lock_step: bool, unroll: int = UNROLL_LONG):
        self.masks, self.step, self.calls, self.unroll = masks, 0, [], unroll
        layers = [f"layer{k}" for k in range(n_layers)]
        self.expect = ([("both", site) for site in layers] if lock_step else
                       [(d, site) for d in ("forward", "backward") for site in layers])
        self.expect += [("forward", "top"), ("backward", "top")]

    def _mask(self, direction: str, site: str) -> np.ndarray:
        m = self.masks[f"{direction}_{site}"][self.step]
        if site == "top":
            return m.reshape(m.shape[0] // self.unroll, self.unroll, m.shape[1])  # TF flattened (B, T) rows
        return m.transpose(1, 0, 2)  # (T, B, F) -> (B, T, F)

    def __call__(self, x, p=0.5, training=True, inplace=False):
        assert training and not inplace
        direction, site = self.expect[len(self.calls) % len(self.expect)]
        self.calls.append((direction, site))
        if direction == "both":
            mask = np.stack([self.masks[f"{d}_{site}"][self.step] for d in ("forward", "backward")])
        else:
            mask = self._mask(direction, site)
        assert tuple(x.shape) == mask.shape, (direction, site, tuple(x.shape), mask.shape)
        scale = np.float32(1.0 / (1.0 - p))  # TF's dropout_v2: x * scale, then the mask
        return x * torch.tensor(scale) * torch.from_numpy(mask.astype(np.float32))


def replay_fixed_draws(trainer: TrainStep, run_dir: str, masks, unroll: int, after_step=None) -> np.ndarray:
    """Trains ``run_dir``'s batches.npz from the trainer's weights with its candidates.npz (one set per step
    and direction) for the sampler and ``masks`` (see FixedDropout) for dropout, as bilm-tf trained them.
    ``after_step(i, result)`` sees each step. Returns the per-step losses (steps x [forward, backward]).
    The 50-step fixtures and benchmarks/parity_replay.py (the same at full size) both replay through it."""
    fixed = np.load(os.path.join(run_dir, "candidates.npz"))
    sampled = []

    def sample(n_unique, generator=None, device=None):
        step, direction = divmod(len(sampled), 2)  # forward, then backward, as bilm-tf's graph
        sampled.append(n_unique)
        name = ("forward", "backward")[direction]
        ids = torch.from_numpy(fixed[name][step].astype(np.int64))
        assert n_unique == len(ids)
        return ids, int(fixed[f"{name}_tries"][step])

    trainer.model.softmax.sampler.sample = sample
    lock_step = trainer.cfg.train.lstm_impl == "fused"
    dropout = FixedDropout(masks, trainer.cfg.model.lstm.n_layers, lock_step, unroll)
    curve = []
    with mock.patch.object(torch.nn.functional, "dropout", dropout):
        for i, batch in enumerate(_batches(os.path.join(run_dir, "batches.npz"))):
            dropout.step = i
            result = trainer.step(batch)
            curve.append([float(result.mean_loss[d]) for d in ("forward", "backward")])
            if after_step is not None:
                after_step(i, result)
    assert len(dropout.calls) == len(dropout.expect) * len(curve) and len(sampled) == 2 * len(curve)
    return np.array(curve)


def replay_long(case: str, *overrides: str) -> tuple[TrainStep, np.ndarray]:
    """bilm trains the case's 50 batches from bilm-tf's step-0 weights with TF's masks and candidates.
    Returns the trainer and the per-step losses (steps x [forward, backward])."""
    with open(os.path.join(LONG, case, "options.json")) as f:
        options = json.load(f)
    assert options["unroll_steps"] == UNROLL_LONG and options["dropout"] > 0 and options["sample_softmax"]
    cfg = config_from_dict(config_from_bilmtf_options(options),
                           overrides=["train.device=cpu", "train.sparse_softmax=true", *overrides])
    trainer = TrainStep(cfg, options["n_tokens_vocab"], DistEnv())
    weights, _, step = split_tensors(_read_npz(os.path.join("long", case, "start.npz")))
    load_bilmtf_state(trainer.model, None, weights, {}, step, "start.npz")  # step 0: accumulators 1.0
    masks = _read_npz(os.path.join("long", case, "masks.npz"))
    return trainer, replay_fixed_draws(trainer, os.path.join(LONG, case), masks, UNROLL_LONG)


@pytest.mark.parametrize("case,lstm_impl", [(case, "exact") for case in LONG_CASES] + [(LONG_CASES[0], "reference")])
def test_fifty_steps_with_dropout_land_where_bilm_tf_landed(case, lstm_impl, tmp_path):
    """50 steps of bilm-tf's train() (dropout 0.2, sampled softmax, clip, carried states) on an
    architecture the three-step fixture does not use, replayed from TF's step-0 weights: each direction's
    loss at every step, and the forward LSTM, the backward LSTM and the shared layers at the end (they
    moved up to 1.15; bilm lands within 5e-7). ``exact`` runs both directions in lock step, ``reference``
    one stack after the other."""
    trainer, curve = replay_long(case, f"train.lstm_impl={lstm_impl}")
    want_curve = np.load(os.path.join(LONG, case, "curve.npz"))
    for k, direction in enumerate(("forward", "backward")):
        np.testing.assert_allclose(curve[:, k], want_curve[direction], rtol=0, atol=1e-5,
                                   err_msg=f"{direction} loss per step")
    weights, accumulators = _as_published(trainer, tmp_path)
    want_weights, want_accumulators, step = split_tensors(_read_npz(os.path.join("long", case, "end.npz")))
    assert step == 50 and set(weights) == set(want_weights)
    groups = {"forward LSTM": "RNN_0/", "backward LSTM": "RNN_1/", "shared": ""}
    for group, prefix in groups.items():
        names = [n for n in sorted(want_weights) if n.startswith(prefix) and
                 (prefix or not n.startswith("RNN_"))]
        assert names, group
        for name in names:
            np.testing.assert_allclose(weights[name], want_weights[name], rtol=0, atol=2e-6, err_msg=f"{group}: {name}")
            np.testing.assert_allclose(accumulators[name], want_accumulators[name], rtol=5e-6, atol=0,
                                       err_msg=f"{group}: {name} (Adagrad)")
