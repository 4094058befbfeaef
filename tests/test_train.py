"""Training end to end on the bilm-tf fixture corpus (CPU, tiny models)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from bilm.runs.checkpoint import load_checkpoint
from bilm.runs.run_dir import list_checkpoints
from bilm.scoring.evaluate import evaluate
from bilm.training.run import train
from train_helpers import TRAIN_DATA, TRAIN_VOCAB, tiny_config


@pytest.mark.parametrize("word_inputs", [False, True], ids=["char", "word"])
def test_reaches_bilm_tf_perplexity_bar(tmp_path, word_inputs):
    # The original suite: 50 epochs on data.txt, heldout perplexity < 20 on the same file.
    cfg = tiny_config("train.n_epochs=50", "train.seed=1", word_inputs=word_inputs)
    n_tokens = sum(len(line.split()) for line in open(TRAIN_DATA))
    cfg.train.n_train_tokens = n_tokens
    summary = train(cfg, TRAIN_DATA, str(tmp_path), vocab_file=TRAIN_VOCAB, progress=False)
    assert summary["step"] == int(50 * n_tokens / 20)
    result = evaluate(str(tmp_path), TRAIN_DATA, progress=False, device="cpu")
    assert result["forward"]["tokens"] == n_tokens + 5  # n words + </S> per sentence
    assert result["average_perplexity"] < 20, result


def _params(run_dir):
    payload = load_checkpoint(list_checkpoints(os.path.join(run_dir, "checkpoints"))[-1])
    return payload["model"]


def test_resume_is_exact(tmp_path):
    overrides = ("train.max_steps=12", "train.checkpoint_every_steps=5", "train.keep_checkpoints=5",
                 "train.log_every_steps=1", "train.seed=3")
    full = tmp_path / "full"
    train(tiny_config(*overrides), TRAIN_DATA, str(full), vocab_file=TRAIN_VOCAB, progress=False)

    part = tmp_path / "part"
    train(tiny_config(*overrides[1:], "train.max_steps=7"), TRAIN_DATA, str(part),
          vocab_file=TRAIN_VOCAB, progress=False)
    # The stop at 7 checkpoints at 5 and 7; truncate step 7 on disk: resume must fall back to 5.
    ckpts = list_checkpoints(str(part / "checkpoints"))
    assert [os.path.basename(p) for p in ckpts] == ["step-00000005.pt", "step-00000007.pt"]
    with open(ckpts[-1], "r+b") as f:
        f.truncate(os.path.getsize(ckpts[-1]) // 2)
    with pytest.warns(UserWarning, match="step-00000007.pt: unreadable checkpoint"):
        train(tiny_config(*overrides), TRAIN_DATA, str(part), resume=True, vocab_file=TRAIN_VOCAB, progress=False)

    a, b = _params(full), _params(part)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key
    losses = lambda run: {r["step"]: r["loss"] for r in map(json.loads, open(run / "metrics.jsonl"))}
    full_losses, part_losses = losses(full), losses(part)
    for step in range(6, 13):
        assert part_losses[step] == pytest.approx(full_losses[step], abs=1e-6), step


def test_resume_with_another_batch_size_or_unroll_restarts_the_data_not_the_model(tmp_path):
    """--resume after changing train.batch_size (a bigger GPU) or unroll_steps: the saved data positions
    and LSTM states belong to another reader and shape; the model and optimizer resume, the data and
    states start afresh, and the run says so (it used to stop on "state_dict key 'config.batch_size'")."""
    overrides = ("train.checkpoint_every_steps=3", "train.seed=2", "train.log_every_steps=1")
    train(tiny_config(*overrides, "train.max_steps=3"), TRAIN_DATA, str(tmp_path), vocab_file=TRAIN_VOCAB,
          progress=False)
    before = _params(tmp_path)
    batch = tiny_config().train.batch_size
    with pytest.warns(UserWarning, match=rf"the data reader changed \(batch_size {batch} -> {batch * 2}\): model "
                                         "and optimizer resume, data order and LSTM states start afresh"):
        summary = train(tiny_config(*overrides, "train.max_steps=5", f"train.batch_size={batch * 2}"), TRAIN_DATA,
                        str(tmp_path), resume=True, vocab_file=TRAIN_VOCAB, progress=False)
    assert summary["step"] == 5
    steps = [r["step"] for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5]
    resumed = load_checkpoint(list_checkpoints(str(tmp_path / "checkpoints"))[0])["model"]
    assert all(torch.equal(before[k], resumed[k]) for k in before)  # step 3 kept; 4 and 5 trained on
    assert not all(torch.equal(before[k], v) for k, v in _params(tmp_path).items())
    with pytest.warns(UserWarning, match=r"unroll_steps .* -> 7"):
        train(tiny_config(*overrides, "train.max_steps=6", f"train.batch_size={batch * 2}", "train.unroll_steps=7"),
              TRAIN_DATA, str(tmp_path), resume=True, vocab_file=TRAIN_VOCAB, progress=False)


def test_a_checkpoint_with_a_damaged_rank_state_is_refused_or_restarts_the_data(tmp_path):
    """rank_states come from a file someone handed over: a rank state that is no mapping is one error; a
    data state whose config is no mapping starts the data afresh (it matches no reader)."""
    from bilm.runs.checkpoint import CheckpointError, save_checkpoint

    train(tiny_config("train.max_steps=2"), TRAIN_DATA, str(tmp_path), vocab_file=TRAIN_VOCAB, progress=False)
    path = list_checkpoints(str(tmp_path / "checkpoints"))[-1]
    payload = {k: v for k, v in load_checkpoint(path).items() if k != "format"}
    payload["rank_states"][0]["data"]["config"] = "not a mapping"
    save_checkpoint(payload, path)
    with pytest.warns(UserWarning, match=r"the data reader changed \(reader None -> 0; .*start afresh"):
        assert train(tiny_config("train.max_steps=3"), TRAIN_DATA, str(tmp_path), resume=True,
                     vocab_file=TRAIN_VOCAB, progress=False)["step"] == 3
    path = list_checkpoints(str(tmp_path / "checkpoints"))[-1]
    payload = {k: v for k, v in load_checkpoint(path).items() if k != "format"}
    payload["rank_states"] = ["not a mapping"]
    save_checkpoint(payload, path)
    with pytest.raises(CheckpointError, match=r"rank_states\[0\] must be a mapping, got str"):
        train(tiny_config("train.max_steps=4"), TRAIN_DATA, str(tmp_path), resume=True, vocab_file=TRAIN_VOCAB,
              progress=False)


@pytest.mark.parametrize("optimizer", ["adagrad", "adam"])  # adam + sparse softmax: two optimizers
def test_resume_keeps_neither_a_copy_nor_a_mapping_of_the_checkpoint(tmp_path, monkeypatch, optimizer):
    """Resuming maps the checkpoint file; once restored, the run holds neither the payload's weights
    (a second copy of the model for the whole run: 1.9 GiB at 793k words) nor the mapping (which
    would also keep a pruned checkpoint's disk space)."""
    import gc
    import weakref

    import bilm.training.checkpointer as checkpointer_module
    import bilm.training.run as bilm_train

    overrides = ("train.checkpoint_every_steps=2", "train.log_every_steps=1", f"optim.name={optimizer}")
    run = tmp_path / "run"
    train(tiny_config(*overrides, "train.max_steps=2"), TRAIN_DATA, str(run), vocab_file=TRAIN_VOCAB, progress=False)
    payload_tensors, at_first_step = [], []
    load, step = checkpointer_module.load_latest_valid, bilm_train.TrainStep.step

    def load_and_watch(*args, **kwargs):
        path, payload = load(*args, **kwargs)
        payload_tensors.extend(weakref.ref(t) for t in payload["model"].values())
        return path, payload

    def step_and_look(self, batch):
        if not at_first_step:
            gc.collect()
            with open("/proc/self/maps", encoding="utf-8") as f:
                mapped = [line.strip() for line in f if "step-00000002.pt" in line]
            at_first_step.append((sum(ref() is not None for ref in payload_tensors), mapped))
        return step(self, batch)

    monkeypatch.setattr(checkpointer_module, "load_latest_valid", load_and_watch)
    monkeypatch.setattr(bilm_train.TrainStep, "step", step_and_look)
    train(tiny_config(*overrides, "train.max_steps=3"), TRAIN_DATA, str(run), resume=True, vocab_file=TRAIN_VOCAB,
          progress=False)
    assert payload_tensors and at_first_step == [(0, [])]


def test_checkpoint_holds_config_and_states(tmp_path):
    train(tiny_config("train.max_steps=2"), TRAIN_DATA, str(tmp_path), vocab_file=TRAIN_VOCAB, progress=False)
    payload = load_checkpoint(list_checkpoints(str(tmp_path / "checkpoints"))[-1])
    assert payload["config"]["train"]["batch_size"] == 2
    assert payload["rank_states"][0]["lstm_state"]["forward"][0][0].shape == (2, 8)
    assert payload["rank_states"][0]["data"] is not None
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "metrics.jsonl").exists()


