"""The training strategy seam: no host sync between log steps, config keys that mean the same
under every strategy (or are rejected naming both), DeepSpeed's config derived from bilm's."""
import json
import os

import pytest
import torch

import bilm.training.run as train_module
from bilm.runs.config import ConfigError
from bilm.data import LMDataset
from bilm.core.distributed import DistEnv
from bilm.training.strategy import DDPStrategy, check_config, deepspeed_config
from bilm.training.run import train
from bilm.training.step import TrainStep
from train_helpers import ROOT, TRAIN_DATA, TRAIN_VOCAB, tiny_config

TRAINING_SIDE = ("bilm/training/run.py", "bilm/training/step.py", "bilm/training/checkpointer.py",
                 "bilm/training/strategy.py", "bilm/training/optimizers.py",
                 "bilm/training/gradients.py", "bilm/core/distributed.py", "bilm/modules/language_model.py")


class HostReads:
    """Counts what makes the host wait for a device: bilm code reading a tensor's value into Python.
    ``item``/``__float__``/``tolist`` from any bilm module; ``__bool__``/``__int__`` (also cheap
    CPU-side bookkeeping, e.g. in the CPU sampler) from training-side code. torch's own reads
    (the optimizers' step counters, kept on the CPU for that reason) are not bilm's to change."""

    def __init__(self, monkeypatch):
        self.calls = []
        for name in ("item", "__float__", "tolist", "__bool__", "__int__"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, original))

    def _counting(self, name, original):
        def wrapper(tensor, *args, **kwargs):
            import sys
            caller = sys._getframe(1).f_code.co_filename.replace(os.sep, "/")
            ours = "/bilm/" in caller and "site-packages" not in caller
            if ours and (name in ("item", "__float__", "tolist") or any(caller.endswith(f) for f in TRAINING_SIDE)):
                self.calls.append((name, caller, sys._getframe(1).f_lineno))
            return original(tensor, *args, **kwargs)
        return wrapper


def test_a_training_step_reads_nothing_back_from_the_device(monkeypatch):
    trainer = TrainStep(tiny_config(), 32, DistEnv())
    data = iter(LMDataset(TRAIN_DATA, TRAIN_VOCAB, 2, 10, mode="train", seed=0))
    for _ in range(2):  # first steps build caches (sampler chunk sizes)
        trainer.step(next(data))
    reads = HostReads(monkeypatch)
    results = [trainer.step(next(data)) for _ in range(5)]
    assert reads.calls == []
    figures = results[-1].values()  # the one read, when the loop logs
    assert set(figures) == {"loss", "grad_norm", "loss/forward", "loss/backward", "perplexity/forward",
                            "perplexity/backward"}
    assert len(reads.calls) == 4


def test_the_loop_reads_the_figures_once_per_log_interval(tmp_path, monkeypatch):
    reads = []
    original = train_module.StepResult.values
    monkeypatch.setattr(train_module.StepResult, "values", lambda self: reads.append(1) or original(self))
    train(tiny_config("train.max_steps=12", "train.log_every_steps=5"), TRAIN_DATA, str(tmp_path),
          vocab_file=TRAIN_VOCAB, progress=False)
    assert len(reads) == 3 + 1  # steps 5, 10, 12 (the last); the summary reads the last step again
    logged = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert logged == [5, 10, 12]


def test_local_strategy_clips_to_max_grad_norm_and_returns_the_norm_before():
    cfg = tiny_config("optim.max_grad_norm=0.001")
    trainer = TrainStep(cfg, 32, DistEnv())
    assert isinstance(trainer.strategy, DDPStrategy)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    result = trainer.step(next(iter(LMDataset(TRAIN_DATA, TRAIN_VOCAB, 2, 10, mode="train", seed=0))))
    assert result.grad_norm.dim() == 0 and float(result.grad_norm) > 0.001
    # Adagrad's first step moves a parameter by at most lr * |g| / sqrt(1 + g^2) <= lr * 0.001 after the clip.
    moved = max(float((p.detach() - before[n]).abs().max()) for n, p in trainer.model.named_parameters())
    assert 0 < moved <= 0.2 * 0.001 * 1.0001


# ----- one meaning per key, or a clear rejection -----

def _ds_file(tmp_path, content: dict) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    return str(path)


@pytest.mark.parametrize("content,names", [
    ({"gradient_clipping": 1.0}, ["gradient_clipping", "optim.max_grad_norm"]),
    ({"bf16": {"enabled": True}}, ["'bf16'", "train.precision"]),
    ({"fp16": {"enabled": True}}, ["'fp16'", "train.precision"]),
    ({"train_batch_size": 64}, ["train_batch_size", "train.batch_size"]),
    ({"optimizer": {"type": "Adam"}}, ["'optimizer'", "optim."]),
    ({"scheduler": {"type": "WarmupLR"}}, ["'scheduler'", "optim.warmup_steps"]),
])
def test_deepspeed_config_that_overrides_a_bilm_key_is_rejected(tmp_path, content, names):
    path = _ds_file(tmp_path, {"zero_optimization": {"stage": 1}, **content})
    cfg = tiny_config("train.strategy=deepspeed", "train.sparse_softmax=false", f"train.deepspeed_config={path}")
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    for name in names:
        assert name in str(e.value)
    assert path in str(e.value)


def test_deepspeed_config_takes_bilm_keys(tmp_path):
    path = _ds_file(tmp_path, {"zero_optimization": {"stage": 2}, "gradient_clipping": 10.0})
    cfg = tiny_config("train.strategy=deepspeed", "train.sparse_softmax=false", f"train.deepspeed_config={path}")
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["zero_optimization"] == {"stage": 2}
    assert (ds["gradient_clipping"], ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"],
            ds["gradient_accumulation_steps"]) == (cfg.optim.max_grad_norm, 4, 1, 1)
    # null: ZeRO stage 1 by default, not open(None)
    default = deepspeed_config(tiny_config("train.strategy=deepspeed", "train.sparse_softmax=false"), world_size=2)
    assert default["zero_optimization"] == {"stage": 1} and default["train_batch_size"] == 2


def test_shipped_deepspeed_configs_are_accepted():
    folder = os.path.join(ROOT, "configs", "deepspeed")
    names = sorted(os.listdir(folder))
    assert names
    for name in names:
        check_config(tiny_config("train.strategy=deepspeed", "train.sparse_softmax=false",
                                 f"train.deepspeed_config={os.path.join(folder, name)}"))


def test_sparse_softmax_under_deepspeed_is_rejected():
    with pytest.raises(ConfigError, match="train.sparse_softmax.*train.strategy: deepspeed"):
        check_config(tiny_config("train.strategy=deepspeed"))


def test_unreadable_deepspeed_config_names_the_key_and_file(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match=f"train.deepspeed_config: cannot read {missing}"):
        check_config(tiny_config("train.strategy=deepspeed", "train.sparse_softmax=false",
                                 f"train.deepspeed_config={missing}"))


def test_rejected_strategy_config_writes_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="train.sparse_softmax"):
        train(tiny_config("train.strategy=deepspeed"), TRAIN_DATA, str(out), vocab_file=TRAIN_VOCAB, progress=False)
    assert not out.exists()
