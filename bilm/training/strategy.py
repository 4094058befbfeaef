"""How one optimizer step runs on this rank: plain/DDP or DeepSpeed, behind one interface.

The training loop (``bilm.training.run``) calls only what ``Strategy`` offers, so it has no
per-strategy branches:

    forward_module     what to call for the loss: the model, its DDP wrapper or DeepSpeed's engine
    optimizer          whose ``param_groups`` carry the learning rate
    autocast()         bf16 autocast when ``train.precision`` is bf16, under every strategy
    step(loss, mark)   backward, gradient communication, clip to ``optim.max_grad_norm``,
                       optimizer step; returns the norm before clipping as a tensor (no host sync,
                       but for the sparse softmax's all-gather under DDP, which needs each rank's row count)
    save / load        the optimizer state, in the checkpoint payload or beside it
    prune              drop the state of checkpoints that were pruned

A config key means the same under every strategy; where DeepSpeed cannot honour one, or
its JSON would override one, ``check_config`` rejects the pair and names both.
"""
from __future__ import annotations

import copy
import os
import re
import shutil
import warnings
from typing import Callable, Optional

import torch
import yaml
from torch import nn

from bilm.runs.checkpoint import CheckpointError, check_deepspeed_state
from bilm.runs.run_dir import deepspeed_dir
from bilm.runs.config import Config, ConfigError
from bilm.core.distributed import DistEnv, init_single_process_group
from bilm.training.gradients import all_reduce_gradients_, clip_grad_norm_
from bilm.training.optimizers import build_optimizer
from bilm.core.precision import autocast as precision_autocast

Mark = Callable[[str], None]  # called after each phase of a step, with its name (for timings)

# What bilm decides itself and a DeepSpeed JSON must therefore not set, with the key that does.
_DEEPSPEED_KEYS_OWNED = {
    "train_batch_size": "train.batch_size (bilm packs the batches; DeepSpeed sees one per step)",
    "train_micro_batch_size_per_gpu": "train.batch_size (bilm packs the batches; DeepSpeed sees one per step)",
    "gradient_accumulation_steps": "train.batch_size (bilm packs the batches; DeepSpeed sees one per step)",
    "optimizer": "optim.* (bilm builds the optimizer)",
    "scheduler": "optim.warmup_steps and optim.decay (bilm sets the learning rate)",
    "bf16": "train.precision (bf16 autocast, the same under every strategy)",
    "fp16": "train.precision (bf16 autocast, the same under every strategy)",
    "amp": "train.precision (bf16 autocast, the same under every strategy)",
}
# Used when train.deepspeed_config is null: ZeRO stage 1, quiet.
DEFAULT_DEEPSPEED_CONFIG = {"zero_optimization": {"stage": 1}, "steps_per_print": 10**9,
                            "wall_clock_breakdown": False}


def check_config(cfg: Config) -> None:
    """Reject key combinations a strategy cannot honour, before anything is built."""
    t = cfg.train
    if t.strategy == "deepspeed":
        if t.sparse_softmax:
            raise ConfigError("train.sparse_softmax: true conflicts with train.strategy: deepspeed (ZeRO partitions "
                              "dense gradients only); set train.sparse_softmax=false")
        deepspeed_config(cfg, world_size=1)


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed config for this run: the user's file (or ``DEFAULT_DEEPSPEED_CONFIG``) plus
    what bilm decides. A file that sets what a bilm key decides is rejected, naming both."""
    path = cfg.train.deepspeed_config
    if path is None:
        ds = copy.deepcopy(DEFAULT_DEEPSPEED_CONFIG)  # DeepSpeed may write into the nested dicts
        where = "the default DeepSpeed config"
    else:
        try:
            with open(path, encoding="utf-8") as f:
                ds = yaml.safe_load(f)  # JSON is YAML
        except OSError as e:
            raise ConfigError(f"train.deepspeed_config: cannot read {path} ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"train.deepspeed_config: {path} is not valid JSON/YAML ({e})") from None
        if not isinstance(ds, dict):
            raise ConfigError(f"train.deepspeed_config: {path} must hold a mapping, got {type(ds).__name__}")
        where = path
    for key, owner in _DEEPSPEED_KEYS_OWNED.items():
        if key in ds:
            raise ConfigError(f"{where}: '{key}' conflicts with {owner}; remove it from the DeepSpeed config")
    clip = ds.get("gradient_clipping")
    if clip is not None and float(clip) != float(cfg.optim.max_grad_norm):
        raise ConfigError(f"{where}: 'gradient_clipping' ({clip}) conflicts with optim.max_grad_norm "
                          f"({cfg.optim.max_grad_norm}); remove it and set optim.max_grad_norm")
    ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, train_batch_size=world_size,
              gradient_clipping=cfg.optim.max_grad_norm)
    ds.setdefault("zero_allow_untested_optimizer", True)  # bilm's Adagrad
    return ds


class Strategy:
    """The interface; ``DDPStrategy`` and ``DeepSpeedStrategy`` implement it."""

    forward_module: nn.Module
    optimizer: torch.optim.Optimizer

    def __init__(self, cfg: Config, model: nn.Module, env: DistEnv):
        self.cfg, self.model, self.env = cfg, model, env

    def autocast(self):
        return precision_autocast(self.env.device, self.cfg.train.precision)

    def step(self, loss: torch.Tensor, mark: Mark) -> torch.Tensor:
        raise NotImplementedError

    def optimizer_state(self) -> Optional[dict]:
        """What goes into the checkpoint payload's ``optimizer`` (None: saved beside it by ``save``)."""
        return None

    def save(self, ckpt_dir: str, tag: str) -> Optional[str]:
        """Write state kept outside the payload (every rank calls this); returns its tag or None."""
        return None

    def load(self, payload: dict, path: str) -> None:
        raise NotImplementedError

    def prune(self, ckpt_dir: str, removed: list[str]) -> None:
        """The checkpoints ``removed`` were deleted: delete what ``save`` wrote for them."""