def test_sigterm_writes_checkpoint_and_exits(tmp_path):
    script = (
        "import os, signal, sys; sys.path.insert(0, %r)\n"
        "import bilm.training.run as t\n"
        "from train_helpers import tiny_config, TRAIN_DATA, TRAIN_VOCAB\n"
        "orig = t.TrainStep.step\n"
        "def step(self, batch):\n"
        "    r = orig(self, batch)\n"
        "    if not hasattr(self, 'n'): self.n = 0\n"
        "    self.n += 1\n"
        "    if self.n == 3: os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return r\n"
        "t.TrainStep.step = step\n"
        "s = t.train(tiny_config('train.max_steps=50'), TRAIN_DATA, %r, vocab_file=TRAIN_VOCAB, progress=False)\n"
        "print('STOPPED AT', s['step'])\n" % (os.path.dirname(__file__), str(tmp_path)))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "STOPPED AT 3" in out.stdout
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path / "checkpoints"))] == ["step-00000003.pt"]


def test_learning_rate_warmup_ramps_and_resumes(tmp_path):
    overrides = ("optim.warmup_steps=4", "train.log_every_steps=1", "train.checkpoint_every_steps=2", "train.seed=2")
    lrs = lambda run: [r["lr"] for r in map(json.loads, open(run / "metrics.jsonl"))]
    full = tmp_path / "full"
    train(tiny_config(*overrides, "train.max_steps=6"), TRAIN_DATA, str(full), vocab_file=TRAIN_VOCAB, progress=False)
    assert lrs(full) == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.2, 0.2])
    part = tmp_path / "part"
    train(tiny_config(*overrides, "train.max_steps=2"), TRAIN_DATA, str(part), vocab_file=TRAIN_VOCAB, progress=False)
    train(tiny_config(*overrides, "train.max_steps=6"), TRAIN_DATA, str(part), resume=True, vocab_file=TRAIN_VOCAB,
          progress=False)
    assert lrs(part) == pytest.approx(lrs(full))


