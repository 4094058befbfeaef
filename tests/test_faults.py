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

from bilm.runs.checkpoint import CheckpointError, load_checkpoint
from bilm.runs.run_dir import checkpoint_step, list_checkpoints
from bilm.cli import main as bilm_main
from bilm.training.run import train
from conftest import OPTIONS, WEIGHTS
from train_helpers import (BILM_TF_TEST_MODEL, FAST_TRAINING, POLL_SECONDS, ROOT, TRAIN_DATA, TRAIN_VOCAB,
                           assert_same_trained_params, tiny_config)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
# The CLI with places to hold a run at a point of its progress (see the script).
HELD_CLI = os.path.join(ROOT, "tests", "dist_scripts", "held_cli.py")


def _train_args(out, *overrides, fast: bool = True):
    """``bilm train`` arguments of a tiny run into ``out``. ``fast``: with BILM_TEST_FAST_TRAINING's smaller
    model (this file's own runs); other files pass False when they compare with a ``tiny_config`` run."""
    args = ["train", "--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--data", TRAIN_DATA, "--vocab",
            TRAIN_VOCAB, "--out", str(out), "--no-progress"]
    for override in (*BILM_TF_TEST_MODEL, *(FAST_TRAINING if fast else ()), *overrides):
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


# ----- waiting on the run, never on the clock -----

HANG_SECONDS = 600  # a wait longer than this is a hang (the only use of a deadline here)


