"""The divergence guard: decides from a run's figures whether training has diverged, and keeps
what it needs for that across checkpoints (plain data, saved in every checkpoint).

It fires on

* a non-finite training loss or gradient norm (the step where it first happened), and
* a direction's heldout perplexity that is not finite, that rose above the add-one unigram
  model of the training counts after having been below it, or that is above
  ``train.divergence_factor`` times the direction's best so far.

The training loop (``bilm.training.run``) asks, acts on ``train.on_divergence`` (rollback, stop,
warn) and reports; this module holds no tensors, files or ranks.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

from bilm.modules.language_model import DIRECTIONS


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
                 state: Optional[GuardState] = None):
        self.factor = divergence_factor
        self.unigram = unigram  # direction -> add-one unigram perplexity on the heldout sample; None: unknown
        self.state = state or GuardState()

    # ----- checks

    def check_heldout(self, step: int, perplexity: dict[str, float]) -> Optional[Divergence]:
        """Heldout perplexity per direction, against the unigram model and the best so far (not
        yet updated with these figures)."""
        for d in DIRECTIONS:
            p = perplexity[d]
            best = self.state.best.get(d)
            if not math.isfinite(p):
                return Divergence(step, f"{d} heldout perplexity is {p}", p)
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
