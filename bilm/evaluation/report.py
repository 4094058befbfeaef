"""What ``bilm probe`` writes: the table on stdout, the JSON file, the picture (matplotlib, the
``plot`` extra)."""
from __future__ import annotations

import json
from typing import Optional

from bilm.core.atomic import atomic_open, atomic_path
from bilm.core.errors import MissingExtra
from bilm.scoring.perplexity import json_safe

MISSING_PLOT = "--plot needs matplotlib, the plot extra: pip install 'bilm[plot]' (or pip install matplotlib)"


def require_matplotlib():
    """pyplot with a file backend; the one-line error naming the extra when it is missing."""
    try:
        import matplotlib
    except ImportError:
        raise MissingExtra(MISSING_PLOT) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _percent(summary: dict) -> str:
    return f"{summary['mean']:6.2f} ± {summary['std']:4.2f}"


def metric_columns(report: dict) -> list[str]:
    """The scores a table shows: span F1 first for BIO tags, then accuracy."""
    return ["f1", "accuracy"] if report.get("bio") else ["accuracy"]


def data_lines(report: dict) -> list[str]:
    sample = report.get("subsample")
    train = f"train {report['train']}: {report['train_examples']:,} {report['unit']}"
    if sample:
        train += (f" (a subsample: {sample['examples']:,} of the file's {report['train_file_examples']:,}, "
                  f"seed {sample['seed']}, minus the dev split)")
    dev = report["dev"]
    if "file" in dev:
        dev_line = f"dev {dev['file']}: {report['dev_examples']:,} {report['unit']}"
    else:
        dev_line = (f"dev: {report['dev_examples']:,} {report['unit']} of the training file ({dev['fraction']:.0%}, "
                    f"seed {dev['seed']}), which chose each head's epoch")
    return [train, dev_line, f"test {report['test']}: {report['test_examples']:,} {report['unit']}"]


def table(report: dict) -> str:
    """The results of one probe as a table (percent; mean ± standard deviation over the seeds)."""
    columns = metric_columns(report)
    lines = [f"bilm probe: {report['task']} with a {report['head']} head, {report['seeds']} seed"
             f"{'s' if report['seeds'] > 1 else ''}; model {report['model']}", *data_lines(report)]
    if report.get("tokens_split_into_pieces"):
        lines.append(f"{report['tokens_split_into_pieces']:,} file tokens were cut into several pieces by the "
                     "model's tokenizer: each gets the mean of its pieces' vectors")
    width = max([len("setting"), *map(len, report["results"])]) + 2
    header = (f"{'setting':<{width}}" + "".join(f"{c + ' (test)':<18}" for c in columns)
              + f"{'runs':<24}{'dev':>7}  epochs")
    lines += ["", header]
    for name, result in report["results"].items():
        runs = " ".join(f"{v:.1f}" for v in result[columns[0]]["runs"])
        lines.append(f"{name:<{width}}" + "".join(f"{_percent(result[c]):<18}" for c in columns)
                     + f"{runs:<24}{result['dev']['mean']:7.2f}  {' '.join(map(str, result['epochs']))}")
    for name, result in report["results"].items():
        if "mix_weights" in result:
            weights = ", ".join(f"layer {k} {w:.2f}" for k, w in enumerate(result["mix_weights"]))
            lines.append(f"{name} weights (softmax, mean of the seeds): {weights}; gamma {result['gamma']['mean']:.2f}")
    seconds = report["seconds"]
    lines.append(f"seconds: embedding {seconds['embed']:.1f} ({_files(report)}), heads {seconds['heads']:.1f}")
    return "\n".join(lines)


def _files(report: dict) -> str:
    embedded, cached = report.get("files_embedded", 0), report.get("cache_hits", 0)
    return f"{embedded} file{'s' if embedded != 1 else ''} embedded, {cached} from the cache"


def write_json(path: str, report: dict) -> None:
    """The report as JSON; a non-finite figure (a diverged checkpoint's logged perplexity) as the
    string ``"inf"`` or ``"nan"``, as bilm writes them everywhere (``Infinity`` is not JSON)."""
    with atomic_open(path) as f:
        json.dump(json_safe(report), f, indent=2)
        f.write("\n")


