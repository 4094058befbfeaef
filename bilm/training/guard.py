"""The divergence guard: decides from a run's figures whether training has diverged, and keeps
what it needs for that across checkpoints (plain data, saved in every checkpoint).

It fires on

* a non-finite training loss or gradient norm (the step where it first happened);
* a direction's training loss, averaged over the last ``TRAINING_LOSS_WINDOW`` steps, above
  ``train.divergence_loss_factor`` x log(vocabulary size) (the uniform model's loss: a healthy run
  starts near or below it and only goes down; docs/divergence.md has the measurements). It needs no
  heldout data, and fires once each time the mean rises past the bound;
* a direction's heldout perplexity that is not finite, whose mean loss is above that same bound,
  that rose above the add-one unigram model of the training counts after having been below it, or
  that is above ``train.divergence_factor`` times the direction's best so far.

The training loop (``bilm.training.run``) tracks the training losses on the device, asks, acts on
``train.on_divergence`` (rollback, stop, warn) and reports; this module holds no tensors, files or
ranks.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

from bilm.modules.language_model import DIRECTIONS
from bilm.scoring.perplexity import figure, loss_bound

# Steps the training loss is averaged over (fewer at the start of a run or after a rollback): long
# enough that one unlucky batch cannot fire, short enough to stop a blow-up within a few steps.
TRAINING_LOSS_WINDOW = 10


@dataclass
class Divergence:
    """One firing: at ``step``, ``what`` (a figure and the bound it broke)."""
    step: int
    what: str
    figure: float
    bound: Optional[float] = None

    def line(self) -> str:
        return f"divergence at step {self.step}: {self.what}"


@dataclass
class GuardState:
    """What the guard remembers; saved in each checkpoint as plain data (``to_dict``)."""
    best: dict = field(default_factory=dict)      # direction -> lowest heldout perplexity so far
    best_average: Optional[float] = None          # lowest average heldout perplexity: the checkpoint best.pt
    best_step: Optional[int] = None
    healthy_step: Optional[int] = None            # the last step that passed the checks
    lr_factor: float = 1.0                        # product of the rollbacks' rollback_lr_factor
    rollbacks_in_a_row: int = 0                   # rollbacks since training last passed the step that diverged
    diverged_at: Optional[int] = None             # the step of the last firing
    firings: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: Optional[dict]) -> "GuardState":
        if not isinstance(state, dict):
            return cls()
        known = {k: v for k, v in state.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class DivergenceGuard:
    def __init__(self, divergence_factor: float, unigram: Optional[dict[str, float]] = None,
                 state: Optional[GuardState] = None, vocab_size: Optional[int] = None,
                 loss_factor: Optional[float] = None):
        self.factor = divergence_factor
        self.unigram = unigram  # direction -> add-one unigram perplexity on the heldout sample; None: unknown
        self.state = state or GuardState()
        self.vocab_size, self.loss_factor = vocab_size, loss_factor
        # The mean loss no healthy run reaches (None: that check is off).
        self.loss_bound = loss_bound(vocab_size, loss_factor) if vocab_size and loss_factor else None

    # ----- checks

    def _bound_words(self) -> str:
        return f"{self.loss_factor:g} x log(vocabulary size {self.vocab_size:,}) = {self.loss_bound:,.1f}"

    def check_training(self, step: int, mean_loss: dict[str, float], steps: int) -> Optional[Divergence]:
        """Each direction's training loss averaged over the ``steps`` steps up to ``step``, against
        the bound (the loop says when an average first passed it: only then is this asked)."""
        if self.loss_bound is None:
            return None
        for d in DIRECTIONS:
            loss = mean_loss[d]
            if not loss <= self.loss_bound:
                return Divergence(step, f"{d} training loss averaged over {steps} step{'s' * (steps != 1)} is "
                                        f"{figure(loss, '{:,.1f}')}, above {self._bound_words()}", loss,
                                  self.loss_bound)
        return None

    def check_heldout(self, step: int, perplexity: dict[str, float],
                      mean_loss: Optional[dict[str, float]] = None) -> Optional[Divergence]:
        """Heldout perplexity per direction (and its mean loss, when given), against the training-loss
        bound, the unigram model and the best so far (not yet updated with these figures)."""
        for d in DIRECTIONS:
            p = perplexity[d]
            loss = (mean_loss or {}).get(d, math.log(p) if p > 0 and math.isfinite(p) else p)
            best = self.state.best.get(d)
            if not math.isfinite(p):
                return Divergence(step, f"{d} heldout perplexity is {p} (mean loss {figure(loss, '{:,.1f}')})", p)
            if self.loss_bound is not None and loss > self.loss_bound:
                return Divergence(step, f"{d} heldout mean loss {loss:,.1f} (perplexity {p:,.4g}) is above "
                                        f"{self._bound_words()}", p)
            unigram = (self.unigram or {}).get(d)
            # "Rose above": a model that has not yet learnt the unigram statistics is not diverging.
            if unigram is not None and best is not None and best < unigram < p:
                return Divergence(step, f"{d} heldout perplexity {p:,.1f} is above the add-one unigram model's "
                                        f"{unigram:,.1f} (best so far {best:,.1f})", p, unigram)
            if best is not None and p > self.factor * best:
                return Divergence(step, f"{d} heldout perplexity {p:,.1f} is above {self.factor:g} x its best so "
                                        f"far ({best:,.1f})", p, self.factor * best)
        return None

    # ----- what the loop tells it

    def record_healthy(self, step: int, perplexity: Optional[dict[str, float]] = None) -> None:
        """``step`` passed the checks (with its heldout figures, if any): the bests move, checkpoints up
        to ``step`` become rollback targets, and passing the step that diverged ends a run of rollbacks."""
        for d, p in (perplexity or {}).items():
            if d not in self.state.best or p < self.state.best[d]:
                self.state.best[d] = p
        self.state.healthy_step = step
        # A healthy check at the step that diverged has got past it (that check was the one that fired).
        if self.state.diverged_at is not None and step >= self.state.diverged_at:
            self.state.rollbacks_in_a_row = 0

    def is_best(self, step: int, average: float) -> bool:
        """Is this average heldout perplexity the lowest so far (then it is recorded)?"""
        if self.state.best_average is None or average < self.state.best_average:
            self.state.best_average, self.state.best_step = average, step
            return True
        return False

    def fired(self, divergence: Divergence) -> None:
        self.state.firings += 1
        self.state.diverged_at = divergence.step

    def rolled_back(self, step: int, lr_factor: float) -> None:
        """Training went back to the checkpoint of ``step``, with the learning rate times ``lr_factor``."""
        self.state.rollbacks_in_a_row += 1
        self.state.lr_factor *= lr_factor
        self.state.healthy_step = step
