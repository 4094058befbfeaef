"""``bilm probe --checkpoint RUN --every-checkpoint``: every kept checkpoint of a run and its
``best.pt`` probed alike, beside the heldout perplexity the run logged at their steps; the
checkpoint (and setting) with the best dev score is the one to export for the task.

The random control does not change along a run (the same options and seed), so it is probed once.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

from bilm.core.errors import InputError
from bilm.evaluation.heads import Setting
from bilm.evaluation.probe import Prober, Task, make_report
from bilm.evaluation.vectors import model_from_checkpoint, random_control
from bilm.runs.checkpoint import load_checkpoint
from bilm.runs.run_dir import BEST_NAME, best_checkpoint_path, checkpoint_step, list_checkpoints

METRICS_FILE = "metrics.jsonl"


def run_checkpoints(run_dir: str) -> tuple[str, list[tuple[str, str, int, bool]]]:
    """(the run directory, [(name, path, step, is best)]) oldest first; ``best.pt`` shares its row
    with the kept checkpoint of its step, or gets its own when that one was pruned."""
    if not os.path.isdir(run_dir):
        raise InputError(f"--every-checkpoint takes a run directory, got {run_dir}")
    directory = os.path.join(run_dir, "checkpoints")
    directory = directory if os.path.isdir(directory) else run_dir
    rows = [(os.path.basename(p), p, checkpoint_step(p), False) for p in list_checkpoints(directory)]
    best = best_checkpoint_path(directory)
    if os.path.exists(best):
        step = int(load_checkpoint(best, mmap=True)["step"])
        same = [i for i, row in enumerate(rows) if row[2] == step]
        if same:
            name, path, _, _ = rows[same[0]]
            rows[same[0]] = (name, path, step, True)
        else:
            rows.append((BEST_NAME, best, step, True))
    if not rows:
        raise FileNotFoundError(f"no checkpoints in {directory}")
    rows.sort(key=lambda row: row[2])
    root = run_dir if directory != run_dir else os.path.dirname(os.path.abspath(run_dir))
    return root, rows


def logged_perplexity(run_root: str) -> dict[int, float]:
    """Step -> the average heldout perplexity ``metrics.jsonl`` holds for it (the run's own log)."""
    path = os.path.join(run_root, METRICS_FILE)
    found: dict[int, float] = {}
    if not os.path.exists(path):
        return found
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
                if isinstance(record, dict) and "heldout_perplexity/average" in record and "step" in record:
                    found[int(record["step"])] = float(record["heldout_perplexity/average"])  # "inf": inf
            except (ValueError, TypeError, OverflowError):
                continue  # a line cut by a killed run, or figures that are not numbers
    return found


def probe_run(run_dir: str, task: Task, prober: Prober, settings_for: Callable[[int], list[Setting]]) -> dict:
    """Every checkpoint of the run probed with the settings ``settings_for(n_layers)`` gives; the
    report with one entry per checkpoint."""
    root, rows = run_checkpoints(run_dir)
    perplexity = logged_perplexity(root)
    checkpoints, control_results, settings = [], {}, []
    for index, (name, path, step, best) in enumerate(rows):
        model = model_from_checkpoint(path)
        if index == 0:
            settings = settings_for(model.n_layers)
        own = [s for s in settings if not s.random]
        random = [s for s in settings if s.random]
        if random and index == 0:
            control_results = prober.run(random_control(model), random, desc="heads (random)")
        results = prober.run(model, own, desc=f"heads {name}") if own else {}
        checkpoints.append({"name": name, "path": path, "step": step, "best": best,
                            "heldout_perplexity": perplexity.get(step), "results": results})
    report = make_report(task, prober, run_dir, settings, {})
    del report["results"]
    report.update(run=run_dir, checkpoints=checkpoints, control=control_results, choice=_choice(checkpoints))
    return report


def _choice(checkpoints: list[dict]) -> Optional[dict]:
    """The checkpoint and setting with the highest mean dev score (the dev split, never the test file)."""
    best = None
    for c in checkpoints:
        for setting, result in c["results"].items():
            if best is None or result["dev"]["mean"] > best[0]:
                best = (result["dev"]["mean"], c, setting, result)
    if best is None:
        return None
    dev, c, setting, result = best
    return {"checkpoint": c["name"], "path": c["path"], "step": c["step"], "setting": setting, "dev": dev,
            "mean": result[_metric(result)]["mean"], "std": result[_metric(result)]["std"]}


def _metric(result: dict) -> str:
    return "f1" if "f1" in result else "accuracy"