def plot_settings(path: str, report: dict) -> None:
    """One bar per setting (mean, with the standard deviation as an error bar) and a dot per run."""
    plt = require_matplotlib()
    metric = report["metric"]
    names = list(report["results"])
    means = [report["results"][n][metric]["mean"] for n in names]
    stds = [report["results"][n][metric]["std"] for n in names]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.0 + 0.9 * len(names)), 3.6))
    colours = ["#bbbbbb" if n.startswith("random:") else "#4c72b0" for n in names]
    ax.bar(range(len(names)), means, yerr=stds, capsize=4, color=colours)
    for i, n in enumerate(names):
        runs = report["results"][n][metric]["runs"]
        ax.plot([i] * len(runs), runs, "k.", markersize=4)
    low = min(min(r[metric]["runs"]) for r in report["results"].values())
    ax.set_ylim(max(0.0, low - 5), min(100.0, max(m + s for m, s in zip(means, stds)) + 3))
    ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 5 else 0,
                  ha="right" if len(names) > 5 else "center")
    ax.set_ylabel(f"test {metric} (%)")
    ax.set_title(f"{report['task']}, {report['head']} head, {report['seeds']} seeds\n{_short(report['model'])}",
                 fontsize=9)
    fig.tight_layout()
    _save(fig, path, plt)


def plot_steps(path: str, report: dict) -> None:
    """The score of each setting against the checkpoint's step (error bars: the seeds' standard
    deviation; the random control, the same at every step, dashed in its setting's colour), the
    heldout perplexity the run logged on a second axis."""
    plt = require_matplotlib()
    from matplotlib.ticker import MaxNLocator
    metric = report["metric"]
    points = [c for c in report["checkpoints"] if c.get("step") is not None]
    steps = [c["step"] for c in points]
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    bases = list(dict.fromkeys(n.removeprefix("random:") for n in report["settings"]))
    colour = {name: f"C{i % 10}" for i, name in enumerate(bases)}
    for name in report["settings"]:
        base = name.removeprefix("random:")
        if name.startswith("random:"):
            ax.axhline(report["control"][name][metric]["mean"], color=colour[base], linestyle="--", linewidth=1,
                       label=f"{name} (initial weights)")
            continue
        ax.errorbar(steps, [c["results"][name][metric]["mean"] for c in points],
                    yerr=[c["results"][name][metric]["std"] for c in points], marker="o", capsize=3,
                    color=colour[base], label=name)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"test {metric} (%)")
    handles, labels = ax.get_legend_handles_labels()
    perplexities = [(c["step"], c["heldout_perplexity"]) for c in points if c.get("heldout_perplexity")]
    if perplexities:
        twin = ax.twinx()
        twin.plot(*zip(*perplexities), "k:", marker="x", label="heldout perplexity (right)")
        twin.set_ylabel("heldout perplexity (the run's log)")
        more = twin.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    ax.set_title(f"{report['task']}, {report['head']} head, {report['seeds']} seeds, across {_short(report['run'], 50)}",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(labels) - 1) // 3), 1, 1))
    _save(fig, path, plt)


def _short(text: str, limit: int = 70) -> str:
    return text if len(text) <= limit else "..." + text[-(limit - 3):]


def _save(fig, path: str, plt) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def format_step_table(report: dict) -> str:
    """One row per checkpoint: step, heldout perplexity, each setting's score (mean ± std)."""
    metric = report["metric"]
    names = [n for n in report["settings"] if not n.startswith("random:")]
    lines = [f"bilm probe across {report['run']}: {report['task']} with a {report['head']} head, "
             f"{report['seeds']} seeds; test {metric} (%)", *data_lines(report), ""]
    header = f"{'checkpoint':<24}{'step':>8}{'heldout ppl':>13}  " + "".join(f"{n:<17}" for n in names)
    lines.append(header)
    for c in report["checkpoints"]:
        ppl = f"{c['heldout_perplexity']:.1f}" if c.get("heldout_perplexity") else "-"
        label = c["name"] + (" (best)" if c.get("best") and c["name"] != "best.pt" else "")
        lines.append(f"{label:<24}{c['step']:>8}{ppl:>13}  "
                     + "".join(f"{_percent(c['results'][n][metric]):<17}" for n in names))
    for name, result in report.get("control", {}).items():
        lines.append(f"{name}: {_percent(result[metric])} (a biLM of this shape with the run's initial weights)")
    choice: Optional[dict] = report.get("choice")
    if choice:
        lines.append(f"best for this task (highest dev score): {choice['checkpoint']} (step {choice['step']}), "
                     f"setting {choice['setting']}: test {metric} {choice['mean']:.2f} ± {choice['std']:.2f}; "
                     f"export it with: bilm export --checkpoint {choice['path']} --out DIR")
    lines.append(f"seconds: embedding {report['seconds']['embed']:.1f} ({_files(report)}), "
                 f"heads {report['seconds']['heads']:.1f}")
    return "\n".join(lines)
