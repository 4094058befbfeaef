"""Faults a days-long run meets, injected: kills, a full disk, two runs on one directory, SIGTERM,
a rank dying under torchrun, two nodes, and bad inputs to every command. Each ends in a clear
message (one line, no traceback) with nothing already written lost, and training resumes exactly."""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from bilm.runs.checkpoint import load_checkpoint
from bilm.runs.lock import LOCK_NAME
from bilm.runs.run_dir import list_checkpoints
from bilm.cli import main as bilm_main
from bilm.training.run import train
from conftest import OPTIONS, WEIGHTS
from train_helpers import BILM_TF_TEST_MODEL, ROOT, TRAIN_DATA, TRAIN_VOCAB, assert_same_trained_params, tiny_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def _train_args(out, *overrides):
    args = ["train", "--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--data", TRAIN_DATA, "--vocab",
            TRAIN_VOCAB, "--out", str(out), "--no-progress"]
    for override in (*BILM_TF_TEST_MODEL, *overrides):
        args += ["--set", override]
    return args


def _bilm(*args):
    return [sys.executable, "-m", "bilm.cli", *map(str, args)]


def _final_state(run):
    return load_checkpoint(list_checkpoints(os.path.join(run, "checkpoints"))[-1])


def _losses(run):
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {r["step"]: r["loss"] for r in rows}


def _logged(run):
    path = os.path.join(run, "metrics.jsonl")
    return open(path).read().splitlines() if os.path.exists(path) else []


def _assert_same_run(a, b):
    sa, sb = _final_state(a), _final_state(b)
    assert sa["step"] == sb["step"]
    for key in sa["model"]:
        assert torch.equal(sa["model"][key], sb["model"][key]), key
    assert _losses(a) == _losses(b)


# ----- kill -9 -----

# The CLI, with a way to die inside a checkpoint write: with KILL_IN_WRITE=N the process kills
# itself (SIGKILL) right after the N-th checkpoint's bytes are written, before the file is renamed.
CLI_THAT_DIES_IN_A_WRITE = ("import os, signal, sys, torch\n"
                            "real, writes = torch.save, []\n"
                            "def save(obj, f, *a, **kw):\n"
                            "    real(obj, f, *a, **kw)\n"
                            "    writes.append(1)\n"
                            "    if len(writes) == int(os.environ.get('KILL_IN_WRITE', 0)):\n"
                            "        f.flush()\n"
                            "        os.kill(os.getpid(), signal.SIGKILL)\n"
                            "torch.save = save\n"
                            "from bilm.cli import main\n"
                            "sys.exit(main(sys.argv[1:]))\n")


