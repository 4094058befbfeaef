"""Checkpoints are untrusted input: read with the safe unpickler, a crafted one refused without
running anything, the older format converted only on request, and a resume that would continue
another model refused."""
from __future__ import annotations

import logging
import os
import pickle
import random
import shutil

import numpy as np
import pytest
import torch

from bilm.runs.checkpoint import CheckpointError, CheckpointRefused, FORMAT, OLD_FORMAT, load_checkpoint, save_checkpoint
from bilm.runs.resume import check_resume
from bilm.runs.run_dir import list_checkpoints
from bilm.cli import main as bilm_main
from bilm.training.run import train
from bilm.training.step import rng_state, set_rng_state
from bilm.core.text import TextPipeline
from train_helpers import TRAIN_DATA, TRAIN_VOCAB, tiny_config
from test_faults import _assert_same_run, _train_args


class _RunsCode:
    """Unpickling this calls ``exec``: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


class _RunsShell:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def run2(tmp_path_factory):
    """A run of 2 steps, a checkpoint at each."""
    run = tmp_path_factory.mktemp("run2")
    train(tiny_config("train.max_steps=2", "train.checkpoint_every_steps=1", "train.seed=3"), TRAIN_DATA, str(run),
          vocab_file=TRAIN_VOCAB, progress=False)
    return run


def _one_line(capsys):
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith("note:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("kind", ["torch.save zip, exec", "plain pickle, os.system"])
def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path, run2, capsys, kind):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    shutil.copytree(run2, run)
    evil = run / "checkpoints" / "step-00000009.pt"  # the newest: what --resume, evaluate and export pick
    payload = {"format": FORMAT, "step": 9, "config": {}, "model": {}}
    if kind.startswith("torch"):
        torch.save({**payload, "x": _RunsCode(marker)}, evil)
    else:
        with open(evil, "wb") as f:
            pickle.dump({**payload, "x": _RunsShell(marker)}, f)
    commands = [["evaluate", "--checkpoint", run, "--data", TRAIN_DATA],
                ["export", "--checkpoint", evil, "--out", tmp_path / "export"],
                _train_args(run, "train.max_steps=3", fast=False) + ["--resume"]]
    for argv in commands:
        assert bilm_main([str(a) for a in argv]) == 1
        line = _one_line(capsys)
        assert str(evil) in line and "refused" in line and "could run code" in line, line
        assert not marker.exists()
    assert evil.exists() and not (run / "checkpoints" / "step-00000009.pt.corrupt").exists()  # not set aside
    assert not (tmp_path / "export").exists() or not os.listdir(tmp_path / "export")
    with pytest.raises(CheckpointRefused):
        load_checkpoint(str(evil))
    assert not marker.exists()


def _as_format_1(path):
    """Rewrite a checkpoint as bilm wrote it before the safe loader: numpy RNG states, format 1."""
    payload = load_checkpoint(path)
    for rank_state in payload["rank_states"]:
        plain = rank_state["rng"]["numpy"]
        rank_state["rng"]["numpy"] = (plain["bit_generator"], plain["keys"].numpy().astype(np.uint32), plain["pos"],
                                      plain["has_gauss"], plain["cached_gaussian"])
    payload["format"] = OLD_FORMAT
    torch.save(payload, path)


def test_format_1_is_refused_with_the_command_that_converts_it_and_then_resumes_exactly(tmp_path, capsys):
    args = ("train.max_steps=6", "train.checkpoint_every_steps=3", "train.log_every_steps=1", "train.seed=7")
    full, part = tmp_path / "full", tmp_path / "part"
    assert bilm_main(_train_args(full, *args, fast=False)) == 0
    assert bilm_main(_train_args(part, *args[1:], "train.max_steps=3", fast=False)) == 0
    newest = list_checkpoints(str(part / "checkpoints"))[-1]
    _as_format_1(newest)
    capsys.readouterr()

    assert bilm_main(_train_args(part, *args, fast=False) + ["--resume"]) == 1
    line = _one_line(capsys)
    assert newest in line and f"bilm convert-checkpoint {newest}" in line, line
    assert os.path.exists(newest)  # neither set aside nor replaced by an older one

    assert bilm_main(["convert-checkpoint", str(part)]) == 0
    assert load_checkpoint(newest)["format"] == FORMAT
    assert bilm_main(_train_args(part, *args, fast=False) + ["--resume"]) == 0
    _assert_same_run(full, part)


def test_rng_states_round_trip_exactly_through_a_checkpoint(tmp_path):
    random.seed(11)
    np.random.seed(12)
    np.random.normal()  # numpy then holds a cached gaussian: part of its state
    torch.manual_seed(13)
    path = str(tmp_path / "step-00000001.pt")
    save_checkpoint({"step": 1, "config": {}, "model": {}, "rng": rng_state()}, path)
    expected = (random.random(), np.random.normal(), np.random.randint(1 << 30), torch.rand(3))
    set_rng_state(load_checkpoint(path)["rng"])
    got = (random.random(), np.random.normal(), np.random.randint(1 << 30), torch.rand(3))
    assert expected[:3] == got[:3] and torch.equal(expected[3], got[3])


def test_a_payload_the_safe_loader_could_not_read_is_never_written(tmp_path):
    with pytest.raises(TypeError, match="numpy.ndarray"):
        save_checkpoint({"step": 1, "config": {}, "model": {}, "x": np.zeros(3)}, str(tmp_path / "step-1.pt"))
    assert not os.listdir(tmp_path)


# ----- resume refuses another model -----

def test_resume_refuses_another_architecture_or_vocabulary(tmp_path, run2, capsys):
    run = tmp_path / "run"
    shutil.copytree(run2, run)
    before = {p: open(p, "rb").read() for p in list_checkpoints(str(run / "checkpoints"))}
    seed = ("train.seed=3", "train.max_steps=4")
    assert bilm_main(_train_args(run, *seed, "model.lstm.dim=32", fast=False) + ["--resume"]) == 1
    line = _one_line(capsys)
    assert "cannot resume a different model" in line and "model.lstm.dim: checkpoint 16 vs this run 32" in line, line

    vocab = tmp_path / "vocab.txt"
    vocab.write_text(open(TRAIN_VOCAB).read() + "zebra\n")
    argv = _train_args(run, *seed, fast=False) + ["--resume"]
    argv[argv.index("--vocab") + 1] = str(vocab)
    assert bilm_main(argv) == 1
    line = _one_line(capsys)
    assert "vocabulary: checkpoint" in line and str(vocab) in line and "first difference at line" in line, line
    assert {p: open(p, "rb").read() for p in list_checkpoints(str(run / "checkpoints"))} == before


def test_resume_accepts_changed_settings_and_logs_them_once(tmp_path, run2):
    run = tmp_path / "run"
    shutil.copytree(run2, run)
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("bilm").addHandler(handler)
    try:
        assert bilm_main(_train_args(run, "train.seed=3", "train.max_steps=3", "optim.lr=0.1",
                                     "train.keep_checkpoints=5", fast=False) + ["--resume"]) == 0
    finally:
        logging.getLogger("bilm").removeHandler(handler)
    changed = [m for m in messages if m.startswith("settings changed since")]
    assert len(changed) == 1, messages
    assert "optim.lr: 0.2 -> 0.1" in changed[0] and "train.max_steps: 2 -> 3" in changed[0]
    assert "train.keep_checkpoints: 2 -> 5" in changed[0]


def test_resume_refuses_another_text_pipeline():
    cfg = tiny_config()
    from bilm.runs.config import config_to_dict
    payload = {"config": config_to_dict(cfg), "vocab": ["<S>", "</S>", "<UNK>"],
               "text_pipeline": TextPipeline("whitespace", nfkc=False).to_state()}
    ours = config_to_dict(cfg)
    assert check_resume(payload, "ck.pt", ours, payload["vocab"], "v.txt", TextPipeline().to_state()) == []
    with pytest.raises(CheckpointError, match=r"ck.pt: .*text_pipeline.nfkc: checkpoint False vs this run True"):
        check_resume(payload, "ck.pt", ours, payload["vocab"], "v.txt", TextPipeline(nfkc=True).to_state())
    # Not recorded on either side (an imported bilm-tf run, shards given as a glob): nothing to compare.
    assert check_resume({**payload, "text_pipeline": None}, "ck.pt", ours, payload["vocab"], "v.txt",
                        TextPipeline(nfkc=True).to_state()) == []
    changed = {**ours, "optim": {**ours["optim"], "name": "adam"}}
    with pytest.raises(CheckpointError, match="optim.name: checkpoint 'adagrad' vs this run 'adam'"):
        check_resume(payload, "ck.pt", changed, payload["vocab"], "v.txt", None)


def test_deepspeed_state_that_would_run_code_is_refused_before_deepspeed_reads_it(tmp_path):
    from bilm.runs.checkpoint import check_deepspeed_state
    marker = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": {"state": {}, "step": torch.tensor(1.0)}}, tmp_path / "optim_states.pt")
    check_deepspeed_state(str(tmp_path))  # plain state passes
    torch.save({"x": _RunsShell(marker)}, tmp_path / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointRefused, match=r"mp_rank_00_model_states.pt: refused: .*posix.system"):
        check_deepspeed_state(str(tmp_path))
    assert not marker.exists()


@pytest.mark.parametrize("key, value, says", [
    ("step", "12", "'step' must be int, got str"),
    ("step", True, "'step' must be int, got bool"),
    ("step", -1, "out of range"),
    ("rank_states", "abc", "'rank_states' must be list or null, got str"),
    ("rank_states", [{}], "1 rank states for world_size 2"),
    ("vocab", ["<S>", 7], "'vocab' must be a list of strings"),
    ("optimizer", [1, 2], "'optimizer' must be dict or null, got list"),
    ("metrics_bytes", 1.5, "'metrics_bytes' must be int or null, got float"),
])
def test_a_payload_off_the_schema_is_refused_on_loading_naming_the_key(tmp_path, run2, capsys, key, value, says):
    """Every key is checked against PAYLOAD_SCHEMA when the file is read, before any reader uses it;
    through the CLI, one line."""
    payload = load_checkpoint(str(list_checkpoints(str(run2 / "checkpoints"))[-1]))
    assert payload["world_size"] == 1  # what the cases above assume of the run
    payload = {**payload, "world_size": 2, "rank_states": [{}, {}], key: value}
    run = tmp_path / "run"
    shutil.copytree(run2, run)
    path = list_checkpoints(str(run / "checkpoints"))[-1]
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=f"{os.path.basename(path)}: checkpoint .*{says}"):
        load_checkpoint(path)
    assert bilm_main(["export", "--checkpoint", path, "--out", str(tmp_path / "export")]) != 0
    assert says in _one_line(capsys)
