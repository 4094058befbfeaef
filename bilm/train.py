"""``bilm train``: the biLM training loop, read top to bottom.

One process per device under torchrun. Dense gradients are averaged by DDP (NCCL on GPU,
gloo on CPU); the softmax, whose gradient touches only the sampled and target rows, is
kept out of DDP and its sparse gradient is all-gathered (``all_reduce_gradients_``), so a
step does no O(V x projection_dim) communication or optimizer work. ``strategy: deepspeed``
hands the same model to DeepSpeed (ZeRO 1/2) with a dense softmax instead.
"""
from __future__ import annotations

import contextlib
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
from torch import nn
from tqdm import tqdm

from bilm.checkpoint import (CheckpointWriteError, RunLock, checkpoint_path, deepspeed_dir, load_latest_valid,
                             load_model_state, prune_checkpoints, remove_stale_temporaries, save_checkpoint)
from bilm.config import Config, config_to_dict, save_config
from bilm.data import LMDataset, load_manifest
from bilm.distributed import DistEnv, all_reduce_max, gather_objects, init_distributed, shutdown
from bilm.model import DIRECTIONS, LanguageModel
from bilm.modules.softmax import all_reduce_gradients_, clip_grad_norm_
from bilm.options import BiLMOptions
from bilm.vocab import Vocabulary
from data_tools.normalize import TextPipeline

# Adagrad's sparse update builds COO tensors from indices it made itself; the note is noise.
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


# ---------------------------------------------------------------- setup helpers

def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "adagrad":
        # bilm-tf: Adagrad, lr 0.2, initial accumulator 1.0. It updates only the rows a sparse
        # softmax gradient touched. The softmax gets its own group: torch falls back to its slow
        # per-tensor path for every parameter of a group that holds a sparse gradient. Dense
        # softmax gradients (DeepSpeed) keep one group: ZeRO's flat partitions expect that.
        softmax = list(model.softmax.parameters())
        dense = [p for p in params if all(p is not s for s in softmax)]
        groups = [{"params": dense}, {"params": softmax}] if model.softmax.sparse else [{"params": params}]
        return torch.optim.Adagrad(groups, lr=o.lr,
                                   initial_accumulator_value=o.initial_accumulator_value, weight_decay=o.weight_decay)
    if o.name == "adam":
        sparse = [p for n, p in model.named_parameters() if n.startswith("softmax.") and model.softmax.sparse]
        dense = [p for p in params if all(p is not s for s in sparse)]
        if sparse:
            return _MultiOptimizer([torch.optim.Adam(dense, lr=o.lr, betas=tuple(o.adam_betas), eps=o.adam_eps),
                                    torch.optim.SparseAdam(sparse, lr=o.lr, betas=tuple(o.adam_betas), eps=o.adam_eps)])
        return torch.optim.Adam(dense, lr=o.lr, betas=tuple(o.adam_betas), eps=o.adam_eps,
                                weight_decay=o.weight_decay)
    raise ValueError(f"optim.name must be 'adagrad' or 'adam', got {o.name!r}")


