"""``Checkpointer``: a training run's checkpoints, owned by one object.

It decides when to save (every ``train.checkpoint_every_steps``, every
``train.checkpoint_every_minutes`` by rank 0's clock, at the end, and on SIGTERM: under torchrun
the ranks agree on the clock and the signal in one all-reduce), writes the payload
(``checkpoint_payload``, the one schema every writer uses) and reads it back (``resume``,
``rollback``), keeps the last ``train.keep_checkpoints`` of the ``step-N.pt`` series (never the
rollback target) and ``best.pt``. The files themselves (atomic writes, the safe unpickler, the
format version) are ``bilm.runs.checkpoint``'s.
"""
from __future__ import annotations

import math
import os
import signal
import time
import warnings
from typing import Optional

import torch

from bilm.data import LMDataset
from bilm.core.logs import log
from bilm.core.errors import CheckpointWriteError
from bilm.runs.checkpoint import CheckpointError, checkpoint_payload, load_checkpoint, load_model_state, save_checkpoint
from bilm.runs.resume import check_resume
from bilm.runs.run_dir import checkpoint_path, checkpoint_step, keep_as_best, list_checkpoints, load_latest_valid, prune_checkpoints, remove_stale_temporaries
from bilm.runs.config import Config, config_to_dict
from bilm.core.distributed import DistEnv, all_reduce_max, gather_objects
from bilm.training.step import TrainStep
from bilm.core.text import TextPipeline

_NO_STEP = float(2**62)  # "no non-finite step" in the all-reduce of the earliest one


