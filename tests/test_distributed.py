"""Several processes on CPU (gloo) under torchrun: DDP equals one process; DeepSpeed trains."""
import os
import subprocess
import sys

import pytest
import torch

from train_helpers import assert_same_trained_params

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "dist_scripts", "ddp_equivalence.py")

pytestmark = pytest.mark.distributed


def _torchrun(n, *args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", SCRIPT, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_ddp_two_ranks_equal_one_process(tmp_path):
    single, double = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    subprocess.run([sys.executable, SCRIPT, single], check=True, timeout=300)
    _torchrun(2, double)
    assert_same_trained_params(single, double)


def test_deepspeed_two_ranks_loss_falls(tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed extra not installed")
    # DeepSpeed JIT-builds a communication op on first use; build it in one process first so
    # two ranks never build it at once.
    subprocess.run([sys.executable, SCRIPT, str(tmp_path / "warm.pt"), "deepspeed"], check=True, timeout=600)
    out = str(tmp_path / "ds.pt")
    _torchrun(2, out, "deepspeed", timeout=600)
    losses = torch.load(out)["losses"]
    assert losses[-1] < losses[0], losses
