"""Continue a bilm-tf training checkpoint in bilm (bilm/commands/continue_tf.py): by name from a loopback server
(as the published checkpoint would be), or from a local save_dir; the softmax rows of the words it
knows and their Adagrad accumulators carried bit for bit, new words by a rule, --keep-vocab, resume.

The checkpoint is tests/fixtures/bilmtf_training/tf_checkpoint: written by bilm-tf's own train()
(one Adagrad step, so its accumulators are no longer the initial 1.0)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from bilm.modules import published
from bilm.formats.bilmtf import latest_tf_checkpoint, read_tf_checkpoint, split_tensors
from bilm.runs.checkpoint import load_checkpoint
from bilm.runs.run_dir import list_checkpoints
from bilm.cli import main as bilm_main
from bilm.commands.continue_tf import TFStart, report_line
from bilm.core.vocab import read_tokens
from test_faults import CLI_THAT_DIES_IN_A_WRITE
from test_published import _Server
from train_helpers import ROOT, TINY, TRAIN_DATA, TRAIN_VOCAB

SAVE_DIR = os.path.join(ROOT, "tests", "fixtures", "bilmtf_training", "tf_checkpoint")
TF_VOCAB = os.path.join(ROOT, "tests", "fixtures", "bilmtf_training", "vocab.txt")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def _checkpoint() -> tuple[dict, dict, list[str]]:
    weights, accumulators, _ = split_tensors(read_tf_checkpoint(latest_tf_checkpoint(SAVE_DIR)))
    return weights, accumulators, read_tokens(TF_VOCAB)


def _train_args(out, *extra, steps: int = 1):
    return ["train", "--config", TINY, "--data", TRAIN_DATA, "--vocab", TRAIN_VOCAB, "--out", str(out),
            "--no-progress", "--set", f"train.max_steps={steps}", "--set", "train.device=cpu",
            "--set", "train.checkpoint_every_steps=1", "--set", "train.log_every_steps=1",
            "--set", "train.batch_size=2", *extra]


@pytest.fixture
def server(tmp_path, monkeypatch):
    """The fixture save_dir and its vocab on a loopback server, registered as 'fixture-tf'."""
    files = {f"/ckpt/{name}": open(os.path.join(SAVE_DIR, name), "rb").read() for name in os.listdir(SAVE_DIR)}
    files["/vocab.txt"] = open(TF_VOCAB, "rb").read()
    files["/short-vocab.txt"] = b"<S>\n</S>\n<UNK>\nthe\n"
    srv = _Server(files)
    monkeypatch.setenv("BILM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("BILM_OFFLINE", raising=False)
    monkeypatch.setattr(published, "TF_CHECKPOINTS", dict(published.TF_CHECKPOINTS))
    names = tuple(sorted(os.listdir(SAVE_DIR)))
    published.register_tf_checkpoint(published.PublishedTFCheckpoint("fixture-tf", f"{srv.url}/ckpt", names,
                                                                     f"{srv.url}/vocab.txt"))
    published.register_tf_checkpoint(published.PublishedTFCheckpoint("wrong-vocab-tf", f"{srv.url}/ckpt", names,
                                                                      f"{srv.url}/short-vocab.txt"))
    yield srv
    srv.close()


def test_by_name_downloads_once_and_carries_the_rows_bit_for_bit(server, tmp_path, capsys, monkeypatch):
    weights, accumulators, old_tokens = _checkpoint()
    started = {}
    load_into = TFStart.load_into

    def watch(self, model, optimizer, tokens, **kw):  # the state the run starts from, before its first step
        report = load_into(self, model, optimizer, tokens, **kw)
        started.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        started["sum"] = optimizer.state[model.softmax.weight]["sum"].clone()
        return report

    monkeypatch.setattr(TFStart, "load_into", watch)
    run = tmp_path / "run"
    assert bilm_main(_train_args(run, "--init-model", "fixture-tf")) == 0
    n_requests = len(server.requests)
    assert n_requests == len(os.listdir(SAVE_DIR)) + 1
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if "softmax rows" in line]
    assert len(lines) == 1 and "11 from the checkpoint, 21 new (rule: unk)" in lines[0], lines
    tokens = load_checkpoint(list_checkpoints(str(run / "checkpoints"))[-1])["vocab"]
    assert tokens == read_tokens(TRAIN_VOCAB)
    row_of = {t: i for i, t in enumerate(old_tokens)}
    carried = [i for i, t in enumerate(tokens) if t in row_of]
    assert len(carried) == 11
    for i in carried:
        old = row_of[tokens[i]]
        assert np.array_equal(started["softmax.weight"][i].numpy(), weights["softmax/W"][old]), tokens[i]
        assert started["softmax.bias"][i].item() == weights["softmax/b"][old]
        assert np.array_equal(started["sum"][i].numpy(), accumulators["softmax/W"][old]), tokens[i]
    # The char CNN and LSTMs are the checkpoint's too (char_embed: our row 0 is the padding row).
    assert np.array_equal(started["bilm.token_encoder.char_embedding.weight"][1:].numpy(), weights["char_embed"])
    # The second run uses the cache: no request.
    assert bilm_main(_train_args(tmp_path / "run2", "--init-model", "fixture-tf")) == 0
    assert len(server.requests) == n_requests


def test_carried_accumulators_equal_the_checkpoints_new_rows_start_fresh():
    from bilm.runs.config import load_config
    from bilm.core.distributed import DistEnv
    from bilm.core.options import BiLMOptions
    from bilm.training.step import TrainStep

    weights, accumulators, old_tokens = _checkpoint()
    tokens = read_tokens(TRAIN_VOCAB)
    cfg = load_config(TINY, ["train.device=cpu"])
    cfg.model = BiLMOptions.from_file(os.path.join(SAVE_DIR, "options.json"))
    results = {}
    for rule in ("char", "mean", "unk", "fresh"):
        trainer = TrainStep(cfg, len(tokens), DistEnv())
        report = TFStart(SAVE_DIR, TF_VOCAB, new_rows=rule).load_into(trainer.model, trainer.optimizer, tokens)
        assert (report["carried"], report["new"], report["dropped"], report["accumulators"]) == (11, 21, 22, True)
        softmax = trainer.model.softmax
        sums = trainer.optimizer.state[softmax.weight]["sum"]
        bias_sums = trainer.optimizer.state[softmax.bias]["sum"]
        row_of = {t: i for i, t in enumerate(old_tokens)}
        new = [i for i, t in enumerate(tokens) if t not in row_of]
        for i, t in enumerate(tokens):
            if t in row_of:
                assert np.array_equal(sums[i].numpy(), accumulators["softmax/W"][row_of[t]]), t
                assert bias_sums[i].item() == accumulators["softmax/b"][row_of[t]]
        assert torch.all(sums[new] == 1.0) and torch.all(bias_sums[new] == 1.0)
        assert float(accumulators["softmax/W"].max()) > 1.0  # the carried ones are not all 1.0
        results[rule] = softmax.weight.detach()[new].clone(), softmax.bias.detach()[new].clone()
    w, b = weights["softmax/W"], weights["softmax/b"]
    assert torch.allclose(results["mean"][0], torch.from_numpy(w.mean(axis=0)).expand(len(new), -1), atol=1e-6)
    unk = old_tokens.index("<UNK>")
    assert torch.equal(results["unk"][0], torch.from_numpy(w[unk]).expand(len(new), -1))
    assert torch.allclose(results["unk"][1], torch.full((len(new),), float(b[unk]) - np.log(len(new) + 1)))
    char_w = results["char"][0]
    assert len({tuple(row.tolist()) for row in char_w}) == len(new)  # one row a word, from its characters
    assert not torch.equal(results["fresh"][0], results["char"][0])
    assert "11 from the checkpoint, 21 new (rule: char)" in report_line({**report, "rule": "char"})


def test_keep_vocab_trains_with_the_checkpoints_words(tmp_path, monkeypatch):
    weights, accumulators, old_tokens = _checkpoint()
    reports = []
    load_into = TFStart.load_into
    monkeypatch.setattr(TFStart, "load_into", lambda self, *a, **kw: reports.append(load_into(self, *a, **kw))
                        or reports[-1])
    run = tmp_path / "run"
    assert bilm_main(_train_args(run, "--init-model", SAVE_DIR, "--init-vocab", TF_VOCAB, "--keep-vocab")) == 0
    assert (reports[0]["carried"], reports[0]["new"], reports[0]["dropped"]) == (33, 0, 0)
    ckpt = load_checkpoint(list_checkpoints(str(run / "checkpoints"))[-1])
    assert ckpt["vocab"] == old_tokens  # the fixture's vocab is already in bilm's order
    # The published vocabulary starts </S>, <S>: the run's starts <S>, </S>, rows follow their words.
    swapped = tmp_path / "swapped.txt"
    swapped.write_text("\n".join([old_tokens[1], old_tokens[0], *old_tokens[2:]]) + "\n")
    from bilm.modules.language_model import LanguageModel
    from bilm.core.options import BiLMOptions
    start = TFStart(SAVE_DIR, str(swapped), keep_vocab=True)
    vocab = start.vocabulary()
    assert vocab.tokens == old_tokens
    model = LanguageModel(BiLMOptions.from_file(start.options_file), len(vocab))
    start.load_into(model, None, vocab.tokens)
    # Row 0 (<S>) is the file's row 1, row 1 (</S>) its row 0.
    w = weights["softmax/W"]
    assert np.array_equal(model.softmax.weight.detach().numpy(), np.concatenate([w[1:2], w[0:1], w[2:]]))


def test_resume_after_a_kill_keeps_the_carried_rows(tmp_path):
    """Killed (SIGKILL) inside its third checkpoint write, resumed: the same weights as a run never
    interrupted, and the resume does not go back to the bilm-tf checkpoint."""
    args = [*_train_args("{out}", "--init-model", SAVE_DIR, "--init-vocab", TF_VOCAB, steps=6), "--resume"]

    def command(out):
        return [sys.executable, "-c", CLI_THAT_DIES_IN_A_WRITE, *[a.format(out=out) for a in args]]

    full, part = tmp_path / "full", tmp_path / "part"
    subprocess.run(command(full), check=True, env=ENV, timeout=300, capture_output=True)
    killed = subprocess.run(command(part), env={**ENV, "KILL_IN_WRITE": "3"}, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert "softmax rows" in killed.stdout.decode()
    done = subprocess.run(command(part), env=ENV, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout and "softmax rows" not in done.stdout
    a = load_checkpoint(list_checkpoints(str(full / "checkpoints"))[-1])
    b = load_checkpoint(list_checkpoints(str(part / "checkpoints"))[-1])
    assert a["step"] == b["step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["sum"], b["optimizer"]["state"][key]["sum"]), key


def test_offline_names_every_missing_url_and_path(server, monkeypatch):
    monkeypatch.setenv("BILM_OFFLINE", "1")
    with pytest.raises(published.ModelUnavailable) as info:
        published.resolve_tf_checkpoint("fixture-tf", progress=False)
    message = str(info.value)
    directory = os.path.join(published.cache_dir(), "fixture-tf")
    for name in os.listdir(SAVE_DIR):
        assert f"{server.url}/ckpt/{name}" in message and os.path.join(directory, name) in message
    assert f"{server.url}/vocab.txt" in message and not server.requests


def test_a_download_that_does_not_fit_is_removed_and_named(server, capsys, tmp_path):
    assert bilm_main(_train_args(tmp_path / "run", "--init-model", "wrong-vocab-tf")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "wrong-vocab-tf" in err and "4 tokens for 33 softmax rows" in err, err
    directory = os.path.join(published.cache_dir(), "wrong-vocab-tf")
    assert not [n for n in os.listdir(directory) if not n.endswith(".lock")]  # every file removed


def test_bad_inputs_give_one_line(tmp_path, capsys):
    def error(*extra):
        assert bilm_main(_train_args(tmp_path / "run", *extra)) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        return err

    assert "--init-vocab" in error("--init-model", SAVE_DIR)
    short = tmp_path / "short.txt"
    short.write_text("<S>\n</S>\n<UNK>\nthe\n")
    err = error("--init-model", SAVE_DIR, "--init-vocab", str(short))
    assert str(short) in err and "33 rows" in err
    assert "go with a bilm-tf checkpoint" in error("--keep-vocab")
    assert "drop --init-vocab" in error("--init-model", "original-tf", "--init-vocab", TF_VOCAB)
    assert "training checkpoint" in published_error("original-tf")


def published_error(name: str) -> str:
    with pytest.raises(ValueError) as info:
        published.resolve_model(name)
    return str(info.value)


def test_the_mapped_reader_equals_the_reader():
    prefix = latest_tf_checkpoint(SAVE_DIR)
    read, mapped = read_tf_checkpoint(prefix), read_tf_checkpoint(prefix, mmap=True)
    assert set(read) == set(mapped)
    for name in read:
        assert read[name].dtype == mapped[name].dtype and np.array_equal(read[name], mapped[name]), name


def test_the_benchmarks_save_dir_writer_round_trips(tmp_path):
    """benchmarks/tf_save_dir.py (stand-ins where TensorFlow is absent) writes what TF's files hold."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from tf_save_dir import write_tf_checkpoint

    tensors = read_tf_checkpoint(latest_tf_checkpoint(SAVE_DIR))
    write_tf_checkpoint(str(tmp_path / "model.ckpt-1"), tensors)
    again = read_tf_checkpoint(str(tmp_path / "model.ckpt-1"), mmap=True)
    assert set(again) == set(tensors)
    for name in tensors:
        assert again[name].shape == tensors[name].shape and np.array_equal(again[name], tensors[name]), name
