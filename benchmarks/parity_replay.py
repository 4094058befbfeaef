"""bilm and bilm-tf trained from the same weights on the same batches, dropout masks and candidates: the
per-direction training curves side by side, at a parity-grid configuration's real size.

    python benchmarks/parity_replay.py --tf-python /tmp/tf-venv/bin/python --peer-src /tmp/bilm-tf \\
        [--config 512-hw1-f512-valid] [--steps 300] [--seed 0] [--work /tmp/bilm-replay]

The parity grid (benchmarks/parity_bilmtf.py --grid) compares the two tools over seeds: each draws its
own init, data order, dropout and candidates, so a gap of a few percent hides in the seed spread. Here
nothing is left to chance, which is tests/test_bilmtf_parity.py's 50-step replay
(tests/fixtures/bilmtf_training/make_long_fixture.py) at full size:

1. (TensorFlow, ``--tf-python``) bilm-tf's own, unmodified ``train()`` runs ``--steps`` batches of the
   configuration (batch 32 x 20, 1024 candidates, dropout 0.1, Adagrad 0.2, clip 10, the prepared
   WikiText-2 split and its vocabulary, read by bilm-tf's own BidirectionalLMDataset, shuffled from
   ``--seed``). Its dropout ops and its candidate sampler are replaced, as the long fixture's are, by
   fixed values per step: masks drawn from (seed, step, direction, site) by ``Masks`` below,
   candidates by TF's unique log-uniform sampling in numpy. It records its init (step 0), every
   step's loss per direction and its weights and Adagrad accumulators after the last step.
2. (bilm) ``bilm train``'s configuration for the grid (configs/elmo_small.yaml + the grid's
   overrides) starts from those step-0 weights and trains the same batches with the same masks and
   candidates (``--lstm-impl``: fused, what ``bilm train`` uses, or reference).
3. The table: per direction, the loss of both tools at chosen steps and the largest difference up
   to there; after the last step, each group's weights (forward LSTM, backward LSTM, shared char CNN
   and projection, softmax) and accumulators: largest difference against how far they moved.

Float32 arithmetic in another order makes the runs drift apart slowly (the 50-step fixture lands
within 5e-7); a semantic difference shows as a step where one direction's curve leaves the other's.
WORK/SEED/ keeps bilm-tf's side (reused when there); --steps 300 takes about 4 min (bilm-tf) + 2 min (bilm).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("BILM_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
FIXTURE_TOOLS = os.path.join(ROOT, "tests", "fixtures", "bilmtf_training")
DIRECTIONS = ("forward", "backward")


class Masks:
    """Dropout keep-masks per direction, site and step, a pure function of (seed, step, direction, site):
    both processes draw the same ones and none is stored. ``masks[f"{direction}_{site}"][step]`` is
    (unroll, batch, width) for ``layer{k}`` (layer k's input) and (batch x unroll, width) for ``top``
    (TF flattens rows), the layouts the long fixture stores."""

    def __init__(self, seed: int, keep: float, batch: int, unroll: int, width: int, n_layers: int):
        self.seed, self.keep, self.batch, self.unroll, self.width = seed, keep, batch, unroll, width
        self.sites = [f"layer{k}" for k in range(n_layers)] + ["top"]

    def __getitem__(self, key: str) -> "_SiteMasks":
        direction, site = key.split("_")
        return _SiteMasks(self, DIRECTIONS.index(direction), self.sites.index(site), site == "top")

    def by_direction(self) -> list[dict]:
        """The layout make_long_fixture.patch_graph reads: [direction][site][step]."""
        return [{site: self[f"{d}_{site}"] for site in self.sites} for d in DIRECTIONS]


class _SiteMasks:
    def __init__(self, masks: Masks, direction: int, site: int, top: bool):
        self.m, self.direction, self.site, self.top = masks, direction, site, top
        self._cached: tuple[int, np.ndarray] | None = None

    def __getitem__(self, step: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != step:  # TF asks once per time step
            m = self.m
            shape = (m.batch * m.unroll, m.width) if self.top else (m.unroll, m.batch, m.width)
            rng = np.random.default_rng([m.seed, step, self.direction, self.site])
            self._cached = (step, rng.uniform(size=shape) < m.keep)
        return self._cached[1]


# ----------------------------------------------------------------------------- 1. bilm-tf (TensorFlow)

def tf_stage(a) -> None:
    """Runs under --tf-python: bilm-tf's train() with fixed masks and candidates; writes WORK/SEED/."""
    sys.path[:0] = [a.harness, FIXTURE_TOOLS]
    import random
    import shutil

    import _peer_shims
    import make_long_fixture as long_fixture
    from bilmtf_train import default_options, merge
    from make_fixture import fixed_candidates, read_checkpoint, write_npz

    bilm = _peer_shims.load_bilm_tf(a.peer_src)
    import tensorflow as tf  # compat.v1, aliased by load_bilm_tf

    training, data = bilm.training, bilm.data
    random.seed(a.seed)
    vocab = training.load_vocab(a.vocab, 50)
    options = merge(default_options(vocab.size), json.loads(a.options_json))
    B, T, K = options["batch_size"], options["unroll_steps"], options["n_negative_samples_batch"]
    options["n_train_tokens"] = a.steps * B * T
    ds = data.BidirectionalLMDataset(a.train_glob, vocab, test=False, shuffle_on_load=True)
    it = ds.iter_batches(B, T)
    batches = [next(it) for _ in range(a.steps)]
    masks = Masks(a.seed, 1.0 - options["dropout"], B, T, options["lstm"]["projection_dim"],
                  options["lstm"]["n_layers"])
    rng = [np.random.default_rng([a.seed, 7, d]) for d in range(2)]
    candidates = [[fixed_candidates(vocab.size, K, rng[d]) for _ in range(a.steps)] for d in range(2)]
    long_fixture.N_NEGATIVES = K  # what its sampler stand-in checks against

    class StepBatches:
        def __init__(self, clock):
            self.clock = clock

        def iter_batches(self, batch_size, num_steps):
            assert (batch_size, num_steps) == (B, T)
            for i, batch in enumerate(batches):
                self.clock["step"], self.clock["pending"] = i, True
                yield batch

    out = os.path.join(a.work, str(a.seed))
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp()
    try:
        clock, losses = {}, []
        unpatch = long_fixture.patch_graph(tf, options, clock, masks.by_direction(), candidates, losses)
        states = {}
        patched_run = tf.Session.run

        def run_keeping_states(self, fetches, feed_dict=None, **kw):
            training_step = bool(clock.get("pending"))
            out = patched_run(self, fetches, feed_dict=feed_dict, **kw)
            if training_step and clock["step"] < a.save_states:  # out[3:]: each direction's final states
                for d, layers in zip(DIRECTIONS, out[3:]):
                    for k, (c, h) in enumerate(layers):
                        states[f"{d}_{k}_c_{clock['step']}"], states[f"{d}_{k}_h_{clock['step']}"] = c, h
            return out

        tf.Session.run = run_keeping_states
        try:
            tf.reset_default_graph()
            tf.set_random_seed(a.seed)
            training.train(options, StepBatches(clock), 1, work, work)
        finally:
            tf.Session.run = patched_run
            unpatch()
        end = read_checkpoint(tf, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert len(losses) == a.steps and int(end["global_step"]) == a.steps, (len(losses), end["global_step"])
    write_npz(os.path.join(out, "start.npz"), {k: v for k, v in clock["init"].items() if not k.endswith("/Adagrad")})
    write_npz(os.path.join(out, "end.npz"), end)
    keys = ["token_ids", "tokens_characters", "next_token_id"]
    np.savez_compressed(os.path.join(out, "batches.npz"), **{
        k + s: np.stack([b[k + s] for b in batches]) for k in keys for s in ("", "_reverse")})
    np.savez(os.path.join(out, "candidates.npz"),
             **{d: np.stack([ids for ids, _ in candidates[i]]) for i, d in enumerate(DIRECTIONS)},
             **{f"{d}_tries": np.array([t for _, t in candidates[i]]) for i, d in enumerate(DIRECTIONS)})
    np.savez(os.path.join(out, "curve.npz"), **{d: np.array([loss[i] for loss in losses], dtype=np.float64)
                                                for i, d in enumerate(DIRECTIONS)})
    if states:
        np.savez(os.path.join(out, "states.npz"), **states)
    with open(os.path.join(out, "options.json"), "w") as f:
        json.dump(options, f, indent=1, sort_keys=True)
    print(f"bilm-tf: {a.steps} steps; loss forward {losses[0][0]:.3f} -> {losses[-1][0]:.3f}, "
          f"backward {losses[0][1]:.3f} -> {losses[-1][1]:.3f}")


# ----------------------------------------------------------------------------- 2. bilm

def replay(a, out: str, arch, lstm_impl: str) -> tuple[np.ndarray, dict, dict, np.ndarray, object]:
    """bilm trains bilm-tf's batches from its step-0 weights. Returns (curve, weights, accumulators,
    grad norms, trainer): the per-step losses (steps x [forward, backward]) and the end state in bilm-tf's
    names."""
    sys.path[:0] = [os.path.join(ROOT, "tests"), os.path.join(ROOT, "benchmarks")]
    import test_bilmtf_parity as golden
    from parity_bilmtf import bilm_overrides

    from bilm.formats.bilmtf import split_tensors
    from bilm.modules.tf_checkpoint import load_bilmtf_state
    from bilm.runs.config import load_config
    from bilm.core.distributed import DistEnv
    from bilm.training.step import TrainStep

    options = json.load(open(os.path.join(out, "options.json")))
    sets = bilm_overrides(a, arch, a.seed) + [f"train.lstm_impl={lstm_impl}", "train.max_steps=null"]
    cfg = load_config(os.path.join(ROOT, "configs", "elmo_small.yaml"), sets)
    trainer = TrainStep(cfg, options["n_tokens_vocab"], DistEnv())
    weights, _, _ = split_tensors(golden._read_npz(os.path.join(out, "start.npz")))
    load_bilmtf_state(trainer.model, None, weights, {}, 0, "start.npz")  # step 0: accumulators 1.0
    t = cfg.train
    masks = Masks(a.seed, 1.0 - t.dropout, t.batch_size, t.unroll_steps, cfg.model.lstm.projection_dim,
                  cfg.model.lstm.n_layers)
    norms, state_lines = [], []
    want_states = np.load(os.path.join(out, "states.npz")) if os.path.exists(os.path.join(out, "states.npz")) else {}

    def after_step(i: int, result) -> None:
        norms.append(float(result.grad_norm))
        if f"forward_0_c_{i}" in want_states:
            diffs = [f"{d} layer {k} {name} {np.abs(tensor.numpy() - want_states[f'{d}_{k}_{name}_{i}']).max():.1e}"
                     for d in DIRECTIONS for k, (h, c) in enumerate(trainer.state[d])
                     for name, tensor in (("h", h), ("c", c))]
            state_lines.append(f"LSTM states after step {i + 1}, max |bilm - bilm-tf|: " + ", ".join(diffs))

    curve = golden.replay_fixed_draws(trainer, out, masks, t.unroll_steps, after_step)
    with tempfile.TemporaryDirectory() as tmp:
        got_w, got_acc = golden._as_published(trainer, Path(tmp))
    print("\n".join(state_lines))
    return curve, got_w, got_acc, np.array(norms), trainer


def heldout_perplexity(model, heldout: str, vocab: str) -> dict:
    """``bilm evaluate``'s figures (full softmax, carried states, batch 32 x 20) of ``model`` on ``heldout``."""
    from bilm.data import LMDataset
    from bilm.scoring.evaluate import score
    from bilm.core.distributed import DistEnv
    from bilm.core.vocab import Vocabulary

    dataset = LMDataset(heldout, Vocabulary.from_file(vocab), 32, 20, mode="eval", char_inputs=True,
                        max_characters_per_token=50)
    result = score(model, dataset, DistEnv())
    return {"average": result["average_perplexity"], **{d: result[d]["perplexity"] for d in DIRECTIONS}}


def bilmtf_end_model(out: str, trainer):
    """A copy of ``trainer``'s model holding bilm-tf's weights after the last step."""
    import copy

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import test_bilmtf_parity as golden

    from bilm.formats.bilmtf import split_tensors
    from bilm.modules.tf_checkpoint import load_bilmtf_state

    model = copy.deepcopy(trainer.model)
    weights, _, _ = split_tensors(golden._read_npz(os.path.join(out, "end.npz")))
    load_bilmtf_state(model, None, weights, {}, 0, "end.npz")
    return model


GROUPS = {"forward LSTM": lambda n: n.startswith("RNN_0/"), "backward LSTM": lambda n: n.startswith("RNN_1/"),
          "softmax": lambda n: n.startswith("softmax/"),
          "shared (char CNN, highway, projection)": lambda n: not n.startswith(("RNN_", "softmax/"))}


def report(a, out: str, lstm_impl: str, curve: np.ndarray, weights: dict, accumulators: dict) -> list[str]:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import test_bilmtf_parity as golden

    from bilm.formats.bilmtf import split_tensors

    want = np.load(os.path.join(out, "curve.npz"))
    start, _, _ = split_tensors(golden._read_npz(os.path.join(out, "start.npz")))
    end_w, end_acc, step = split_tensors(golden._read_npz(os.path.join(out, "end.npz")))
    n = len(curve)
    marks = sorted({s for s in (1, 2, 3, 4, 5, 10, 25, 50, 100, 150, 200, 250, 300, 400, 500, n) if s <= n})
    lines = [f"### {a.config}, seed {a.seed}, bilm lstm_impl={lstm_impl}: {n} steps from bilm-tf's step-0 weights",
             "", "Sampled-softmax loss per step (each tool's own), and the largest |difference| over steps 1..s:", "",
             "| step | " + " | ".join(f"{d} bilm-tf | {d} bilm | max abs diff" for d in DIRECTIONS) + " |",
             "|" + " --- |" * 7]
    for s in marks:
        cells = []
        for k, d in enumerate(DIRECTIONS):
            diff = np.abs(curve[:s, k] - want[d][:s]).max()
            cells += [f"{want[d][s - 1]:.4f}", f"{curve[s - 1, k]:.4f}", f"{diff:.2e}"]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    for k, d in enumerate(DIRECTIONS):
        gap = curve[:, k] - want[d][:n]
        tail = gap[-50:]
        lines.append(f"\n{d}: mean loss difference bilm - bilm-tf over all steps {gap.mean():+.2e}, "
                     f"over the last {len(tail)} {tail.mean():+.2e} (perplexity ratio {np.exp(tail.mean()):.4f})")
    lines += ["", f"After step {step}: largest |bilm - bilm-tf| per group, against the largest move from step 0:", "",
              "| group | weights diff | weights moved | accumulators rel. diff |", "| --- | --- | --- | --- |"]
    for group, member in GROUPS.items():
        names = [name for name in end_w if member(name)]
        w = max(float(np.abs(weights[name] - end_w[name]).max()) for name in names)
        moved = max(float(np.abs(end_w[name] - start[name]).max()) for name in names)
        acc = max(float((np.abs(accumulators[name] - end_acc[name]) / np.abs(end_acc[name])).max()) for name in names)
        lines.append(f"| {group} | {w:.2e} | {moved:.2e} | {acc:.2e} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", nargs="?", choices=["tf"], help=argparse.SUPPRESS)
    p.add_argument("--tf-python", help="a Python with tensorflow-cpu 2.15, numpy<2, h5py")
    p.add_argument("--peer-src", help="unmodified bilm-tf source tree")
    p.add_argument("--harness", default=os.path.join(SHARED, "peers", "harness"))
    p.add_argument("--config", default="512-hw1-f512-valid", help="a configuration of parity_bilmtf.py's grid")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lstm-impl", nargs="+", default=["fused"], choices=["fused", "reference"])
    p.add_argument("--work", default="/tmp/bilm-replay")
    p.add_argument("--out", help="also write the table to this file")
    p.add_argument("--score", action="store_true", help="score both tools' models after the last step on the "
                   "configuration's heldout split (bilm evaluate's scoring, about 90 s a model)")
    p.add_argument("--save-states", type=int, default=0, help="bilm-tf's LSTM states after each of the first N steps "
                   "(WORK/SEED/states.npz), compared with bilm's")
    # the TF stage's inputs (the main stage fills them in)
    p.add_argument("--train-glob", help=argparse.SUPPRESS)
    p.add_argument("--vocab", help=argparse.SUPPRESS)
    p.add_argument("--options-json", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.work = os.path.join(a.work, a.config)
    if a.stage == "tf":
        return tf_stage(a)

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import parity_bilmtf as grid_tool
    from machine import machine_line

    arch = {arch.name: arch for arch in grid_tool.grid(os.path.join(SHARED, "corpora", "wikitext-2"))}[a.config]
    # the grid's run settings, which bilm_overrides and bilmtf_options read
    vars(a).update(batch_size=32, unroll=20, negatives=1024, dropout=0.1, batches=a.steps, log_every=10, bilm_set=[])
    data = os.path.join(os.path.dirname(a.work), "data-" + arch.train_split)
    manifest, heldout, vocab = grid_tool.prepare(arch, data)
    out = os.path.join(a.work, str(a.seed))
    if not os.path.exists(os.path.join(out, "curve.npz")) or \
            len(np.load(os.path.join(out, "curve.npz"))["forward"]) != a.steps:
        if not (a.tf_python and a.peer_src):
            raise SystemExit(f"no bilm-tf run in {out}: give --tf-python and --peer-src")
        os.makedirs(out, exist_ok=True)
        grid_tool.sh([a.tf_python, os.path.abspath(__file__), "tf", "--peer-src", a.peer_src, "--harness", a.harness,
                      "--config", a.config, "--steps", str(a.steps), "--seed", str(a.seed),
                      "--work", os.path.dirname(a.work), "--save-states", str(a.save_states),
                      "--train-glob", os.path.join(os.path.dirname(manifest), "train", "shard-*"), "--vocab", vocab,
                      "--options-json", json.dumps(grid_tool.bilmtf_options(a, arch))], os.path.join(out, "tf.log"))
    lines, scores = [], {}
    for impl in a.lstm_impl:
        curve, weights, accumulators, norms, trainer = replay(a, out, arch, impl)
        if a.score:
            if "bilm-tf" not in scores:
                scores["bilm-tf"] = heldout_perplexity(bilmtf_end_model(out, trainer), heldout, vocab)
            scores[f"bilm ({impl})"] = heldout_perplexity(trainer.model, heldout, vocab)
        np.savez(os.path.join(out, f"curve-bilm-{impl}.npz"), forward=curve[:, 0], backward=curve[:, 1],
                 grad_norm=norms)
        lines += report(a, out, impl, curve, weights, accumulators)
        lines += ["", f"global gradient norm (bilm): median {np.median(norms):.2f}, steps clipped at 10: "
                      f"{int((norms > 10).sum())} of {len(norms)}", ""]
    if scores:
        lines += [f"Heldout perplexity after step {a.steps} ({os.path.basename(arch.heldout_text)}, bilm evaluate's "
                  "scoring: full softmax, carried states):", "", "| model | average | forward | backward |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {name} | {r['average']:.1f} | {r['forward']:.1f} | {r['backward']:.1f} |"
                  for name, r in scores.items()]
        lines.append("")
        with open(os.path.join(out, "scores.json"), "w") as f:
            json.dump(scores, f, indent=1)
    lines.append(machine_line())
    print("\n".join(lines))
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