class _MultiOptimizer:
    """Adam for dense parameters plus SparseAdam for the sparse softmax, stepped together."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state):
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)


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


def state_to(state, device):
    if state is None:
        return None
    return {d: None if layers is None else [tuple(t.to(device) for t in layer) for layer in layers]
            for d, layers in state.items()}


# ---------------------------------------------------------------- one step

@dataclass
class StepResult:
    loss: float
    perplexity: dict[str, float]
    grad_norm: float
    timings: dict[str, float] = field(default_factory=dict)


class Trainer:
    """Owns the model, optimizer, carried LSTM states and sampling generator of one rank.

    ``step(batch)`` is one optimizer step; the loop in ``train`` adds data, logging and
    checkpoints around it. Tests drive ``step`` directly with batches they build.
    """

    def __init__(self, cfg: Config, vocab_size: int, env: DistEnv,
                 init: Optional[dict[str, Optional[str]]] = None):
        self.cfg, self.env = cfg, env
        t = cfg.train
        self.deepspeed = t.strategy == "deepspeed"
        seed_everything(t.seed)  # same initial weights on every rank
        self.model = LanguageModel(cfg.model, vocab_size, dropout=t.dropout, lstm_impl=t.lstm_impl, lstm_compile=t.lstm_compile,
                                   sparse_softmax=t.sparse_softmax and not self.deepspeed)
        if init and init.get("weights"):
            from bilm.export import load_pretrained
            report = load_pretrained(self.model, init["weights"], init.get("options"), init.get("softmax"),
                                     init.get("softmax_vocab"), init.get("vocab_tokens"))
            if env.is_main:
                print(f"initialized from {init['weights']}"
                      + (f" (softmax: {report['softmax_rows_loaded']} rows from {init['softmax']})" if init.get("softmax") else
                         " (softmax freshly initialized)"))
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
        self.timing = False
        if self.deepspeed:
            self._init_deepspeed()
        else:
            self.optimizer = build_optimizer(cfg, self.model)
            self.forward_module: nn.Module = self.model
            if env.distributed:
                from torch.nn.parallel import DistributedDataParallel as DDP
                # The sparse softmax is reduced by hand (all-gather of touched rows), not by DDP.
                DDP._set_params_and_buffers_to_ignore_for_model(self.model, ["softmax.weight", "softmax.bias"])
                self.forward_module = DDP(self.model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                                          )

    def _init_deepspeed(self) -> None:
        import deepspeed
        import torch.distributed as dist

        t = self.cfg.train
        if not dist.is_initialized():
            # A single process outside torchrun: DeepSpeed still wants a process group (else it
            # looks for MPI). Give it a one-member group on a free local port.
            import socket
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(port))
            for key in ("RANK", "LOCAL_RANK"):
                os.environ.setdefault(key, "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            dist.init_process_group("nccl" if self.env.device.type == "cuda" else "gloo", init_method="env://",
                                    rank=0, world_size=1)
        with open(t.deepspeed_config) as f:
            ds_config = json.load(f)
        # Batches are packed by bilm.data; DeepSpeed sees one "sample" per step per rank.
        ds_config["train_micro_batch_size_per_gpu"] = 1
        ds_config["gradient_accumulation_steps"] = 1
        ds_config["train_batch_size"] = self.env.world_size
        ds_config.setdefault("gradient_clipping", self.cfg.optim.max_grad_norm)
        if self.env.device.type != "cuda":
            ds_config.pop("bf16", None)
            ds_config.pop("fp16", None)
        ds_config.setdefault("zero_allow_untested_optimizer", True)
        optimizer = build_optimizer(self.cfg, self.model)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=self.model, optimizer=optimizer,
                                                                 config=ds_config)
        self.forward_module = self.engine

    def autocast(self):
        """bf16 autocast on GPUs and CPUs alike (the LSTM cell state and the softmax stay fp32)."""
        if self.cfg.train.precision == "bf16" and not self.deepspeed:
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _sync(self):
        if self.timing and self.env.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def step(self, batch: dict) -> StepResult:
        t = self.cfg.train
        self.model.train()
        timings = {}
        start = self._sync()
        batch = to_device(batch, self.env.device)
        self._set_learning_rate()
        with self.autocast():
            loss, losses, self.state = self.forward_module(batch, self.state, t.n_negative_samples_batch, self.generator)
        after_forward = self._sync()
        timings["forward"] = after_forward - start
        if self.deepspeed:
            self.engine.backward(loss * self.loss_scale)
            after_backward = self._sync()
            self.engine.step()
            grad_norm = float(self.engine.get_global_grad_norm() or 0.0)
            done = self._sync()
            timings.update(backward=after_backward - after_forward, optimizer=done - after_backward)
        else:
            (loss * self.loss_scale).backward()
            after_backward = self._sync()
            if self.env.distributed:
                all_reduce_gradients_(list(self.model.softmax.parameters()))
            after_comm = self._sync()
            grad_norm = float(clip_grad_norm_(list(self.model.parameters()), self.cfg.optim.max_grad_norm))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            done = self._sync()
            timings.update(backward=after_backward - after_forward, communication=after_comm - after_backward,
                           optimizer=done - after_comm)
        self.steps_done += 1
        perplexity = {d: math.exp(min(float(losses[d].mean.detach()), 50.0)) for d in DIRECTIONS}
        return StepResult(float(loss.detach()), perplexity, grad_norm, timings)

    def _set_learning_rate(self) -> None:
        """optim.lr, ramped up linearly over the first optim.warmup_steps steps (bilm-tf: none)."""
        o = self.cfg.optim
        scale = min(1.0, (self.steps_done + 1) / o.warmup_steps) if o.warmup_steps > 0 else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = o.lr * scale

    # ----- checkpoint state -----
    def rank_state(self, dataset: Optional[LMDataset]) -> dict:
        return {"data": dataset.state_dict() if dataset is not None else None, "rng": rng_state(),
                "generator": self.generator.get_state(), "lstm_state": state_to(self.state, "cpu")}

    def load_rank_state(self, state: dict, dataset: Optional[LMDataset]) -> None:
        if dataset is not None and state["data"] is not None:
            dataset.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        self.generator.set_state(state["generator"])
        self.state = state_to(state["lstm_state"], self.env.device)


# ---------------------------------------------------------------- the loop

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
    n_train_tokens = t.n_train_tokens or (manifest or {}).get("n_train_tokens")
    total_steps = _total_steps(cfg, n_train_tokens, env.world_size)

    ckpt_dir = os.path.join(out_dir, "checkpoints")
    if env.is_main:
        os.makedirs(ckpt_dir, exist_ok=True)
        for stale in remove_stale_temporaries(ckpt_dir):
            print(f"removed {stale}, left by an interrupted checkpoint write")
        save_config(cfg, os.path.join(out_dir, "config.yaml"))

    trainer = Trainer(cfg, len(vocab), env, init)
    char_inputs = cfg.model.char_cnn is not None
    dataset = LMDataset(data, vocab, t.batch_size, t.unroll_steps, mode="train", seed=t.seed,
                        rank=env.rank, world_size=env.world_size, char_inputs=char_inputs,
                        max_characters_per_token=cfg.model.char_cnn.max_characters_per_token if char_inputs else 50)
    step = 0
    if resume:
        # Rank 0 looks first and sets unreadable checkpoints aside; then the others find the same one.
        path, payload = load_latest_valid(ckpt_dir, set_aside_corrupt=True) if env.is_main else (None, None)
        if env.distributed:
            torch.distributed.barrier()
            if not env.is_main:
                path, payload = load_latest_valid(ckpt_dir)
        if payload is not None:
            step = _restore(trainer, dataset, payload, path, env)
            if env.is_main:
                print(f"resumed from {path} (step {step})")
        elif env.is_main:
            print(f"no checkpoint in {ckpt_dir}; starting from scratch")

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

            if step % t.log_every_steps == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                tokens_per_second = tokens_per_step * window_steps / max(elapsed, 1e-9)
                values = {"loss": result.loss, "perplexity/forward": result.perplexity["forward"],
                          "perplexity/backward": result.perplexity["backward"],
                          "loss/forward": math.log(result.perplexity["forward"]),
                          "loss/backward": math.log(result.perplexity["backward"]),
                          "grad_norm": result.grad_norm, "lr": trainer.optimizer.param_groups[0]["lr"],
                          "tokens_per_second": tokens_per_second, "epoch": dataset.epoch,
                          "time/data": data_time, **{f"time/{k}": v for k, v in result.timings.items()}}
                if env.device.type == "cuda":
                    values["gpu_memory_gb"] = torch.cuda.max_memory_allocated(env.device) / 2**30
                logger.log(step, values)
                bar.set_postfix(loss=f"{result.loss:.3f}", ppl_f=f"{result.perplexity['forward']:.1f}",
                                ppl_b=f"{result.perplexity['backward']:.1f}", tok_s=f"{tokens_per_second:,.0f}")
                window_start, window_steps = time.perf_counter(), 0
            bar.update(1)

            # Every rank must agree on checkpoint/stop: rank 0's clock and anyone's SIGTERM decide.
            due_by_time = env.is_main and (time.time() - last_checkpoint_time) >= 60 * t.checkpoint_every_minutes
            signal_seen, time_due = all_reduce_max([float(stop["signal"]), float(due_by_time)], env)
            due = (step % t.checkpoint_every_steps == 0) or bool(time_due) or bool(signal_seen) or step == total_steps
            if due:
                _save(trainer, dataset, cfg, step, ckpt_dir, env, text_pipeline)
                last_checkpoint_time = time.time()
            if signal_seen:
                stopped_by_signal = True
                break
    finally:
        bar.close()
        logger.close()
        signal.signal(signal.SIGTERM, previous_handler)
    return {"step": step, "total_steps": total_steps, "loss": result.loss if result else None,
            "perplexity": result.perplexity if result else None, "out_dir": out_dir,
            "checkpoint": checkpoint_path(ckpt_dir, step), "stopped_by_signal": stopped_by_signal,
            "is_main": env.is_main}


def _save(trainer: Trainer, dataset: LMDataset, cfg: Config, step: int, ckpt_dir: str, env: DistEnv,
          text_pipeline: Optional[TextPipeline] = None) -> None:
    """Write step ``step``'s checkpoint (rank 0; DeepSpeed: every rank its shard) and prune old ones.
    A failed write on any rank stops every rank with ``CheckpointWriteError``, the previous
    checkpoints intact."""
    rank_states = gather_objects(trainer.rank_state(dataset), env)
    error: Optional[str] = None
    try:
        if trainer.deepspeed:
            # DeepSpeed shards optimizer state: every rank writes its part under the same tag.
            trainer.engine.save_checkpoint(deepspeed_dir(ckpt_dir), tag=f"step-{step:08d}")
        if env.is_main:
            payload = {"step": step, "config": config_to_dict(cfg), "model": trainer.model.state_dict(),
                       "optimizer": None if trainer.deepspeed else trainer.optimizer.state_dict(),
                       "deepspeed_tag": f"step-{step:08d}" if trainer.deepspeed else None,
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
        prune_checkpoints(ckpt_dir, cfg.train.keep_checkpoints)
    if env.distributed:
        torch.distributed.barrier()


def _restore(trainer: Trainer, dataset: LMDataset, payload: dict, path: str, env: DistEnv) -> int:
    load_model_state(trainer.model, payload["model"], path)
    trainer.steps_done = int(payload["step"])
    if trainer.deepspeed and payload.get("deepspeed_tag"):
        trainer.engine.load_checkpoint(deepspeed_dir(os.path.dirname(path)), tag=payload["deepspeed_tag"])
    elif trainer.deepspeed:
        if env.is_main:
            warnings.warn(f"{path} holds no DeepSpeed state: the model resumes, the optimizer starts afresh")
    else:
        trainer.optimizer.load_state_dict(payload["optimizer"])
    if payload.get("rank_states") is None:
        if env.is_main:  # e.g. imported from bilm-tf, whose restart also starts them afresh
            print(f"{path} holds no data positions or LSTM states: they start afresh")
    elif payload["world_size"] == env.world_size:
        trainer.load_rank_state(payload["rank_states"][env.rank], dataset)
    elif env.is_main:
        warnings.warn(f"{path} was written by {payload['world_size']} ranks, this run has {env.world_size}: "
                      "model and optimizer resume, data order and LSTM states start afresh")
    return int(payload["step"])
