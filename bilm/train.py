"""``bilm train``: the biLM training loop, read top to bottom.

One process per device under torchrun. ``Trainer.step`` is one optimizer step; how the
gradients are communicated, clipped and applied (plain/DDP with a sparse softmax, or
DeepSpeed ZeRO) is the strategy's business (``bilm.strategy``), so the loop in ``train``
reads the same for all: data, step, log (where the loop reads figures back from the device),
checkpoint, stop.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from bilm.checkpoint import (CheckpointWriteError, RunLock, checkpoint_path, load_latest_valid, load_model_state,
                             prune_checkpoints, remove_stale_temporaries, save_checkpoint)
from bilm.config import Config, config_to_dict, save_config
from bilm.data import LMDataset, load_manifest
from bilm.distributed import DistEnv, all_reduce_max, gather_objects, init_distributed, shutdown
from bilm.logs import log
from bilm.model import DIRECTIONS, LanguageModel
from bilm.modules.bilm import map_state
from bilm.options import BiLMOptions
from bilm.strategy import check_config, make_strategy
from bilm.vocab import Vocabulary
from data_tools.normalize import TextPipeline

# Adagrad's sparse update builds COO tensors from indices it made itself; the note is noise.
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")

# Under torchrun, ranks agree on SIGTERM and the checkpoint clock at least this often (an all-reduce).
STOP_CHECK_STEPS = 10


# ---------------------------------------------------------------- setup helpers

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


# ---------------------------------------------------------------- one step

@dataclass
class StepResult:
    """One step's figures, as tensors on the device: reading them (``values()``) waits for the
    device, so the loop does it only when it logs."""
    loss: torch.Tensor
    perplexity: dict[str, torch.Tensor]
    grad_norm: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)

    def values(self) -> dict[str, float]:
        return {"loss": float(self.loss), "grad_norm": float(self.grad_norm),
                **{f"perplexity/{d}": float(p) for d, p in self.perplexity.items()}}


class Trainer:
    """Owns the model, the strategy (optimizer), carried LSTM states and sampling generator of one rank.

    ``step(batch)`` is one optimizer step; the loop in ``train`` adds data, logging and
    checkpoints around it. Tests drive ``step`` directly with batches they build.
    """

    def __init__(self, cfg: Config, vocab_size: int, env: DistEnv,
                 init: Optional[dict[str, Optional[str]]] = None):
        self.cfg, self.env = cfg, env
        t = cfg.train
        check_config(cfg)
        seed_everything(t.seed)  # same initial weights on every rank
        self.model = LanguageModel(cfg.model, vocab_size, dropout=t.dropout, lstm_impl=t.lstm_impl,
                                   lstm_compile=t.lstm_compile, sparse_softmax=t.sparse_softmax)
        if init and init.get("weights"):
            from bilm.pretrained import load_pretrained
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
        perplexity = {d: torch.exp(losses[d].mean.detach().double().clamp(max=50.0)) for d in DIRECTIONS}
        return StepResult(loss.detach(), perplexity, grad_norm.detach(), timings)

    def _set_learning_rate(self) -> None:
        """optim.lr, ramped up linearly over the first optim.warmup_steps steps (bilm-tf: none)."""
        o = self.cfg.optim
        scale = min(1.0, (self.steps_done + 1) / o.warmup_steps) if o.warmup_steps > 0 else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = o.lr * scale

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


# ---------------------------------------------------------------- the loop

def _log_values(result: StepResult, trainer: Trainer, dataset: LMDataset, env: DistEnv, data_time: float,
                tokens_per_second: float) -> dict[str, float]:
    figures = result.values()
    values = {**figures, "loss/forward": math.log(figures["perplexity/forward"]),
              "loss/backward": math.log(figures["perplexity/backward"]),
              "lr": trainer.optimizer.param_groups[0]["lr"], "tokens_per_second": tokens_per_second,
              "epoch": dataset.epoch, "time/data": data_time, **{f"time/{k}": v for k, v in result.timings.items()}}
    if env.device.type == "cuda":
        values["gpu_memory_gb"] = torch.cuda.max_memory_allocated(env.device) / 2**30
    return values


def _total_steps(cfg: Config, n_train_tokens: Optional[int], world_size: int) -> int:
    t = cfg.train
    if t.max_steps:
        return t.max_steps
    if not n_train_tokens:
        raise ValueError("train.n_train_tokens is unknown: pass a manifest.json as --data, "
                         "or --set train.n_train_tokens=N, or --set train.max_steps=N")
    # bilm-tf: n_epochs * n_train_tokens / (batch_size * unroll_steps * n_gpus)
    return max(1, int(t.n_epochs * n_train_tokens / (t.batch_size * t.unroll_steps * world_size)))


class _Logger:
    """Rank 0: JSON-lines metrics file and TensorBoard scalars.

    A run resumed from step S first drops what the interrupted run logged after S (it is
    logged again), so each step appears once in both."""

    def __init__(self, out_dir: str, enabled: bool, resumed_step: int = 0):
        self.enabled = enabled
        self.writer = None
        self.postfix: dict[str, str] = {}  # the progress bar's figures
        if enabled:
            path = os.path.join(out_dir, "metrics.jsonl")
            _truncate_metrics(path, resumed_step)
            self.metrics = open(path, "a", encoding="utf-8")
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"),
                                            purge_step=resumed_step + 1 if resumed_step else None)
            except ImportError:  # tensorboard is a dependency, but never fail training over logs
                warnings.warn("tensorboard not importable; scalars go to metrics.jsonl only")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.postfix = {"loss": f"{values['loss']:.3f}", "ppl_f": f"{values['perplexity/forward']:.1f}",
                        "ppl_b": f"{values['perplexity/backward']:.1f}", "tok_s": f"{values['tokens_per_second']:,.0f}"}
        if not self.enabled:
            return
        self.metrics.write(json.dumps({"step": step, **values}) + "\n")
        self.metrics.flush()
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.metrics.close()
            if self.writer is not None:
                self.writer.close()


def _truncate_metrics(path: str, last_step: int) -> None:
    """Keep the lines of ``metrics.jsonl`` up to ``last_step`` (all of them when it is 0: a fresh run appends)."""
    if not last_step or not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= last_step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                pass  # a line cut short by a kill
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def train(cfg: Config, data: str, out_dir: str, resume: bool = False, vocab_file: Optional[str] = None,
          init: Optional[dict[str, Optional[str]]] = None, progress: bool = True) -> dict:
    """Train and checkpoint into ``out_dir``; returns a summary (rank 0's view)."""
    check_config(cfg)  # before anything is written
    env = init_distributed(cfg.train.device)
    # Rank 0 holds the run directory for the whole run, before anything is written into it.
    lock = RunLock(out_dir).acquire() if env.is_main else None
    ok = False
    try:
        summary = _train(cfg, data, out_dir, resume, vocab_file, init, progress, env)
        ok = True
        return summary
    finally:
        shutdown(barrier=ok)
        if lock is not None:
            lock.release()


def _train(cfg, data, out_dir, resume, vocab_file, init, progress, env: DistEnv) -> dict:
    t = cfg.train
    manifest = load_manifest(data) if data.endswith(".json") else None
    vocab_path = vocab_file or (manifest or {}).get("vocab")
    if vocab_path is None:
        raise ValueError("--vocab is required when --data is a shard glob (a manifest.json names its vocab)")
    vocab = Vocabulary.from_file(vocab_path)
    # How raw text became these tokens: saved in every checkpoint, exported beside the weights.
    text_pipeline = TextPipeline.from_manifest(manifest) if manifest else None
    if init and init.get("weights"):
        if not init.get("options"):
            raise ValueError("--init-weights needs --init-options (the options.json that came with the weights)")
        # The published options decide the architecture; the config keeps the training settings.
        cfg.model = BiLMOptions.from_file(init["options"])
        init = {**init, "vocab_tokens": vocab.tokens}
    tf_start = (init or {}).get("tf")  # a bilm-tf training checkpoint (bilm.continue_tf.TFStart)
    if tf_start is not None:
        if t.strategy == "deepspeed":
            raise ValueError("train.strategy=deepspeed cannot start from a bilm-tf checkpoint (its optimizer "
                             "partitions are made before the weights arrive): use ddp")
        cfg.model = BiLMOptions.from_file(tf_start.options_file)
        if tf_start.keep_vocab:
            vocab = tf_start.vocabulary()
    n_train_tokens = t.n_train_tokens or (manifest or {}).get("n_train_tokens")
    total_steps = _total_steps(cfg, n_train_tokens, env.world_size)

    ckpt_dir = os.path.join(out_dir, "checkpoints")
    if env.is_main:
        os.makedirs(ckpt_dir, exist_ok=True)
        for stale in remove_stale_temporaries(ckpt_dir):
            log.info(f"removed {stale}, left by an interrupted checkpoint write")
        save_config(cfg, os.path.join(out_dir, "config.yaml"))

    trainer = Trainer(cfg, len(vocab), env, init)
    char_inputs = cfg.model.char_cnn is not None
    dataset = LMDataset(data, vocab, t.batch_size, t.unroll_steps, mode="train", seed=t.seed,
                        rank=env.rank, world_size=env.world_size, char_inputs=char_inputs,
                        max_characters_per_token=cfg.model.char_cnn.max_characters_per_token if char_inputs else 50)
    step = 0
    if resume:
        # Rank 0 looks first and sets unreadable checkpoints aside; then the others find the same one.
        # The file is mapped, not read (ranks on a node share its pages); what is kept is copied out
        # and the payload dropped, so neither a second copy of the weights nor the mapping outlives this.
        path, payload = load_latest_valid(ckpt_dir, set_aside_corrupt=True, mmap=True) if env.is_main else (None, None)
        if env.distributed:
            torch.distributed.barrier()
            if not env.is_main:
                path, payload = load_latest_valid(ckpt_dir, mmap=True)
        if payload is not None:
            step = _restore(trainer, dataset, payload, path, env)
            log.info(f"resumed from {path} (step {step})")
        else:
            log.info(f"no checkpoint in {ckpt_dir}; starting from scratch")
        del payload
    if tf_start is not None and step == 0:  # not resumed: a resumed run has it all in its checkpoint
        from bilm.continue_tf import report_line
        log.info(report_line(tf_start.load_into(trainer.model, trainer.optimizer, vocab.tokens)))

    stop = {"signal": 0}

    def on_sigterm(signum, frame):  # clusters send SIGTERM before preemption
        stop["signal"] = 1

    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    logger = _Logger(out_dir, env.is_main, resumed_step=step)
    bar = tqdm(total=total_steps, initial=step, disable=not (progress and env.is_main), unit="step",
               dynamic_ncols=True, desc="train")
    tokens_per_step = t.batch_size * t.unroll_steps * env.world_size  # one direction, all ranks
    last_checkpoint_time = time.time()
    window_start, window_steps = time.perf_counter(), 0
    batches: Iterator[dict] = iter(dataset)
    result: Optional[StepResult] = None
    stopped_by_signal = False
    try:
        while step < total_steps:
            data_start = time.perf_counter()
            batch = next(batches)
            data_time = time.perf_counter() - data_start
            result = trainer.step(batch)
            step += 1
            window_steps += 1
            bar.update(1)
            log_now = step % t.log_every_steps == 0 or step == total_steps
            # Reading the step's figures waits for the device: only when logging, once per interval.
            if log_now:
                logger.log(step, _log_values(result, trainer, dataset, env, data_time,
                                             tokens_per_step * window_steps / max(time.perf_counter() - window_start, 1e-9)))
                bar.set_postfix(**logger.postfix)
                window_start, window_steps = time.perf_counter(), 0

            # Checkpoint and stop: rank 0's clock and anyone's SIGTERM decide. With several ranks they
            # must agree, which takes an all-reduce (a wait for every rank): at log steps and every
            # STOP_CHECK_STEPS, so a preempted run stops within a few steps whatever the log interval.
            due_by_time = env.is_main and (time.time() - last_checkpoint_time) >= 60 * t.checkpoint_every_minutes
            signal_seen, time_due = float(stop["signal"]), float(due_by_time)
            if env.distributed:
                agree_now = log_now or step % STOP_CHECK_STEPS == 0
                signal_seen, time_due = all_reduce_max([signal_seen, time_due], env) if agree_now else (0.0, 0.0)
            if step % t.checkpoint_every_steps == 0 or time_due or signal_seen or step == total_steps:
                _save(trainer, dataset, cfg, step, ckpt_dir, env, text_pipeline)
                last_checkpoint_time = time.time()
            if signal_seen:
                stopped_by_signal = True
                break
    finally:
        bar.close()
        logger.close()
        signal.signal(signal.SIGTERM, previous_handler)
    figures = result.values() if result else None
    return {"step": step, "total_steps": total_steps, "loss": figures["loss"] if figures else None,
            "perplexity": {d: figures[f"perplexity/{d}"] for d in DIRECTIONS} if figures else None, "out_dir": out_dir,
            "checkpoint": checkpoint_path(ckpt_dir, step), "stopped_by_signal": stopped_by_signal,
            "is_main": env.is_main}


def _save(trainer: Trainer, dataset: LMDataset, cfg: Config, step: int, ckpt_dir: str, env: DistEnv,
          text_pipeline: Optional[TextPipeline] = None) -> None:
    """Write step ``step``'s checkpoint (rank 0, plus what the strategy keeps beside it on every rank)
    and prune old ones. A failed write on any rank stops every rank with ``CheckpointWriteError``,
    the previous checkpoints intact."""
    rank_states = gather_objects(trainer.rank_state(dataset), env)
    error: Optional[str] = None
    try:
        tag = trainer.strategy.save(ckpt_dir, f"step-{step:08d}")
        if env.is_main:
            payload = {"step": step, "config": config_to_dict(cfg), "model": trainer.model.state_dict(),
                       "optimizer": trainer.strategy.optimizer_state(), "deepspeed_tag": tag,
                       "world_size": env.world_size, "rank_states": rank_states,
                       "vocab": dataset.vocab.tokens,
                       "text_pipeline": text_pipeline.to_state() if text_pipeline is not None else None}
            save_checkpoint(payload, checkpoint_path(ckpt_dir, step))
    except (CheckpointWriteError, OSError) as e:
        error = str(e) if isinstance(e, CheckpointWriteError) else f"cannot write checkpoint of step {step} in " \
            f"{ckpt_dir}: {e.strerror or e}"
    failed = all_reduce_max([float(error is not None)], env)[0] if env.distributed else float(error is not None)
    if failed:
        raise CheckpointWriteError(error or f"another rank could not write the checkpoint of step {step}")
    if env.is_main:
        trainer.strategy.prune(ckpt_dir, prune_checkpoints(ckpt_dir, cfg.train.keep_checkpoints))
    if env.distributed:
        torch.distributed.barrier()


def _restore(trainer: Trainer, dataset: LMDataset, payload: dict, path: str, env: DistEnv) -> int:
    load_model_state(trainer.model, payload["model"], path)
    trainer.steps_done = int(payload["step"])
    trainer.strategy.load(payload, path)
    if payload.get("rank_states") is None:
        # e.g. imported from bilm-tf, whose restart also starts them afresh
        log.info(f"{path} holds no data positions or LSTM states: they start afresh")
    elif payload["world_size"] == env.world_size:
        trainer.load_rank_state(payload["rank_states"][env.rank], dataset)
    elif env.is_main:
        warnings.warn(f"{path} was written by {payload['world_size']} ranks, this run has {env.world_size}: "
                      "model and optimizer resume, data order and LSTM states start afresh")
    return int(payload["step"])
