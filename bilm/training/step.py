"""One optimizer step of one rank: ``TrainStep`` owns the model, the strategy (optimizer), the
carried LSTM states and the negative-sampling generator; the run (``bilm.training.run``) adds data,
logging and checkpoints around ``TrainStep.step``. Tests drive ``step`` directly with batches they build.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from bilm.data import LMDataset
from bilm.core.logs import log
from bilm.modules.bidirectional import map_state
from bilm.modules.language_model import DIRECTIONS
from bilm.runs.checkpoint import numpy_rng_from_plain, numpy_rng_to_plain
from bilm.runs.config import Config
from bilm.core.distributed import DistEnv, to_device
from bilm.runs.model_builder import build_model
from bilm.scoring.perplexity import perplexity
from bilm.training.strategy import check_config, make_strategy


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": numpy_rng_to_plain(np.random.get_state()),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(numpy_rng_from_plain(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class StepResult:
    """One step's figures, as tensors on the device: reading them (``values()``) waits for the
    device, so the loop does it only when it logs. ``mean_loss``: each direction's mean sampled-softmax
    loss (float64); its perplexity is ``bilm.scoring.perplexity.perplexity`` of it, ``inf`` past float range."""
    loss: torch.Tensor
    mean_loss: dict[str, torch.Tensor]
    grad_norm: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)

    def values(self) -> dict[str, float]:
        losses = {d: float(m) for d, m in self.mean_loss.items()}
        return {"loss": float(self.loss), "grad_norm": float(self.grad_norm),
                **{f"loss/{d}": m for d, m in losses.items()},
                **{f"perplexity/{d}": perplexity(m) for d, m in losses.items()}}


class TrainStep:
    """Owns the model, the strategy (optimizer), carried LSTM states and sampling generator of one rank.

    ``step(batch)`` is one optimizer step; the run (``bilm.training.run``) adds data, logging and
    checkpoints around it. Tests drive ``step`` directly with batches they build.
    """

    def __init__(self, cfg: Config, vocab_size: int, env: DistEnv,
                 init: Optional[dict[str, Optional[str]]] = None):
        self.cfg, self.env = cfg, env
        t = cfg.train
        check_config(cfg)
        seed_everything(t.seed)  # same initial weights on every rank
        self.model = build_model(cfg, vocab_size)
        if init and init.get("weights"):
            from bilm.modules.pretrained import load_pretrained
            report = load_pretrained(self.model, init["weights"], init.get("options"), init.get("softmax"),
                                     init.get("softmax_vocab"), init.get("vocab_tokens"))
            log.info(f"initialized from {init['weights']}"
                     + (f" (softmax: {report['softmax_rows_loaded']} rows from {init['softmax']})" if init.get("softmax")
                        else " (softmax freshly initialized)"))
        self.model.to(env.device)
        # The sampler's generator lives on the CPU: cheap, and its state is easy to checkpoint.
        # Ranks draw different negatives unless the config asks for the same ones.
        self.generator = torch.Generator()
        self.generator.manual_seed(t.seed * 1000 + (0 if t.same_negative_samples_across_ranks else env.rank) + 1)
        self.state = None  # carried LSTM states (truncated BPTT)
        # bilm-tf differentiates unroll_steps x the mean loss (training.py: compute_gradients(loss *
        # unroll_steps)): its clip and Adagrad see that gradient. "none": the mean loss itself.
        self.loss_scale = float(t.unroll_steps) if cfg.optim.loss_scale == "unroll_steps" else 1.0
        self.steps_done = 0  # optimizer steps so far (set on resume): drives the learning-rate warm-up
        self.lr_factor = 1.0  # lowered by the divergence guard's rollbacks
        self.total_steps: Optional[int] = None  # the run's length: where optim.decay "linear" reaches 0
        self.timing = False  # True: wait for the device at each phase, so the timings are exact
        self.strategy = make_strategy(cfg, self.model, env)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.strategy.optimizer

    def _clock(self) -> float:
        if self.timing and self.env.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def step(self, batch: dict) -> StepResult:
        t = self.cfg.train
        self.model.train()
        timings, last = {}, [self._clock()]

        def mark(phase: str) -> None:
            now = self._clock()
            timings[phase] = now - last[0]
            last[0] = now

        batch = to_device(batch, self.env.device)
        self._set_learning_rate()
        with self.strategy.autocast():
            loss, losses, self.state = self.strategy.forward_module(batch, self.state, t.n_negative_samples_batch,
                                                                    self.generator)
        mark("forward")
        grad_norm = self.strategy.step(loss * self.loss_scale, mark)
        self.steps_done += 1
        mean_loss = {d: losses[d].mean.detach().double() for d in DIRECTIONS}
        return StepResult(loss.detach(), mean_loss, grad_norm.detach(), timings)

    def _set_learning_rate(self) -> None:
        """optim.lr, ramped up linearly over the first optim.warmup_steps steps and, with optim.decay
        "linear", down linearly to 0 at total_steps (bilm-tf: neither)."""
        o = self.cfg.optim
        scale = min(1.0, (self.steps_done + 1) / o.warmup_steps) if o.warmup_steps > 0 else 1.0
        if o.decay == "linear":
            if not self.total_steps:
                raise ValueError("optim.decay 'linear' needs the run's length: set TrainStep.total_steps")
            scale *= 1.0 - self.steps_done / self.total_steps  # steps_done < total_steps inside the run
        for group in self.optimizer.param_groups:
            group["lr"] = o.lr * self.lr_factor * scale

    # ----- checkpoint state -----
    def rank_state(self, dataset: Optional[LMDataset]) -> dict:
        return {"data": dataset.state_dict() if dataset is not None else None, "rng": rng_state(),
                "generator": self.generator.get_state(), "lstm_state": map_state(self.state, lambda t: t.to("cpu"))}

    def load_rank_state(self, state: dict, dataset: Optional[LMDataset]) -> None:
        if dataset is not None and state["data"] is not None:
            dataset.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        self.generator.set_state(state["generator"])
        self.state = map_state(state["lstm_state"], lambda t: t.to(self.env.device, copy=True))  # not a view of the file