def test_kill_9_at_random_moments_resumes_bit_exactly(tmp_path):
    """Ten kills: five at random moments from outside, five inside a checkpoint write."""
    args = _train_args("{out}", "train.max_steps=300", "train.checkpoint_every_steps=1", "train.keep_checkpoints=2",
                       "train.log_every_steps=1", "train.seed=5")

    def command(out):
        return [sys.executable, "-c", CLI_THAT_DIES_IN_A_WRITE, *[a.format(out=out) for a in args], "--resume"]

    full, part = tmp_path / "full", tmp_path / "part"
    subprocess.run(command(full), check=True, env=ENV, timeout=300, capture_output=True)
    rng = random.Random(0)
    partial_writes = 0
    for kill in range(10):
        if kill % 2:  # inside the k-th checkpoint write of this run
            proc = subprocess.run(command(part), env={**ENV, "KILL_IN_WRITE": str(rng.randint(1, 20))},
                                  capture_output=True, timeout=300)
            assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
            partial_writes += len([p for p in os.listdir(part / "checkpoints") if ".tmp" in p])
        else:  # at a random moment
            proc = subprocess.Popen(command(part), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(1.0, 3.5))
            assert proc.poll() is None, "the run finished before ten kills: make it longer"
            proc.kill()
            proc.wait()
    assert partial_writes == 5  # each left its partial file behind
    done = subprocess.run(command(part), env=ENV, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not [p for p in os.listdir(part / "checkpoints") if ".tmp" in p]  # removed at the next start
    _assert_same_run(full, part)


# ----- a full disk -----

def test_full_disk_during_checkpoint_write(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    args = _train_args(run, "train.max_steps=10", "train.checkpoint_every_steps=5", "train.seed=4")
    real_save = torch.save
    calls = []

    def save_until_the_disk_fills(obj, f, *a, **kw):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint: part written, then the disk is full
            f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    assert bilm_main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "cannot write checkpoint" in err and "step-00000010.pt" in err and "No space left on device" in err
    assert "free" in err and "previous checkpoints are intact" in err
    ckpt_dir = run / "checkpoints"
    assert [os.path.basename(p) for p in list_checkpoints(str(ckpt_dir))] == ["step-00000005.pt"]
    assert not [p for p in os.listdir(ckpt_dir) if ".tmp" in p]  # the partial file is gone
    load_checkpoint(str(ckpt_dir / "step-00000005.pt"))  # and the previous one loads
    monkeypatch.undo()  # space is back
    assert bilm_main([*args, "--resume"]) == 0
    reference = tmp_path / "reference"
    assert bilm_main(_train_args(reference, "train.max_steps=10", "train.checkpoint_every_steps=5",
                                 "train.seed=4")) == 0
    _assert_same_run(str(reference), str(run))


def test_stale_partial_files_are_removed_at_the_next_start(tmp_path):
    run = tmp_path / "run"
    train(tiny_config("train.max_steps=2"), TRAIN_DATA, str(run), vocab_file=TRAIN_VOCAB, progress=False)
    stale = run / "checkpoints" / "step-00000003.pt.tmp12345"
    stale.write_bytes(b"half a checkpoint")
    train(tiny_config("train.max_steps=3"), TRAIN_DATA, str(run), resume=True, vocab_file=TRAIN_VOCAB, progress=False)
    assert not stale.exists()


# ----- two runs on one directory -----

def test_second_run_on_the_same_directory_refuses_at_once(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(_bilm(*_train_args(run, "train.max_steps=400", "train.checkpoint_every_steps=100000",
                                                "train.log_every_steps=10")),
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _check_second_run_refused(first, run)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


def _check_second_run_refused(first, run):
    lock = run / LOCK_NAME
    deadline = time.time() + 60
    config = run / "config.yaml"  # written by the first run once it holds the lock
    while not (lock.exists() and "pid" in lock.read_text() and config.exists()) and time.time() < deadline:
        time.sleep(0.1)
    assert first.poll() is None, "the first run ended before the second could start"
    config_before = config.read_bytes()
    started = time.time()
    second = subprocess.run(_bilm(*_train_args(run, "train.max_steps=400")), env=ENV, capture_output=True,
                            text=True, timeout=120)
    assert second.returncode == 1
    assert time.time() - started < 30
    err = second.stderr.strip()
    assert len(err.splitlines()) == 1 and f"pid {first.pid}" in err and str(run) in err
    assert f"host {socket.gethostname()}" in err and "in use by another bilm train" in err
    out, errors = first.communicate(timeout=300)
    assert first.returncode == 0, errors
    assert config.read_bytes() == config_before  # the second run's different settings were not written
    assert sorted(_losses(str(run))) == list(range(10, 401, 10))  # every step once, from the first run only


# ----- SIGTERM: stopped, not finished -----

def test_sigterm_exits_143_with_a_resume_hint(tmp_path):
    run = tmp_path / "run"
    script = ("import os, signal, sys\n"
              "import bilm.training.run as t\n"
              "from bilm.cli import main\n"
              "orig = t.TrainStep.step\n"
              "def step(self, batch):\n"
              "    r = orig(self, batch)\n"
              "    if self.steps_done == 3: os.kill(os.getpid(), signal.SIGTERM)\n"
              "    return r\n"
              "t.TrainStep.step = step\n"
              f"sys.exit(main({_train_args(run, 'train.max_steps=50')!r}))\n")
    out = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 143, out.stderr
    assert "stopped by SIGTERM at step 3 of 50; checkpoint" in out.stderr and "step-00000003.pt" in out.stderr
    assert "continue with --resume" in out.stderr and "Traceback" not in out.stderr
    assert bilm_main([*_train_args(run, "train.max_steps=50"), "--resume"]) == 0


# ----- resume: metrics once, corrupt checkpoints set aside -----

def test_resumed_run_logs_each_step_once(tmp_path):
    overrides = ("train.log_every_steps=1", "train.checkpoint_every_steps=5", "train.seed=3")
    run = tmp_path / "run"
    train(tiny_config(*overrides, "train.max_steps=7"), TRAIN_DATA, str(run), vocab_file=TRAIN_VOCAB, progress=False)
    os.remove(run / "checkpoints" / "step-00000007.pt")  # killed after logging 6 and 7, before their checkpoint
    train(tiny_config(*overrides, "train.max_steps=10"), TRAIN_DATA, str(run), resume=True, vocab_file=TRAIN_VOCAB,
          progress=False)
    assert sorted(_losses(str(run))) == list(range(1, 11))


def test_pruning_keeps_the_good_checkpoint_and_sets_the_corrupt_one_aside(tmp_path):
    overrides = ("train.checkpoint_every_steps=5", "train.keep_checkpoints=2", "train.seed=3")
    run = tmp_path / "run"
    train(tiny_config(*overrides, "train.max_steps=7"), TRAIN_DATA, str(run), vocab_file=TRAIN_VOCAB, progress=False)
    newest = run / "checkpoints" / "step-00000007.pt"
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    with pytest.warns(UserWarning, match=r"step-00000007.pt: unreadable checkpoint.*renamed it to step-00000007.pt.corrupt"):
        train(tiny_config(*overrides, "train.max_steps=10"), TRAIN_DATA, str(run), resume=True,
              vocab_file=TRAIN_VOCAB, progress=False)
    names = sorted(os.listdir(run / "checkpoints"))
    assert names == ["step-00000005.pt", "step-00000007.pt.corrupt", "step-00000010.pt"], names


def test_deepspeed_checkpoints_are_pruned_with_theirs(tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed extra not installed")
    run = tmp_path / "run"
    ds_config = os.path.join(ROOT, "configs", "deepspeed", "zero1.json")
    args = _train_args(run, "train.max_steps=6", "train.checkpoint_every_steps=2", "train.keep_checkpoints=2",
                       "train.strategy=deepspeed", f"train.deepspeed_config={ds_config}", "train.sparse_softmax=false")
    out = subprocess.run(_bilm(*args), env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert [os.path.basename(p) for p in list_checkpoints(str(run / "checkpoints"))] == \
        ["step-00000004.pt", "step-00000006.pt"]
    kept = sorted(p for p in os.listdir(run / "checkpoints" / "deepspeed") if p.startswith("step-"))
    assert kept == ["step-00000004", "step-00000006"]


# ----- torchrun: a rank dies, two nodes -----

def _children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


@pytest.mark.distributed
def test_torchrun_restarts_a_killed_rank_and_finishes_the_same_run(tmp_path):
    args = _train_args("{out}", "train.max_steps=120", "train.checkpoint_every_steps=10", "train.log_every_steps=10",
                       "train.seed=6")

    def torchrun(out, restarts):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                f"--max-restarts={restarts}", "-m", "bilm.cli", *[a.format(out=out) for a in args], "--resume"]

    full, part = tmp_path / "full", tmp_path / "part"
    done = subprocess.run(torchrun(full, 0), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    proc = subprocess.Popen(torchrun(part, 1), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and len(_logged(part)) < 3:  # 30 steps done: checkpoints at 10, 20, 30
            time.sleep(0.2)
        workers = _children(proc.pid)
        assert len(workers) == 2 and proc.poll() is None
        os.kill(max(workers), signal.SIGKILL)  # one rank dies mid-run
        out = proc.communicate(timeout=600)[0]
    finally:  # never leave torchrun and its workers behind
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with open(tmp_path / "torchrun.log", "w") as f:
        f.write(out)
    assert proc.returncode == 0, out[-3000:]
    assert "resumed from" in out
    _assert_same_run(str(full), str(part))


@pytest.mark.distributed
def test_two_nodes_on_one_machine_equal_one_process(tmp_path):
    script = os.path.join(ROOT, "tests", "dist_scripts", "ddp_equivalence.py")
    single, double = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    subprocess.run([sys.executable, script, single], check=True, env=ENV, timeout=300)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                               f"--node-rank={rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                               "--rdzv-id=bilm-test", script, double], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True) for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    assert all(node.returncode == 0 for node in nodes), outputs[0][-2000:] + outputs[1][-2000:]
    assert_same_trained_params(single, double)


# ----- bad inputs, every command -----

def _bad_utf8(path):
    path.write_bytes(b"<S>\n</S>\n<UNK>\nthe\n\xff\xfe bad\n")
    return path


def _truncated(src, dst):
    data = open(src, "rb").read()
    dst.write_bytes(data[: len(data) // 3])
    return dst


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("small_run")
    train(tiny_config("train.max_steps=2"), TRAIN_DATA, str(run), vocab_file=TRAIN_VOCAB, progress=False)
    return run


def _cases(tmp, run):
    """(name, argv, the file the message must name, a file that must be left unchanged or None)."""
    tmp.mkdir(exist_ok=True)
    empty = tmp / "empty.txt"
    empty.write_text("")
    regular = tmp / "a_file"
    regular.write_text("not a directory")
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("model:\n  lstm: [unclosed\n")
    no_specials = tmp / "vocab_no_specials.txt"
    no_specials.write_text("the\ncat\n")
    bad_vocab = _bad_utf8(tmp / "vocab_bad_utf8.txt")
    ckpt = list_checkpoints(str(run / "checkpoints"))[-1]
    bad_ckpt = _truncated(ckpt, tmp / "step-00000002.pt")
    bad_weights = _truncated(WEIGHTS, tmp / "truncated_weights.hdf5")
    one_layer = tmp / "one_layer_options.json"
    options = json.load(open(OPTIONS))
    options["lstm"]["n_layers"] = 1
    one_layer.write_text(json.dumps(options))
    bad_text = tmp / "bad_text.txt"
    bad_text.write_bytes(b"good line\n\xff\xfe\n")
    sentences = tmp / "sentences.txt"
    sentences.write_text("the cat sat\n")
    existing = tmp / "existing.hdf5"
    existing.write_bytes(b"keep me")
    cfg = os.path.join(ROOT, "configs", "tiny.yaml")
    embed = ["embed", "--options", OPTIONS, "--weights", WEIGHTS, "--input", sentences]
    return [
        ("prepare empty input", ["prepare", empty, "--out", tmp / "prep"], empty, None),
        ("prepare output under a file", ["prepare", TRAIN_DATA, "--out", regular / "sub"], regular, regular),
        ("train bad YAML", ["train", "--config", bad_yaml, "--data", TRAIN_DATA, "--vocab", TRAIN_VOCAB, "--out",
                            tmp / "r1"], bad_yaml, None),
        ("train missing shards", ["train", "--config", cfg, "--data", tmp / "nothing-*.txt", "--vocab", TRAIN_VOCAB,
                                  "--out", tmp / "r2", "--set", "train.max_steps=5"], tmp / "nothing-*.txt", None),
        ("train vocab without specials", ["train", "--config", cfg, "--data", TRAIN_DATA, "--vocab", no_specials,
                                          "--out", tmp / "r3"], no_specials, None),
        ("train vocab not UTF-8", ["train", "--config", cfg, "--data", TRAIN_DATA, "--vocab", bad_vocab,
                                   "--out", tmp / "r4"], bad_vocab, None),
        ("train impossible size", ["train", "--config", cfg, "--data", TRAIN_DATA, "--vocab", TRAIN_VOCAB,
                                   "--out", tmp / "r5", "--set", "model.lstm.projection_dim=-10"],
         "model.lstm.projection_dim", None),
        ("train output under a file", ["train", "--config", cfg, "--data", TRAIN_DATA, "--vocab", TRAIN_VOCAB,
                                       "--out", regular / "run"], regular, regular),
        ("evaluate truncated checkpoint", ["evaluate", "--checkpoint", bad_ckpt, "--data", TRAIN_DATA], bad_ckpt, None),
        ("export truncated checkpoint", ["export", "--checkpoint", bad_ckpt, "--out", tmp / "exp"], bad_ckpt, None),
        ("export output under a file", ["export", "--checkpoint", run, "--out", regular / "exp"], regular, regular),
        # --force: the model is read (an existing output without it is refused first, before loading
        # anything), and a model that fails to load must still leave the existing output as it was.
        ("embed truncated weights", ["embed", "--options", OPTIONS, "--weights", bad_weights, "--input", sentences,
                                     "--out", existing, "--force"], bad_weights, existing),
        ("embed options fewer layers than weights", ["embed", "--options", one_layer, "--weights", WEIGHTS,
                                                     "--input", sentences, "--out", existing, "--force"],
         "RNN_0/RNN/MultiRNNCell/Cell1", existing),
        ("embed input not UTF-8", ["embed", "--options", OPTIONS, "--weights", WEIGHTS, "--input", bad_text,
                                   "--out", tmp / "x.hdf5"], bad_text, None),
        ("embed output exists", [*embed, "--out", existing], existing, existing),
        ("embed output under a file", [*embed, "--out", regular / "x.hdf5"], regular, regular),
        ("dump-token-embeddings missing vocab", ["dump-token-embeddings", "--vocab", tmp / "missing.txt", "--options",
                                                 OPTIONS, "--weights", WEIGHTS, "--out", tmp / "t.hdf5"],
         tmp / "missing.txt", None),
    ]


def test_bad_inputs_give_one_line_naming_the_file(tmp_path, small_run, capsys):
    for name, argv, names, keep in _cases(tmp_path / "cases", small_run):
        before = keep.read_bytes() if keep is not None and keep.is_file() else None
        rc = bilm_main([str(a) for a in argv])
        err = capsys.readouterr().err.strip()
        assert rc != 0, name
        lines = [line for line in err.splitlines() if not line.startswith("note:")]
        assert len(lines) == 1 and "Traceback" not in err, f"{name}: {err}"
        assert str(names) in lines[0], f"{name}: {lines[0]}"
        if before is not None:
            assert keep.read_bytes() == before, f"{name}: {keep} was changed"
    assert not (tmp_path / "cases" / "prep").exists()  # prepare wrote nothing
