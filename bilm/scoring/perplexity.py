"""Mean loss -> perplexity, the one conversion: it never raises, and what it gives can always be
shown and written.

A diverged model's mean loss can pass 709.78, the log of the largest float, and ``math.exp``
raises there; ``perplexity`` gives ``inf`` instead (``nan`` for a loss that is not a number).
Lines people read show such a figure as ``inf``; JSON (``bilm evaluate --json``, ``bilm score``,
metrics.jsonl) has no number for it, so ``json_safe`` writes every non-finite float as the string
``"inf"``, ``"-inf"`` or ``"nan"`` (``float()`` reads them back), and the finite mean loss is
written beside every perplexity (docs/divergence.md). ``diverged_directions`` names the directions
whose figures say the model has diverged: a perplexity that is not finite, or above the uniform
model's (the vocabulary size) far enough that no trained model gets there.
"""
from __future__ import annotations

import math
from typing import Any, Optional

NON_FINITE_JSON = {math.inf: "inf", -math.inf: "-inf"}  # and "nan"


def perplexity(mean_loss: float) -> float:
    """``exp(mean_loss)``: ``inf`` beyond float range, ``nan`` for ``nan``; never raises."""
    mean_loss = float(mean_loss)
    if math.isnan(mean_loss):
        return math.nan
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf


def figure(value: Optional[float], form: str = "{:.3f}") -> str:
    """A figure for a line people read: ``form`` when finite, else ``inf``, ``-inf`` or ``nan``."""
    if value is None:
        return "-"
    value = float(value)
    return form.format(value) if math.isfinite(value) else str(value)


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (in dicts, lists and tuples) as a string: ``"inf"``,
    ``"-inf"``, ``"nan"``. ``json.dumps`` would write ``Infinity`` and ``NaN``, which is not JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else ("nan" if math.isnan(value) else NON_FINITE_JSON[value])
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def loss_bound(vocab_size: int, factor: float) -> float:
    """``factor`` x log(``vocab_size``): ``factor`` times the mean loss of the uniform model over the
    vocabulary. The divergence guard's bound (``train.divergence_loss_factor``), and where
    ``bilm evaluate`` and ``bilm score`` call a model diverged."""
    return factor * math.log(max(vocab_size, 2))


def diverged_directions(mean_losses: dict[str, Optional[float]], vocab_size: int, factor: float) -> list[str]:
    """The directions whose mean loss is not finite or above ``loss_bound``."""
    bound = loss_bound(vocab_size, factor)
    return [d for d, loss in mean_losses.items() if loss is not None and not loss <= bound]


def diverged_line(directions: list[str], mean_losses: dict[str, Optional[float]], vocab_size: int,
                  factor: float, note: str = "") -> str:
    """One line saying which directions have diverged and why (``diverged_directions``'s); ``note``
    is added (e.g. which weights are not finite)."""
    said = ", ".join(f"{d} (mean loss {figure(mean_losses[d], '{:,.1f}')})" for d in directions)
    return (f"the model has diverged: {said} {'is' if len(directions) == 1 else 'are'} not below {factor:g} x "
            f"log(vocabulary size {vocab_size:,}) = {loss_bound(vocab_size, factor):,.1f} (a uniform model scores "
            f"{math.log(max(vocab_size, 2)):.1f}){note}; its figures measure no language model")
