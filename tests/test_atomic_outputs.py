"""Every command's output appears whole or not at all: ``kill -9`` at several points of ``embed``,
``dump-token-embeddings``, ``export``, ``prepare`` and ``import-bilm-tf`` leaves the previous file or
none at the final path, never a truncated one, and the next run cleans up and succeeds."""
from __future__ import annotations

import filecmp
import os
import signal
import subprocess
import sys

import h5py
import pytest

from bilm.runs.checkpoint import load_checkpoint
from bilm.runs.run_dir import list_checkpoints
from bilm.cli import main as bilm_main
from bilm.data.manifest import load_manifest
from bilm.training.run import train
from conftest import OPTIONS, WEIGHTS
from train_helpers import ROOT, TRAIN_DATA, TRAIN_VOCAB, tiny_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
BILMTF = os.path.join(ROOT, "tests", "fixtures", "bilmtf_training")

# The CLI, dying (SIGKILL) at the N-th call of one function: KILL_AT="module.Class.function:N[:after]"
# kills just before that call, or with ":after" just after it returns.
CLI_THAT_DIES = """
import importlib, os, signal, sys
spec = os.environ["KILL_AT"].split(":")
parts, nth, after = spec[0].split("."), int(spec[1]), spec[2:] == ["after"]
for i in range(len(parts) - 1, 0, -1):
    try:
        owner = importlib.import_module(".".join(parts[:i]))
        break
    except ImportError:
        pass
for name in parts[i:-1]:
    owner = getattr(owner, name)
real, calls = getattr(owner, parts[-1]), [0]
def dying(*args, **kwargs):
    calls[0] += 1
    if calls[0] == nth and not after:
        os.kill(os.getpid(), signal.SIGKILL)
    result = real(*args, **kwargs)
    if calls[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return result
setattr(owner, parts[-1], dying)
from bilm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run(argv, kill_at=None):
    """The command, killed at ``kill_at`` (a subprocess), or run to completion (in this process)."""
    if not kill_at:
        assert bilm_main([str(a) for a in argv]) == 0
        return
    proc = subprocess.run([sys.executable, "-c", CLI_THAT_DIES, *map(str, argv)], env={**ENV, "KILL_AT": kill_at},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"{kill_at} was never reached: {proc.stderr[-2000:]}"


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


def _no_temporaries(directory):
    return not [n for n in os.listdir(directory) if ".tmp" in n]


@pytest.fixture(scope="module")
def sentences(tmp_path_factory):
    d = tmp_path_factory.mktemp("sentences")
    (d / "a.txt").write_text("the cat sat\non the mat\n" * 6)
    (d / "b.txt").write_text("a dog ran\n" * 9)
    return d


def test_embed(tmp_path, sentences):
    out = tmp_path / "vectors.hdf5"
    embed = ["embed", "--options", OPTIONS, "--weights", WEIGHTS, "--out", out, "--force"]
    _run([*embed, "--input", sentences / "b.txt"], "h5py.Group.create_dataset:3")  # mid-file
    assert not out.exists()  # none rather than part of one
    _run([*embed, "--input", sentences / "a.txt"])
    previous = _bytes(out)
    _run([*embed, "--input", sentences / "b.txt"], "os.fsync:1")  # complete, not yet renamed
    assert _bytes(out) == previous  # the previous file, whole
    _run([*embed, "--input", sentences / "b.txt"])
    with h5py.File(out) as f:
        assert len(f) == 10  # nine sentences and the index
    assert _no_temporaries(tmp_path)  # the killed runs' temporaries removed by the next


def test_dump_token_embeddings(tmp_path):
    out = tmp_path / "tokens.hdf5"
    dump = ["dump-token-embeddings", "--vocab", TRAIN_VOCAB, "--options", OPTIONS, "--weights", WEIGHTS, "--out",
            out, "--batch-size", "8"]
    _run(dump, "h5py.Dataset.__setitem__:2")  # after the first batch
    assert not out.exists()
    _run(dump)
    previous = _bytes(out)
    fewer = tmp_path / "vocab.txt"
    fewer.write_text("".join(open(TRAIN_VOCAB).readlines()[:20]))
    _run([*dump[:2], fewer, *dump[3:]], "os.replace:1")
    assert _bytes(out) == previous
    _run(dump)
    assert _no_temporaries(tmp_path)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    train(tiny_config("train.max_steps=2", "train.checkpoint_every_steps=1"), TRAIN_DATA, str(run),
          vocab_file=TRAIN_VOCAB, progress=False)
    return list_checkpoints(str(run / "checkpoints"))


# Export writes its staging directory, then moves weights.hdf5, vocab.txt and options.json (os.replace
# 1, 2, 3), an old options.json removed first.
@pytest.mark.parametrize("kill_at", ["h5py.Group.create_dataset:3", "os.replace:2", "os.replace:3"])
def test_export(tmp_path, two_checkpoints, kill_at):
    first, second = two_checkpoints
    out, reference = tmp_path / "export", tmp_path / "reference"
    _run(["export", "--checkpoint", second, "--out", reference])
    _run(["export", "--checkpoint", first, "--out", out])
    previous = {n: _bytes(out / n) for n in os.listdir(out)}
    assert _bytes(out / "weights.hdf5") != _bytes(reference / "weights.hdf5")
    _run(["export", "--checkpoint", second, "--out", out, "--force"], kill_at)
    names = sorted(n for n in os.listdir(out) if not n.startswith("."))
    if "options.json" in names:  # loadable: then entirely the previous export or entirely the new one
        assert names == sorted(previous)
        assert all(_bytes(out / n) == previous[n] for n in names) or \
            all(filecmp.cmp(out / n, reference / n, shallow=False) for n in names), kill_at
    else:
        assert kill_at.startswith("os.replace"), "the previous export was lost before the new one was complete"
    _run(["export", "--checkpoint", second, "--out", out, "--force"])
    assert all(filecmp.cmp(out / n, reference / n, shallow=False) for n in os.listdir(reference))
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference))  # the killed run's staging directory is gone


# prepare --force (one worker process): mid-shards, at vocab.txt's rename, at the manifest's rename.
@pytest.mark.parametrize("kill_at", ["data_tools.shuffle.ShardWriter.write:1", "os.replace:3"])
def test_prepare(tmp_path, sentences, kill_at, capsys):
    out = tmp_path / "data"
    prepare = ["prepare", "--out", out, "--workers", "1", "--no-progress", "--heldout-fraction", "0"]
    _run([*prepare, sentences / "a.txt"])
    _run([*prepare, sentences / "b.txt", "--force"], kill_at)
    # No manifest (the previous one is the first thing --force removes): nothing that loads as a corpus,
    # and no vocab.txt but a whole one.
    assert not (out / "manifest.json").exists()
    assert not (out / "vocab.txt").exists() or _bytes(out / "vocab.txt").endswith(b"\n")
    capsys.readouterr()
    _run([*prepare, sentences / "b.txt"])  # no --force needed to replace a killed run's leftovers
    assert "interrupted bilm prepare" in capsys.readouterr().err
    manifest = load_manifest(str(out / "manifest.json"))
    assert manifest["n_train_sentences"] == 9 and _no_temporaries(out)


def test_import_bilm_tf(tmp_path):
    out = tmp_path / "run"
    imported = ["import-bilm-tf", "--tf-save-dir", os.path.join(BILMTF, "tf_checkpoint"), "--vocab",
                os.path.join(BILMTF, "vocab.txt"), "--out", out]
    _run(imported, "torch.save:1:after")  # the checkpoint's bytes written, not yet renamed
    assert list_checkpoints(str(out / "checkpoints")) == []  # the checkpoint is whole or absent
    _run(imported)
    load_checkpoint(list_checkpoints(str(out / "checkpoints"))[-1])
    assert _no_temporaries(out / "checkpoints")