class Checkpointer:
    """The checkpoints of the run in ``out_dir`` (``out_dir/checkpoints``) on this rank."""

    def __init__(self, out_dir: str, cfg: Config, env: DistEnv, text_pipeline: Optional[TextPipeline]):
        self.dir = os.path.join(out_dir, "checkpoints")
        self.cfg, self.env = cfg, env
        self.text_pipeline = text_pipeline  # how raw text became the tokens: saved in every checkpoint
        self.last_save_time = time.time()
        self._signal = 0
        self._previous_handler = None

    def prepare_directory(self) -> None:
        """Rank 0, before the run writes anything: the directory, and what a killed write left behind."""
        os.makedirs(self.dir, exist_ok=True)
        for stale in remove_stale_temporaries(self.dir):
            log.info(f"removed {stale}, left by an interrupted checkpoint write")

    def path(self, step: int) -> str:
        return checkpoint_path(self.dir, step)

    # ----- when to save -----
    def start(self) -> None:
        """The loop begins: the clock of time-based saves starts, and SIGTERM is watched (clusters send
        it before preemption: noted here, saved and stopped on at the next agreement)."""
        def on_sigterm(signum, frame):
            self._signal = 1
        self._previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
        self.last_save_time = time.time()

    def close(self) -> None:
        """The loop ended: SIGTERM's previous handler back."""
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def due_by_steps(self, step: int, total_steps: int) -> bool:
        return step % self.cfg.train.checkpoint_every_steps == 0 or step == total_steps

    def local_view(self) -> tuple[float, float]:
        """This rank's view: a SIGTERM seen, and (rank 0's clock) a save due by time."""
        due_by_time = self.env.is_main and (time.time() - self.last_save_time) >= 60 * self.cfg.train.checkpoint_every_minutes
        return float(self._signal), float(due_by_time)

    def agree(self, agree_now: bool, signal_seen: float, time_due: float, bad_step: int, high_step: int = 0,
              high_mean: Optional[list[float]] = None) -> tuple[float, float, int, int, list[float]]:
        """Under torchrun every rank must take the same decision, which takes an all-reduce (a wait
        for every rank), done only at ``agree_now`` steps; what the divergence guard watches rides in
        the same all-reduce: the earliest non-finite step of any rank (``bad_step``, 0: none), the
        earliest step at which a rank's training-loss average passed the bound (``high_step``) and the
        highest of those averages (``high_mean``, per direction). Returns the agreed (signal, time due,
        bad step, high step, high mean); one process: its own view."""
        high_mean = list(high_mean or [])
        if not self.env.distributed:
            return signal_seen, time_due, bad_step, high_step, high_mean
        if not agree_now:
            return 0.0, 0.0, bad_step, high_step, high_mean
        agreed = all_reduce_max([signal_seen, time_due, -float(bad_step or _NO_STEP), -float(high_step or _NO_STEP),
                                 *(m if high_step else -math.inf for m in high_mean)], self.env)
        signal_seen, time_due, neg_bad, neg_high = agreed[:4]
        first = lambda neg: 0 if -neg >= _NO_STEP else int(-neg)  # noqa: E731
        return signal_seen, time_due, first(neg_bad), first(neg_high), agreed[4:]

    # ----- write -----
    def save(self, trainer: TrainStep, dataset: LMDataset, step: int, extra: Optional[dict] = None,
             name: Optional[str] = None, healthy_step: Optional[int] = None, best: bool = False) -> str:
        """Write step ``step``'s checkpoint (rank 0, plus what the strategy keeps beside it on every rank)
        and prune old ones but the rollback target (the newest at or before ``healthy_step``); ``best``:
        also keep it as ``best.pt``. Returns its path. A failed write on any rank stops every rank with
        ``CheckpointWriteError``, the previous checkpoints intact. ``name`` (without ``.pt``): a file
        outside the ``step-N.pt`` series, neither resumed from nor pruned."""
        env = self.env
        rank_states = gather_objects(trainer.rank_state(dataset), env)
        error: Optional[str] = None
        path = self.path(step) if name is None else os.path.join(self.dir, f"{name}.pt")
        try:
            tag = trainer.strategy.save(self.dir, name or f"step-{step:08d}")
            if env.is_main:
                payload = checkpoint_payload(
                    step, config_to_dict(self.cfg), trainer.model.state_dict(), dataset.vocab.tokens,
                    trainer.strategy.optimizer_state(), tag, env.world_size, rank_states,
                    self.text_pipeline.to_state() if self.text_pipeline is not None else None, **(extra or {}))
                save_checkpoint(payload, path)
        except (CheckpointWriteError, OSError) as e:
            error = str(e) if isinstance(e, CheckpointWriteError) else f"cannot write checkpoint of step {step} in " \
                f"{self.dir}: {e.strerror or e}"
        failed = all_reduce_max([float(error is not None)], env)[0] if env.distributed else float(error is not None)
        if failed:
            raise CheckpointWriteError(error or f"another rank could not write the checkpoint of step {step}")
        if env.is_main and name is None:
            t = self.cfg.train
            targets = self.healthy_checkpoints(healthy_step)[-(1 + t.max_rollbacks if t.rollback_further_back else 1):]
            trainer.strategy.prune(self.dir, prune_checkpoints(self.dir, t.keep_checkpoints, protect=targets))
        if env.distributed:
            torch.distributed.barrier()
        if best and env.is_main:
            keep_as_best(path)
        self.last_save_time = time.time()
        return path

    # ----- read back -----
    def resume(self, trainer: TrainStep, dataset: LMDataset, vocab_tokens: list[str], vocab_source: str
               ) -> Optional[tuple[int, dict]]:
        """``--resume``: load the newest valid checkpoint into ``trainer`` and ``dataset``; returns its
        step and what it says about the run's health (``guard``, ``metrics_bytes``), or None when
        there is none. Refuses a different model, vocabulary or text pipeline (``check_resume``)."""
        env = self.env
        # Rank 0 looks first and sets unreadable checkpoints aside; then the others find the same one.
        # The file is mapped, not read (ranks on a node share its pages); what is kept is copied out
        # and the payload dropped, so neither a second copy of the weights nor the mapping outlives this.
        path, payload = load_latest_valid(self.dir, set_aside_corrupt=True, mmap=True) if env.is_main else (None, None)
        if env.distributed:
            torch.distributed.barrier()
            if not env.is_main:
                path, payload = load_latest_valid(self.dir, mmap=True)
        if payload is None:
            log.info(f"no checkpoint in {self.dir}; starting from scratch")
            return None
        changed = check_resume(payload, path, config_to_dict(self.cfg), vocab_tokens, vocab_source,
                               self.text_pipeline.to_state() if self.text_pipeline is not None else None)
        if changed:
            log.info(f"settings changed since {path}: {'; '.join(changed)}")
        step = self._restore(trainer, dataset, payload, path)
        health = {"guard": payload.get("guard"), "metrics_bytes": payload.get("metrics_bytes")}
        del payload
        log.info(f"resumed from {path} (step {step})")
        return step, health

    def healthy_checkpoints(self, healthy_step: Optional[int]) -> list[str]:
        """The checkpoints at or before the last step the guard found healthy, oldest first."""
        if healthy_step is None:
            return []
        return [p for p in list_checkpoints(self.dir) if checkpoint_step(p) <= healthy_step]

    def healthy_checkpoint(self, healthy_step: Optional[int], back: int = 0) -> Optional[str]:
        """Where a rollback goes: the newest healthy checkpoint, or ``back`` before it (the oldest kept if
        there are fewer)."""
        found = self.healthy_checkpoints(healthy_step)
        return found[max(0, len(found) - 1 - back)] if found else None

    def rollback(self, trainer: TrainStep, dataset: LMDataset, healthy_step: Optional[int], back: int = 0
                 ) -> Optional[tuple[str, int, Optional[int], list[str]]]:
        """Every rank reloads the newest healthy checkpoint, or ``back`` before it (rank 0's pick), as
        ``--resume`` does: weights, optimizer, data positions, random states, LSTM states. The checkpoints
        after it belong to the abandoned stretch and are deleted (a later --resume must not pick them). Returns (its path,
        step, metrics offset, the deleted paths), or None when there is none."""
        env = self.env
        path = gather_objects(self.healthy_checkpoint(healthy_step, back) if env.is_main else None, env)[0]
        if path is None:
            return None
        payload = load_checkpoint(path, mmap=True)
        step = self._restore(trainer, dataset, payload, path)
        offset = payload.get("metrics_bytes")
        del payload
        removed = []
        if env.is_main:
            removed = [p for p in list_checkpoints(self.dir) if checkpoint_step(p) > step]
            for later in removed:
                os.remove(later)
            trainer.strategy.prune(self.dir, removed)
        if env.distributed:
            torch.distributed.barrier()
        self.last_save_time = time.time()
        return path, step, offset, removed

    def _restore(self, trainer: TrainStep, dataset: LMDataset, payload: dict, path: str) -> int:
        """The payload into the trainer (model, optimizer, steps done) and, when written by as many
        ranks as this run has, this rank's data positions, random and LSTM states."""
        env = self.env
        load_model_state(trainer.model, payload["model"], path)
        trainer.steps_done = int(payload["step"])
        trainer.strategy.load(payload, path)
        if payload.get("rank_states") is None:
            # e.g. imported from bilm-tf, whose restart also starts them afresh
            log.info(f"{path} holds no data positions or LSTM states: they start afresh")
        elif payload["world_size"] == env.world_size:
            rank_state = payload["rank_states"][env.rank]
            if not isinstance(rank_state, dict):  # a file handed over: its structure is checked, not trusted
                raise CheckpointError(f"{path}: rank_states[{env.rank}] must be a mapping, got "
                                      f"{type(rank_state).__name__}")
            # A batch size or unroll changed on --resume: the saved positions and LSTM states are
            # another reader's (and another shape). Every rank finds the same keys changed, so all
            # ranks take the same branch.
            data_state = rank_state.get("data")
            differs = dataset.state_differs(data_state) if data_state is not None else []
            if not differs:
                trainer.load_rank_state(rank_state, dataset)
            elif env.is_main:
                warnings.warn(f"{path}: the data reader changed ({'; '.join(differs)}): model and optimizer "
                              "resume, data order and LSTM states start afresh")
        elif env.is_main:
            warnings.warn(f"{path} was written by {payload['world_size']} ranks, this run has {env.world_size}: "
                          "model and optimizer resume, data order and LSTM states start afresh")
        return int(payload["step"])