class DDPStrategy(Strategy):
    """One process, or DDP under torchrun. DDP averages the dense gradients during backward; the
    softmax is kept out of DDP and its sparse gradient is all-gathered by hand (rows touched only)."""

    def __init__(self, cfg: Config, model: nn.Module, env: DistEnv):
        super().__init__(cfg, model, env)
        self.optimizer = build_optimizer(cfg, model)
        self.forward_module = model
        self.params = list(model.parameters())
        self.softmax_params = list(model.softmax.parameters())
        if env.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP
            DDP._set_params_and_buffers_to_ignore_for_model(model, ["softmax.weight", "softmax.bias"])
            self.forward_module = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)

    def step(self, loss: torch.Tensor, mark: Mark) -> torch.Tensor:
        loss.backward()
        mark("backward")
        if self.env.distributed:
            all_reduce_gradients_(self.softmax_params)
        mark("communication")
        norm = clip_grad_norm_(self.params, self.cfg.optim.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        mark("optimizer")
        return norm

    def optimizer_state(self) -> Optional[dict]:
        return self.optimizer.state_dict()

    def load(self, payload: dict, path: str) -> None:
        if payload.get("optimizer") is None:
            if self.env.is_main:
                warnings.warn(f"{path} holds no optimizer state (written under DeepSpeed): the optimizer starts afresh")
            return
        self.optimizer.load_state_dict(payload["optimizer"])
        # State left on the CPU is still a view of the (memory-mapped) checkpoint file: copy it, so the
        # mapping goes with the payload and a pruned checkpoint's disk space is freed.
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.device.type == "cpu":
                    state[key] = value.clone()


class DeepSpeedStrategy(Strategy):
    """DeepSpeed ZeRO 1/2: it partitions the optimizer state (and gradients) over the ranks and
    clips to ``optim.max_grad_norm``; every rank saves its shard under ``checkpoints/deepspeed/``."""

    def __init__(self, cfg: Config, model: nn.Module, env: DistEnv):
        super().__init__(cfg, model, env)
        import deepspeed

        init_single_process_group(env.device)  # a single process outside torchrun: DeepSpeed still wants one
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=build_optimizer(cfg, model), config=deepspeed_config(cfg, env.world_size))
        self.forward_module = self.engine

    def step(self, loss: torch.Tensor, mark: Mark) -> torch.Tensor:
        self.engine.backward(loss)
        mark("backward")
        self.engine.step()
        mark("optimizer")
        norm = self.engine.get_global_grad_norm()
        return norm if isinstance(norm, torch.Tensor) else torch.tensor(0.0 if norm is None else norm)

    def save(self, ckpt_dir: str, tag: str) -> Optional[str]:
        self.engine.save_checkpoint(deepspeed_dir(ckpt_dir), tag=tag)
        return tag

    def load(self, payload: dict, path: str) -> None:
        if payload.get("deepspeed_tag"):
            if not re.fullmatch(r"step-\d+", str(payload["deepspeed_tag"])):  # a directory name, nowhere else
                raise CheckpointError(f"{path}: key 'deepspeed_tag' must be step-N, got {payload['deepspeed_tag']!r}")
            check_deepspeed_state(os.path.join(deepspeed_dir(os.path.dirname(path)), payload["deepspeed_tag"]))
            self.engine.load_checkpoint(deepspeed_dir(os.path.dirname(path)), tag=payload["deepspeed_tag"])
        elif self.env.is_main:
            warnings.warn(f"{path} holds no DeepSpeed state: the model resumes, the optimizer starts afresh")

    def prune(self, ckpt_dir: str, removed: list[str]) -> None:
        for path in removed:
            state = os.path.join(deepspeed_dir(ckpt_dir), os.path.basename(path)[: -len(".pt")])
            if os.path.isdir(state):
                shutil.rmtree(state)


def make_strategy(cfg: Config, model: nn.Module, env: DistEnv) -> Strategy:
    return (DeepSpeedStrategy if cfg.train.strategy == "deepspeed" else DDPStrategy)(cfg, model, env)