def _wait_for(condition, proc, what, stderr_file=None):
    """Poll ``condition`` until it holds. ``proc`` ending first fails (with its stderr); the deadline only
    guards against a hang: on any machine the wait ends when the condition holds, never on a timer."""
    deadline = time.monotonic() + HANG_SECONDS
    while not condition():
        if proc.poll() is not None:
            err = open(stderr_file).read()[-2000:] if stderr_file else ""
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}\n{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {HANG_SECONDS} s: the run hangs")
        time.sleep(POLL_SECONDS)


def _logged_steps(run):
    """The steps metrics.jsonl holds now (a line still being written is skipped)."""
    steps = []
    for line in _logged(run):
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return steps


def _saved_steps(run):
    return [checkpoint_step(p) for p in list_checkpoints(os.path.join(run, "checkpoints"))]


def _furthest_step(run):
    """The furthest step the run has logged or saved (a killed run may have logged past its newest checkpoint)."""
    return max([0, *_logged_steps(run), *_saved_steps(run)])


def _partial_files(run):
    return sorted(p for p in os.listdir(os.path.join(run, "checkpoints")) if ".tmp" in p)


# ----- kill -9 -----

# The CLI, dying inside a checkpoint write (tests/test_continue_tf.py): with KILL_IN_WRITE=N the process
# kills itself (SIGKILL) right after the N-th checkpoint's bytes are written, before the file is renamed.
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

# Runs that tests kill are given this many steps: out of reach, so a run is still going when its kill
# comes, however fast the machine; the run's last start sets the length it ends at.
OUT_OF_REACH = 10**9


def test_kill_9_at_random_moments_resumes_bit_exactly(tmp_path):
    """Ten kills -9 of one run, each at a moment chosen at random among those the run reaches (never
    after a guessed time): five when a step shows up (logged, or its checkpoint saved), five inside a
    checkpoint write. Then it resumes to exactly the run it would have been unkilled."""
    settings = ("train.checkpoint_every_steps=1", "train.keep_checkpoints=2", "train.log_every_steps=1", "train.seed=5")

    def command(out, max_steps):
        return [sys.executable, HELD_CLI, *_train_args(out, *settings, f"train.max_steps={max_steps}"), "--resume"]

    part, in_write = tmp_path / "part", tmp_path / "in-write"
    rng = random.Random(0)
    partial_files = []
    for kill in range(10):
        ahead = rng.randint(1, 20)  # steps on from where the run is now
        target = _furthest_step(part) + ahead
        env = dict(ENV)
        if kill % 2:
            env.update(PAUSE_IN_WRITE=str(ahead), WRITE_FRACTION=str(rng.random()), IN_WRITE=str(in_write))
            moment, reached = f"inside checkpoint write {ahead} of this start", in_write.exists
        elif rng.random() < 0.5:
            moment, reached = f"step {target} logged", lambda: max(_logged_steps(part), default=0) >= target
        else:
            moment, reached = f"step {target} saved", lambda: max(_saved_steps(part), default=0) >= target
        stderr = tmp_path / f"kill-{kill}.err"
        with open(stderr, "w") as err:
            proc = subprocess.Popen(command(part, OUT_OF_REACH), env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            _wait_for(reached, proc, moment, stderr)
        finally:
            proc.kill()  # at once (also when the wait failed: never leave a run behind)
        assert proc.wait() == -signal.SIGKILL, f"kill {kill} ({moment}) did not land:\n{stderr.read_text()[-2000:]}"
        if kill % 2:
            name = os.path.basename(in_write.read_text())  # the temporary file the write was filling
            in_write.unlink()
            assert _partial_files(part) == [name]  # it stays, partial, until the next start
            with pytest.raises(CheckpointError, match="truncated or corrupt"):
                load_checkpoint(str(part / "checkpoints" / name))
            partial_files.append(name)

    steps = _furthest_step(part) + 10  # a few steps more than any start reached: the length both runs end at
    done = subprocess.run(command(part, steps), env=ENV, timeout=HANG_SECONDS, capture_output=True, text=True)
    said = done.stdout + done.stderr
    assert done.returncode == 0, said[-3000:]
    assert f"removed {part / 'checkpoints' / partial_files[-1]}" in said and "resumed from" in said
    assert not _partial_files(part)
    full = tmp_path / "full"
    subprocess.run(command(full, steps), check=True, env=ENV, timeout=HANG_SECONDS, capture_output=True)
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
    """The second run refuses while the first is held at its step 5: a second run that waited for the
    directory instead would never return (the hang guard ends the test)."""
    run, held, release = tmp_path / "run", tmp_path / "held", tmp_path / "release"
    stderr = tmp_path / "first.err"
    env = {**ENV, "HOLD_AFTER_STEP": "5", "HELD": str(held), "RELEASE": str(release)}
    with open(stderr, "w") as err:
        first = subprocess.Popen([sys.executable, HELD_CLI, *_train_args(run, "train.max_steps=40",
                                  "train.checkpoint_every_steps=100000", "train.log_every_steps=10")],
                                 env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        _check_second_run_refused(first, run, held, release, stderr)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


def _check_second_run_refused(first, run, held, release, stderr):
    _wait_for(held.exists, first, "the first run's step 5", stderr)  # it holds the lock and wrote its config
    config = run / "config.yaml"
    config_before = config.read_bytes()
    second = subprocess.run(_bilm(*_train_args(run, "train.max_steps=400")), env=ENV, capture_output=True,
                            text=True, timeout=HANG_SECONDS)
    assert second.returncode == 1
    assert first.poll() is None  # still held: the second run did not wait for it
    err = second.stderr.strip()
    assert len(err.splitlines()) == 1 and f"pid {first.pid}" in err and str(run) in err
    assert f"host {socket.gethostname()}" in err and "in use by another bilm train" in err
    release.touch()
    assert first.wait(timeout=HANG_SECONDS) == 0, stderr.read_text()[-2000:]
    assert config.read_bytes() == config_before  # the second run's different settings were not written
    assert sorted(_losses(str(run))) == list(range(10, 41, 10))  # every step once, from the first run only


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
    out = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True,
                         timeout=HANG_SECONDS)
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
    out = subprocess.run(_bilm(*args), env=ENV, capture_output=True, text=True, timeout=HANG_SECONDS)
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
    """Rank 1 is killed -9 at a step chosen at random (held there until the kill, so the run cannot
    end first); torchrun restarts both ranks, which resume and finish the run unkilled."""
    args = _train_args("{out}", "train.max_steps=120", "train.checkpoint_every_steps=10", "train.log_every_steps=10",
                       "train.seed=6")

    def torchrun(out, restarts):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                f"--max-restarts={restarts}", HELD_CLI, *[a.format(out=out) for a in args], "--resume"]

    full, part, held = tmp_path / "full", tmp_path / "part", tmp_path / "held"
    done = subprocess.run(torchrun(full, 0), env=ENV, capture_output=True, text=True, timeout=HANG_SECONDS)
    assert done.returncode == 0, done.stderr[-3000:]
    at_step = random.Random(6).randint(11, 109)  # past the first checkpoint, before the last
    env = {**ENV, "HOLD_AFTER_STEP": str(at_step), "HOLD_RANK": "1", "HELD": str(held),
           "RELEASE": str(tmp_path / "never")}
    log = tmp_path / "torchrun.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(torchrun(part, 1), env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_for(held.exists, proc, f"rank 1 at step {at_step}", log)
        rank = int(held.read_text())
        assert rank in _children(proc.pid)  # a worker of this torchrun
        os.kill(rank, signal.SIGKILL)  # one rank dies mid-run
        proc.wait(timeout=HANG_SECONDS)
    finally:  # never leave torchrun and its workers behind
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    assert "resumed from" in out
    _assert_same_run(str(full), str(part))


@pytest.mark.distributed
def test_two_nodes_on_one_machine_equal_one_process(tmp_path):
    script = os.path.join(ROOT, "tests", "dist_scripts", "ddp_equivalence.py")
    single, double = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    subprocess.run([sys.executable, script, single], check=True, env=ENV, timeout=HANG_SECONDS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                               f"--node-rank={rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                               "--rdzv-id=bilm-test", script, double], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True) for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=HANG_SECONDS)[0] for node in nodes]
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
