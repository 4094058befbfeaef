"""``bilm train``: the biLM training run, read top to bottom: set up (vocab, text pipeline, model,
data, heldout sample, guard), resume, loop (data, step, log, evaluate, checkpoint, stop), close.

One process per device under torchrun. ``TrainStep.step`` (``bilm.training.step``) is one optimizer
step; how the gradients are communicated, clipped and applied (DDP with a sparse softmax, or
DeepSpeed ZeRO) is the strategy's business (``bilm.training.strategy``); when to checkpoint, what a
checkpoint holds and how a run resumes or rolls back is the ``Checkpointer``'s
(``bilm.training.checkpointer``). So the loop reads the same for all: data, step, log (where the
loop reads figures back from the device), checkpoint, stop.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from bilm.core.atomic import atomic_open
from bilm.runs.lock import RunLock
from bilm.training.checkpointer import Checkpointer
from bilm.runs.config import Config, save_config
from bilm.data import LMDataset, load_manifest
from bilm.core.distributed import DistEnv, init_distributed, shutdown
from bilm.core.errors import InputError
from bilm.training.guard import TRAINING_LOSS_WINDOW, Divergence, DivergenceGuard, GuardState
from bilm.training.heldout import figures as heldout_figures, no_heldout_message, prepare_heldout
from bilm.core.logs import log
from bilm.modules.language_model import DIRECTIONS
from bilm.core.options import BiLMOptions
from bilm.core.progress import progress_bar
from bilm.scoring.perplexity import figure, json_safe
from bilm.training.step import StepResult, TrainStep
from bilm.training.strategy import check_config
from bilm.core.vocab import Vocabulary
from bilm.core.text import TextPipeline

# Adagrad's sparse update builds COO tensors from indices it made itself; the note is noise.
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")

# Under torchrun, ranks agree on SIGTERM and the checkpoint clock at least this often (an all-reduce).
STOP_CHECK_STEPS = 10


# ---------------------------------------------------------------- the loop

def _log_values(result: StepResult, trainer: TrainStep, dataset: LMDataset, env: DistEnv, data_time: float,
                tokens_per_second: float) -> dict[str, float]:
    values = {**result.values(), "lr": trainer.optimizer.param_groups[0]["lr"], "tokens_per_second": tokens_per_second,
              "epoch": dataset.epoch, "time/data": data_time, **{f"time/{k}": v for k, v in result.timings.items()}}
    if env.device.type == "cuda":
        values["gpu_memory_gb"] = torch.cuda.max_memory_allocated(env.device) / 2**30
    return values


def _total_steps(cfg: Config, n_train_tokens: Optional[int], world_size: int) -> int:
    t = cfg.train
    if t.max_steps:
        return t.max_steps
    if not n_train_tokens:
        raise InputError("train.n_train_tokens is unknown: pass a manifest.json as --data, "
                         "or --set train.n_train_tokens=N, or --set train.max_steps=N")
    # bilm-tf: n_epochs * n_train_tokens / (batch_size * unroll_steps * n_gpus)
    return max(1, int(t.n_epochs * n_train_tokens / (t.batch_size * t.unroll_steps * world_size)))


class _Logger:
    """Rank 0: JSON-lines metrics file and TensorBoard scalars.

    Each line of ``metrics.jsonl`` is one step's figures (``{"step": N, ...}``: training figures at log
    steps, heldout perplexity at evaluations) or an event of the divergence guard (``{"event":
    "divergence", ...}``, no ``step`` key). A run resumed from a checkpoint first drops what was
    logged after that checkpoint was written (it is logged again), so each step appears once;
    a rollback does the same, moving the dropped step lines to ``metrics-rolled-back.jsonl``.
    A figure that is not a finite number (a perplexity past float range, a NaN loss) is written as
    the string ``"inf"``, ``"-inf"`` or ``"nan"`` (``json_safe``), every line stays JSON, and the
    mean loss stands beside each perplexity (``loss/forward``, ``heldout_loss/forward``, ...)."""

    def __init__(self, out_dir: str, enabled: bool, resumed_step: int = 0, offset: Optional[int] = None):
        self.enabled, self.out_dir = enabled, out_dir
        self.writer = None
        self.postfix: dict[str, str] = {}  # the progress bar's figures
        if enabled:
            self.path = os.path.join(out_dir, "metrics.jsonl")
            _truncate_metrics(self.path, resumed_step, offset)
            self.metrics = open(self.path, "a", encoding="utf-8")
            self._open_writer(resumed_step)

    def _open_writer(self, resumed_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(self.out_dir, "tensorboard"),
                                        purge_step=resumed_step + 1 if resumed_step else None)
        except ImportError:  # tensorboard is a dependency, but never fail training over logs
            warnings.warn("tensorboard not importable; scalars go to metrics.jsonl only")

    def log(self, step: int, values: dict[str, float]) -> None:
        shown = {"loss": ("loss", "{:.3f}"), "perplexity/forward": ("ppl_f", "{:.1f}"),
                 "perplexity/backward": ("ppl_b", "{:.1f}"), "heldout_perplexity/forward": ("heldout_f", "{:.1f}"),
                 "heldout_perplexity/backward": ("heldout_b", "{:.1f}"), "tokens_per_second": ("tok_s", "{:,.0f}")}
        for key, (name, form) in shown.items():
            if key in values:
                self.postfix[name] = figure(values[key], form)
        if not self.enabled:
            return
        self.metrics.write(json.dumps(json_safe({"step": step, **values})) + "\n")
        self.metrics.flush()
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def event(self, record: dict, step: int, scalars: dict[str, float]) -> None:
        """A line of its own in metrics.jsonl, and ``scalars`` at ``step`` in TensorBoard."""
        if not self.enabled:
            return
        self.metrics.write(json.dumps(json_safe(record)) + "\n")
        self.metrics.flush()
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def offset(self) -> Optional[int]:
        """Where metrics.jsonl ends now (saved in each checkpoint: a resume cuts the file there)."""
        return self.metrics.tell() if self.enabled else None

    def rewind(self, step: int, offset: Optional[int]) -> None:
        """Back to the checkpoint of ``step`` (a rollback): later lines move to metrics-rolled-back.jsonl."""
        if not self.enabled:
            return
        self.metrics.close()
        removed = _truncate_metrics(self.path, step, offset)
        events = [line for line in removed if line.startswith('{"event"')]  # earlier firings stay in the record
        if len(removed) > len(events):
            with open(os.path.join(self.out_dir, "metrics-rolled-back.jsonl"), "a", encoding="utf-8") as f:
                f.writelines(line for line in removed if not line.startswith('{"event"'))
        self.metrics = open(self.path, "a", encoding="utf-8")
        self.metrics.writelines(events)
        self.metrics.flush()
        if self.writer is not None:
            self.writer.close()
            self._open_writer(step)

    def close(self) -> None:
        if self.enabled:
            self.metrics.close()
            if self.writer is not None:
                self.writer.close()


def _truncate_metrics(path: str, last_step: int, offset: Optional[int] = None) -> list[str]:
    """Cut ``metrics.jsonl`` back to where it ended when the checkpoint of ``last_step`` was written:
    at ``offset`` (its length then, saved in the checkpoint), or, for checkpoints that did not save
    it, after the lines of steps up to ``last_step``. Nothing is cut when ``last_step`` is 0 (a fresh
    run appends). Returns the lines removed."""
    if not last_step or not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if offset is not None and offset <= len(text.encode("utf-8")):
        data = text.encode("utf-8")
        kept, removed = [data[:offset].decode("utf-8")], data[offset:].decode("utf-8").splitlines(keepends=True)
    else:
        kept, removed = [], []
        for line in text.splitlines(keepends=True):
            try:
                keep = json.loads(line)["step"] <= last_step
            except (ValueError, KeyError, TypeError):
                keep = False  # a line cut short by a kill, or an event of a later step
            (kept if keep else removed).append(line)
    with atomic_open(path) as f:
        f.writelines(kept)
    return removed


def train(cfg: Config, data: str, out_dir: str, resume: bool = False, vocab_file: Optional[str] = None,
          init: Optional[dict[str, Optional[str]]] = None, progress: bool = True,
          eval_data: Optional[str] = None) -> dict:
    """Train and checkpoint into ``out_dir``; returns a summary (rank 0's view). ``eval_data``: the
    heldout data to watch (a manifest.json or raw text; default: the manifest's heldout split)."""
    check_config(cfg)  # before anything is written
    if vocab_file is None and not data.endswith(".json"):
        raise InputError(f"--data {data}: no manifest.json, so no vocabulary: prepare the text first (bilm "
                         f"prepare {data} --out DIR, then --data DIR/manifest.json), or give --vocab for "
                         "shards you tokenized yourself")
    env = init_distributed(cfg.train.device)
    # Rank 0 holds the run directory for the whole run, before anything is written into it.
    lock = RunLock(out_dir).acquire() if env.is_main else None
    ok = False
    try:
        summary = _train(cfg, data, out_dir, resume, vocab_file, init, progress, env, eval_data)
        ok = True
        return summary
    finally:
        shutdown(barrier=ok)
        if lock is not None:
            lock.release()


class _LossWatch:
    """What the guard needs of the training figures, tracked on the device (no wait for it each step)
    and read where the loop reads figures anyway: the first step whose training loss or gradient
    norm was not finite, and the first step whose per-direction loss averaged over the last
    ``TRAINING_LOSS_WINDOW`` steps (fewer since the watch started) passed ``bound``, with those
    averages. The average fires once on the way up: after a firing it is armed again only once an
    average is back at or below the bound."""

    def __init__(self, device: torch.device, bound: Optional[float]):
        self.device, self.bound = device, bound
        self.window = torch.zeros(TRAINING_LOSS_WINDOW, len(DIRECTIONS), dtype=torch.float64, device=device)
        self.seen = 0  # steps since the watch started (a host count: indexing by it reads nothing back)
        self.watch_finite = True
        self.first_bad = torch.zeros((), dtype=torch.int64, device=device)
        self.armed = torch.ones((), dtype=torch.bool, device=device)
        self.rearm()

    def forget_non_finite(self) -> None:
        """Stop watching for non-finite figures (one has been acted on, and they stay so)."""
        self.watch_finite = False
        self.first_bad = torch.zeros((), dtype=torch.int64, device=self.device)

    def rearm(self) -> None:
        """Forget the last high average (it has been acted on)."""
        self.first_high = torch.zeros((), dtype=torch.int64, device=self.device)
        self.high_mean = torch.zeros(len(DIRECTIONS), dtype=torch.float64, device=self.device)

    def update(self, result: StepResult, step: int) -> None:
        if self.watch_finite:
            bad = ~(torch.isfinite(result.loss) & torch.isfinite(result.grad_norm))
            self.first_bad = torch.where(bad & (self.first_bad == 0), step, self.first_bad)
        if self.bound is None:
            return
        self.window[self.seen % TRAINING_LOSS_WINDOW] = torch.stack([result.mean_loss[d] for d in DIRECTIONS])
        self.seen += 1
        mean = self.window[:min(self.seen, TRAINING_LOSS_WINDOW)].mean(dim=0)
        high = (mean > self.bound).any()
        fire = high & self.armed & (self.first_high == 0)
        self.first_high = torch.where(fire, step, self.first_high)
        self.high_mean = torch.where(fire, mean, self.high_mean)
        self.armed = (self.armed & ~fire) | (mean <= self.bound).all()

    def read(self) -> tuple[int, int, list[float]]:
        """(the first non-finite step, the first step of a high average, its averages per direction); 0: none."""
        return int(self.first_bad), int(self.first_high), self.high_mean.tolist()

    def steps_averaged(self, step: int, last_step: int) -> int:
        """How many steps the average of ``step`` (at most ``last_step``, the newest) was over."""
        return min(TRAINING_LOSS_WINDOW, self.seen - (last_step - step))


def _train(cfg, data, out_dir, resume, vocab_file, init, progress, env: DistEnv, eval_data=None) -> dict:
    run = _Run(cfg, data, out_dir, vocab_file, init, env, eval_data)
    run.resume(resume)
    run.loop(progress)
    return run.summary()


@dataclass
class _Due:
    """What this step must do besides training, as all ranks agree on it."""
    save: bool
    evaluate: bool
    check: bool
    signal_seen: bool
    bad_step: int
    high_step: int = 0                          # the training-loss average past the bound: its step ...
    high_mean: Optional[list[float]] = None     # ... and its values per direction


class _Run:
    """One training run: set up (``__init__``), resumed, then the loop; each part of a step is a
    method (train, agree on what is due, evaluate, respond to a divergence, checkpoint)."""

    # ------------------------------------------------------------ set up

    def __init__(self, cfg: Config, data: str, out_dir: str, vocab_file: Optional[str], init: Optional[dict],
                 env: DistEnv, eval_data: Optional[str]):
        self.cfg, self.out_dir, self.env = cfg, out_dir, env
        t = cfg.train
        manifest = load_manifest(data) if data.endswith(".json") else None
        self.vocab_path = vocab_file or (manifest or {}).get("vocab")
        if not isinstance(self.vocab_path, str):
            raise InputError(f"{data}: key 'vocab' must name the vocabulary file (or give --vocab)")
        self.vocab = Vocabulary.from_file(self.vocab_path)
        # How raw text became these tokens: saved in every checkpoint, exported beside the weights.
        text_pipeline = TextPipeline.from_manifest(manifest) if manifest else None
        init = self._starting_point(init)
        n_train_tokens = t.n_train_tokens or (manifest or {}).get("n_train_tokens")
        self.total_steps = _total_steps(cfg, n_train_tokens, env.world_size)

        self.checkpoints = Checkpointer(out_dir, cfg, env, text_pipeline)
        if env.is_main:
            self.checkpoints.prepare_directory()
            save_config(cfg, os.path.join(out_dir, "config.yaml"))

        self.trainer = TrainStep(cfg, len(self.vocab), env, init)
        self.trainer.total_steps = self.total_steps
        char_inputs = cfg.model.char_cnn is not None
        self.dataset = LMDataset(data, self.vocab, t.batch_size, t.unroll_steps, mode="train", seed=t.seed,
                                 rank=env.rank, world_size=env.world_size, char_inputs=char_inputs,
                                 max_characters_per_token=cfg.model.char_cnn.max_characters_per_token
                                 if char_inputs else 50)
        self.heldout = prepare_heldout(cfg, manifest, eval_data, out_dir, self.vocab, text_pipeline, env)
        log.info(self._heldout_line(manifest))
        self.guard = DivergenceGuard(t.divergence_factor, self.heldout.unigram if self.heldout else None,
                                     vocab_size=len(self.vocab), loss_factor=t.divergence_loss_factor)
        self.step, self.metrics_offset = 0, None
        self.result: Optional[StepResult] = None
        self.stopped_by_signal = False
        self.diverged: Optional[str] = None

    def _starting_point(self, init: Optional[dict]) -> Optional[dict]:
        """Published weights or a bilm-tf checkpoint to start from: their options decide the
        architecture (the config keeps the training settings)."""
        if init and init.get("weights"):
            if not init.get("options"):
                raise InputError("--init-weights needs --init-options (the options.json that came with the weights)")
            self.cfg.model = BiLMOptions.from_file(init["options"])
            init = {**init, "vocab_tokens": self.vocab.tokens}
        # A bilm-tf checkpoint (bilm.commands.continue_tf.TFStart, handed in: training does not import it).
        self.tf_start = (init or {}).get("tf")
        if self.tf_start is not None:
            if self.cfg.train.strategy == "deepspeed":
                raise InputError("train.strategy=deepspeed cannot start from a bilm-tf checkpoint (its optimizer "
                                 "partitions are made before the weights arrive): use ddp")
            self.cfg.model = BiLMOptions.from_file(self.tf_start.options_file)
            if self.tf_start.keep_vocab:
                self.vocab = self.tf_start.vocabulary()
        return init

    def _heldout_line(self, manifest: Optional[dict]) -> str:
        heldout, t = self.heldout, self.cfg.train
        if heldout is None:
            return no_heldout_message(manifest, t.eval_tokens, t.eval_every_steps, t.divergence_loss_factor)
        unigram = (f"; add-one unigram perplexity of the training counts: forward {heldout.unigram['forward']:,.1f}, "
                   f"backward {heldout.unigram['backward']:,.1f}") if heldout.unigram else \
            "; no vocab_counts.tsv, so no unigram bound"
        return (f"heldout perplexity every {t.eval_every_steps} steps and at the end on {heldout.n_sentences:,} "
                f"sentences ({heldout.n_tokens:,} tokens) of {heldout.source}, written to {heldout.path}, "
                f"{heldout.dataset.batch_size * self.env.world_size} streams carrying their states{unigram}")

    def resume(self, resume: bool) -> None:
        """Continue from the newest valid checkpoint (``resume``), or start: then a bilm-tf
        checkpoint, if any, is loaded (a resumed run has it all in its checkpoint)."""
        resumed = self.checkpoints.resume(self.trainer, self.dataset, self.vocab.tokens, self.vocab_path) \
            if resume else None
        if resumed is not None:
            self.step, health = resumed
            self.guard.state = GuardState.from_dict(health["guard"])
            self.trainer.lr_factor = self.guard.state.lr_factor
            self.metrics_offset = health["metrics_bytes"]
        if self.tf_start is not None and self.step == 0:
            log.info(self.tf_start.start(self.trainer.model, self.trainer.optimizer, self.vocab.tokens))

    # ------------------------------------------------------------ the loop

    def loop(self, progress: bool) -> None:
        t, env = self.cfg.train, self.env
        self.checkpoints.start()
        self.logger = _Logger(self.out_dir, env.is_main, resumed_step=self.step, offset=self.metrics_offset)
        self.bar = progress_bar(total=self.total_steps, initial=self.step, disable=not (progress and env.is_main),
                                unit="step", dynamic_ncols=True, desc="train")
        self.tokens_per_step = t.batch_size * t.unroll_steps * env.world_size  # one direction, all ranks
        self.window_start, self.window_steps = time.perf_counter(), 0
        self.batches: Iterator[dict] = iter(self.dataset)
        self.watch = _LossWatch(env.device, self.guard.loss_bound)
        try:
            while self.step < self.total_steps:
                values = self._train_step()
                due = self._agree(bool(values))
                divergence = self._check_training(due)
                heldout_result, best = None, False
                if due.evaluate and divergence is None and not due.signal_seen:
                    heldout_result, divergence, best = self._evaluate(values)
                    due.save = due.save or best
                elif self.heldout is None and divergence is None and due.check:
                    self.guard.record_healthy(self.step)  # no heldout data: finite is all the guard can tell
                if values:
                    self.logger.log(self.step, values)
                    self.bar.set_postfix(**self.logger.postfix, refresh=False)

                if divergence is not None:
                    outcome = self._respond(divergence, heldout_result, due)
                    if outcome == "rolled back":
                        continue
                    if outcome == "stopped":
                        break

                if due.save:
                    self.checkpoints.save(self.trainer, self.dataset, self.step,
                                          _guard_payload(self.guard, heldout_result, self.logger),
                                          healthy_step=self.guard.state.healthy_step, best=best)
                if due.signal_seen:
                    self.stopped_by_signal = True
                    break
        finally:
            self.bar.close()
            self.logger.close()
            self.checkpoints.close()

    def _train_step(self) -> dict[str, float]:
        """One optimizer step; its figures when this is a log step (reading them waits for the device:
        only then, once per interval), else an empty dict."""
        t = self.cfg.train
        data_start = time.perf_counter()
        batch = next(self.batches)
        data_time = time.perf_counter() - data_start
        self.result = self.trainer.step(batch)
        self.step += 1
        self.window_steps += 1
        self.bar.update(1)
        self.watch.update(self.result, self.step)
        if not (self.step % t.log_every_steps == 0 or self.step == self.total_steps):
            return {}
        tokens_per_second = self.tokens_per_step * self.window_steps / max(time.perf_counter() - self.window_start,
                                                                           1e-9)
        values = _log_values(self.result, self.trainer, self.dataset, self.env, data_time, tokens_per_second)
        self.window_start, self.window_steps = time.perf_counter(), 0
        return values

    def _agree(self, log_now: bool) -> _Due:
        """Checkpoint, evaluate and stop: rank 0's clock, anyone's SIGTERM and anyone's non-finite loss
        decide. With several ranks they must agree, which takes an all-reduce (a wait for every rank): at
        log, checkpoint and evaluation steps and every STOP_CHECK_STEPS, so a preempted run stops within
        a few steps whatever the log interval."""
        step, t = self.step, self.cfg.train
        by_steps = self.checkpoints.due_by_steps(step, self.total_steps)
        eval_by_steps = self.heldout is not None and (step % t.eval_every_steps == 0 or step == self.total_steps)
        agree_now = log_now or by_steps or eval_by_steps or step % STOP_CHECK_STEPS == 0
        signal_seen, time_due = self.checkpoints.local_view()
        check_now = agree_now if self.env.distributed else agree_now or signal_seen or time_due
        bad_step, high_step, high_mean = self.watch.read() if check_now else (0, 0, [0.0] * len(DIRECTIONS))
        signal_seen, time_due, bad_step, high_step, high_mean = self.checkpoints.agree(
            agree_now, signal_seen, time_due, bad_step, high_step, high_mean)
        return _Due(save=by_steps or bool(time_due) or bool(signal_seen), evaluate=eval_by_steps,
                    check=check_now, signal_seen=bool(signal_seen), bad_step=bad_step, high_step=high_step,
                    high_mean=high_mean)

    def _check_training(self, due: _Due) -> Optional[Divergence]:
        """The guard's view of the training figures the ranks agreed on: a non-finite loss or gradient
        norm, else a training-loss average past the bound."""
        if due.bad_step:
            return Divergence(due.bad_step, "the training loss or gradient norm is not finite", float("nan"))
        if due.high_step:
            return self.guard.check_training(due.high_step, dict(zip(DIRECTIONS, due.high_mean)),
                                             self.watch.steps_averaged(due.high_step, self.step))
        return None

    def _evaluate(self, values: dict[str, float]) -> tuple[dict, Optional[Divergence], bool]:
        """Heldout perplexity into ``values``; the guard's view of it; whether it is a new best (written
        now, whatever the checkpoint interval, and kept as best.pt)."""
        eval_start = time.perf_counter()
        heldout_result = self.heldout.run(self.trainer.model, self.env)
        eval_seconds = time.perf_counter() - eval_start
        self.window_start += eval_seconds  # tokens/s is training's own
        values.update(heldout_figures(heldout_result), **{"time/heldout_evaluation": eval_seconds})
        ppl = {d: heldout_result[d]["perplexity"] for d in DIRECTIONS}
        divergence = self.guard.check_heldout(self.step, ppl, {d: heldout_result[d]["mean_loss"] for d in DIRECTIONS})
        best = False
        if divergence is None:
            self.guard.record_healthy(self.step, ppl)
            best = self.guard.is_best(self.step, heldout_result["average_perplexity"])
        return heldout_result, divergence, best

    # ------------------------------------------------------------ the divergence response

    def _respond(self, divergence: Divergence, heldout_result: Optional[dict], due: _Due) -> Optional[str]:
        """``train.on_divergence``: "rolled back", "stopped", or None (warned; training goes on)."""
        action = _on_divergence(divergence, self.guard, self.cfg)
        if action == "rollback":
            if self._rollback(divergence):
                return "rolled back"
            action = "stop"
        if action == "stop":
            self._stop(divergence, heldout_result)
            return "stopped"
        _report(self.logger, divergence, self.step, "warn", self.guard, self.trainer,
                f"{divergence.line()}; training goes on (train.on_divergence: warn)")
        if due.bad_step:
            self.watch.forget_non_finite()  # said once: the weights stay non-finite from here on
        elif due.high_step:
            self.watch.rearm()  # said; it fires again once the average has come back under the bound and passes it
        return None

    def _rollback(self, divergence: Divergence) -> bool:
        """Back to the last healthy checkpoint (or one further back after a rollback that did not get
        past it), at a lower learning rate; False when there is none."""
        t, guard = self.cfg.train, self.guard
        back = int(t.rollback_further_back and guard.state.rollbacks_in_a_row > 0)
        target = self.checkpoints.rollback(self.trainer, self.dataset, guard.state.healthy_step, back)
        if target is None:
            return False
        target_path, target_step, target_offset, removed = target
        skipped = self.step - target_step if t.rollback_skip_data else 0  # the abandoned stretch's batches
        guard.rolled_back(target_step, t.rollback_lr_factor)
        self.trainer.lr_factor = guard.state.lr_factor
        self.logger.rewind(target_step, target_offset)
        dropped = f"; removed the later {', '.join(map(os.path.basename, removed))}" if removed else ""
        _report(self.logger, divergence, self.step, "rollback", guard, self.trainer,
                f"{divergence.line()}; rolled back to {target_path} (step {target_step}{dropped}); "
                f"learning rate x{guard.state.lr_factor:g} from now on"
                + (f"; skipping the {skipped} batches trained on since" if skipped else ""),
                to_checkpoint=target_path, to_step=target_step, skipped_batches=skipped)
        self.batches = iter(self.dataset)
        for _ in range(skipped):  # the same number on every rank: they stay in step
            next(self.batches)
        self.step = target_step
        self.watch = _LossWatch(self.env.device, guard.loss_bound)
        self.bar.n = self.step
        self.bar.refresh()
        self.window_start, self.window_steps = time.perf_counter(), 0
        return True

    def _stop(self, divergence: Divergence, heldout_result: Optional[dict]) -> None:
        """Save the diverged state beside the others and say where the last good checkpoint is."""
        t, guard, step = self.cfg.train, self.guard, self.step
        last_good = self.checkpoints.healthy_checkpoint(guard.state.healthy_step)
        path = self.checkpoints.save(self.trainer, self.dataset, step,
                                     _guard_payload(guard, heldout_result, self.logger),
                                     name=f"diverged-step-{step:08d}")
        why = "train.on_divergence: stop" if t.on_divergence == "stop" else \
            "no healthy checkpoint to roll back to" if last_good is None else \
            f"{guard.state.rollbacks_in_a_row} rollbacks in a row did not get past it (train.max_rollbacks)"
        self.diverged = (f"{divergence.line()}; stopped ({why}); state saved to {path}; last good checkpoint: "
                         f"{last_good or 'none'}")
        _report(self.logger, divergence, step, "stop", guard, self.trainer, self.diverged, checkpoint=path,
                last_good=last_good)

    # ------------------------------------------------------------ the end

    def summary(self) -> dict:
        """Rank 0's view of the run, for the CLI."""
        figures = self.result.values() if self.result else None
        step = self.step
        return {"step": step, "total_steps": self.total_steps, "loss": figures["loss"] if figures else None,
                "perplexity": {d: figures[f"perplexity/{d}"] for d in DIRECTIONS} if figures else None,
                "out_dir": self.out_dir, "checkpoint": self.checkpoints.path(step),
                "stopped_by_signal": self.stopped_by_signal, "diverged": self.diverged,
                "guard": self.guard.state.to_dict(), "is_main": self.env.is_main}


def _on_divergence(divergence: Divergence, guard: DivergenceGuard, cfg: Config) -> str:
    """What to do: ``train.on_divergence``, but stop once rollbacks have not got past the step that diverged
    ``train.max_rollbacks`` times in a row."""
    guard.fired(divergence)
    action = cfg.train.on_divergence
    if action == "rollback" and guard.state.rollbacks_in_a_row >= cfg.train.max_rollbacks:
        return "stop"
    return action


def _report(logger: _Logger, divergence: Divergence, step: int, action: str, guard: DivergenceGuard,
            trainer: TrainStep, message: str, **extra) -> None:
    """A firing: one line (``message``; the CLI prints a stop's), a metrics.jsonl event and TensorBoard
    scalars at the step it was seen."""
    if action != "stop":
        log.warning(message)
    record = {"event": "divergence", "diverged_step": divergence.step, "seen_step": step, "action": action,
              "what": divergence.what, "figure": divergence.figure, "bound": divergence.bound,
              "lr_factor": guard.state.lr_factor, "firings": guard.state.firings, **extra}
    logger.event(record, step, {"guard/divergence": 1.0, "guard/lr_factor": trainer.lr_factor,
                                "guard/firings": float(guard.state.firings)})


def _guard_payload(guard: DivergenceGuard, heldout_result: Optional[dict], logger: _Logger) -> dict:
    """What a checkpoint says about the run's health (plain data)."""
    return {"guard": guard.state.to_dict(), "metrics_bytes": logger.offset(),
            "heldout": None if heldout_result is None else heldout_figures(heldout_result)}