def test_linear_decay_reaches_zero_at_the_last_step_and_resumes(tmp_path):
    overrides = ("optim.decay=linear", "optim.warmup_steps=2", "train.log_every_steps=1",
                 "train.checkpoint_every_steps=2", "train.seed=2")
    lrs = lambda run: [r["lr"] for r in map(json.loads, open(run / "metrics.jsonl"))]
    full = tmp_path / "full"
    train(tiny_config(*overrides, "train.max_steps=4"), TRAIN_DATA, str(full), vocab_file=TRAIN_VOCAB, progress=False)
    # step k (from 0) trains at lr x min(1, (k + 1) / warmup) x (1 - k / 4): the last step at a quarter
    assert lrs(full) == pytest.approx([0.1, 0.15, 0.1, 0.05])
    # Cut off after step 2: resuming from step 2's checkpoint trains steps 3-4 at the same rates.
    part = tmp_path / "part"
    shutil.copytree(full, part)
    os.remove(list_checkpoints(str(part / "checkpoints"))[-1])
    train(tiny_config(*overrides, "train.max_steps=4"), TRAIN_DATA, str(part), resume=True, vocab_file=TRAIN_VOCAB,
          progress=False)
    assert lrs(part) == pytest.approx(lrs(full))


def test_resumes_a_checkpoint_that_names_the_fused_lstm_exact(tmp_path):
    """Checkpoints written before the fused LSTM path was renamed say lstm_impl 'exact': they resume."""
    from bilm.runs.checkpoint import save_checkpoint

    train(tiny_config("train.max_steps=2"), TRAIN_DATA, str(tmp_path), vocab_file=TRAIN_VOCAB, progress=False)
    path = list_checkpoints(str(tmp_path / "checkpoints"))[-1]
    payload = load_checkpoint(path)
    assert payload["config"]["train"]["lstm_impl"] == "fused"
    payload["config"]["train"]["lstm_impl"] = "exact"
    save_checkpoint({k: v for k, v in payload.items() if k != "format"}, path)
    summary = train(tiny_config("train.max_steps=3"), TRAIN_DATA, str(tmp_path), resume=True, vocab_file=TRAIN_VOCAB,
                    progress=False)
    assert summary["step"] == 3
