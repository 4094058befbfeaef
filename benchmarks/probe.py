"""What the vectors are worth: `bilm probe` on MR (sentence polarity) and UD English-EWT (POS) for
three biLMs of the demo's size, and how long a probe takes.

    python benchmarks/probe.py prepare  [--work DIR]
    python benchmarks/probe.py train    --recipe default|adam-warmup --steps N [--chunk M] [--work DIR]
    python benchmarks/probe.py evaluate --recipe default|adam-warmup [--work DIR]
    python benchmarks/probe.py probe    --model demo|default|adam-warmup --task mr|ewt [--work DIR]
    python benchmarks/probe.py timing   --size demo|original [--max-train N] [--work DIR]
    python benchmarks/probe.py report   [--work DIR] [--out benchmarks/results/probe-DATE.md]

The models: (a) `demo`, what `make demo` exports (demo_out/export: configs/tiny.yaml with LSTM 256
projected to 64, trained on the bundled sample); (b) `default` and (c) `adam-warmup`, the same
architecture trained on WikiText-2's test.txt (``--corpora``, prepared with 5% of its lines held
out) for the same number of steps, with the default recipe (Adagrad 0.2, bilm-tf's) and with
configs/recipes/adam-warmup.yaml. `train` runs one chunk of at most ``--chunk`` steps a call
(``bilm train --resume``), so each call stays short on a shared machine; `evaluate` scores the
run's newest checkpoint on the prepared heldout split and on WikiText-2's valid.txt (other articles).

`probe` runs ``bilm probe`` with settings 0, 1, 2, mix and the random control's mix (3 seeds, the
linear head; ``--max-train`` subsamples the training file when given) and keeps its JSON; `timing`
runs ``bilm probe`` on MR (default settings mix,0, 3 seeds, a cold cache, then again warm) for the
demo model or for a biLM of configs/elmo_original.yaml's size with random weights (its training
file subsampled with ``--max-train``: say so), recording the wall time. `report` writes the table
(with the machine, lscpu's model and flags) to ``--out`` (.md, and .json beside it).

Every stage is a separate call: run each alone on the machine (the timings are part of the result).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from machine import cpu_flags, machine_line  # noqa: E402

CORPORA = os.path.join(os.path.dirname(ROOT), "shared", "corpora")
DEMO_SIZE = ["model.lstm.dim=256", "model.lstm.projection_dim=64"]  # as make demo trains
RECIPES = {"default": [], "adam-warmup": [os.path.join(ROOT, "configs", "recipes", "adam-warmup.yaml")]}
TASKS = {"mr": ("classify", "mr/train.tsv", "mr/test.tsv"),
         "ewt": ("tag", "ud-ewt/train.conllu", "ud-ewt/test.conllu")}
SETTINGS = "0,1,2,mix"


def bilm(*args: str) -> float:
    """Run ``bilm ARGS`` with this interpreter; its wall time in seconds (a failure stops here)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bilm.cli", *args], check=True, cwd=ROOT)
    return time.perf_counter() - start


def model_dir(work: str, model: str) -> str:
    return os.path.join(ROOT, "demo_out", "export") if model == "demo" else os.path.join(work, model, "export")


def prepare(args) -> None:
    out = os.path.join(args.work, "data")
    if os.path.exists(os.path.join(out, "manifest.json")):
        print(f"{out}/manifest.json exists")
        return
    bilm("prepare", os.path.join(args.corpora, "wikitext-2", "test.txt"), "--out", out, "--heldout-fraction", "0.05",
         "--no-progress")


def train(args) -> None:
    from bilm.runs.run_dir import checkpoint_step, list_checkpoints

    run = os.path.join(args.work, args.recipe, "run")
    done = max(map(checkpoint_step, list_checkpoints(os.path.join(run, "checkpoints"))), default=0)
    if done >= args.steps:
        print(f"{run}: {done} steps done")
        return
    target = min(args.steps, done + args.chunk)
    configs = ["--config", os.path.join(ROOT, "configs", "tiny.yaml")]
    for extra in RECIPES[args.recipe]:
        configs += ["--config", extra]
    sets = [*DEMO_SIZE, f"train.max_steps={target}", "train.eval_every_steps=500", "train.checkpoint_every_steps=500",
            "train.keep_checkpoints=20", "train.n_epochs=1000", "train.device=cpu"]
    seconds = bilm("train", *configs, "--data", os.path.join(args.work, "data", "manifest.json"), "--out", run,
                   "--resume", "--no-progress", *[x for s in sets for x in ("--set", s)])
    with open(os.path.join(args.work, args.recipe, "train_seconds.jsonl"), "a") as f:
        f.write(json.dumps({"from": done, "to": target, "seconds": seconds}) + "\n")
    if target == args.steps:
        bilm("export", "--checkpoint", run, "--out", os.path.join(args.work, args.recipe, "export"), "--force")


def evaluate(args) -> None:
    run = os.path.join(args.work, args.recipe, "run")
    result = {}
    for name, data in (("heldout", os.path.join(args.work, "data", "manifest.json")),
                       ("valid", os.path.join(args.corpora, "wikitext-2", "valid.txt"))):
        out = subprocess.run([sys.executable, "-m", "bilm.cli", "evaluate", "--checkpoint", run, "--data", data,
                              "--json", "--device", "cpu"], check=True, cwd=ROOT, capture_output=True, text=True)
        result[name] = json.loads(out.stdout)
        print(name, result[name]["average_perplexity"])
    with open(os.path.join(args.work, args.recipe, "evaluate.json"), "w") as f:
        json.dump(result, f, indent=2)


def probe(args) -> None:
    task, train_file, test_file = TASKS[args.task]
    data = os.path.join(args.corpora, "probe")
    out = os.path.join(args.work, f"probe-{args.model}-{args.task}.json")
    extra = ["--max-train", str(args.max_train)] if args.max_train else []
    seconds = bilm("probe", "--model", model_dir(args.work, args.model), "--task", task,
                   "--train", os.path.join(data, train_file), "--test", os.path.join(data, test_file),
                   "--layers", SETTINGS, "--control", "random", "--seeds", "3", "--no-progress",
                   "--cache-dir", os.path.join(args.work, "cache"), "--json", out, "--force", *extra)
    report = json.load(open(out))
    report["wall_seconds"] = seconds
    with open(out, "w") as f:
        json.dump(report, f, indent=2)


def timing(args) -> None:
    import torch

    data = os.path.join(args.corpora, "probe")
    if args.size == "demo":
        directory = model_dir(args.work, "demo")
    else:
        from bilm.core.options import BiLMOptions
        from bilm.modules.bidirectional import BidirectionalLM
        from bilm.modules.weight_file import save_weights
        from bilm.runs.config import load_config
        directory = os.path.join(args.work, "original-random")
        if not os.path.exists(os.path.join(directory, "weights.hdf5")):
            os.makedirs(directory, exist_ok=True)
            options = load_config([os.path.join(ROOT, "configs", "elmo_original.yaml")], []).model
            with open(os.path.join(directory, "options.json"), "w") as f:
                json.dump(options.to_dict(), f)
            torch.manual_seed(0)
            save_weights(BidirectionalLM(BiLMOptions.from_dict(options.to_dict())),
                         os.path.join(directory, "weights.hdf5"))
    cache = os.path.join(args.work, f"timing-cache-{args.size}")
    subprocess.run(["rm", "-rf", cache], check=True)
    runs = []
    for state in ("cold", "warm"):
        out = os.path.join(args.work, f"timing-{args.size}-{state}.json")
        extra = ["--max-train", str(args.max_train)] if args.max_train else []
        seconds = bilm("probe", "--model", directory, "--task", "classify",
                       "--train", os.path.join(data, "mr/train.tsv"), "--test", os.path.join(data, "mr/test.tsv"),
                       "--no-progress", "--cache-dir", cache, "--json", out, "--force", *extra)
        report = json.load(open(out))
        runs.append({"cache": state, "wall_seconds": seconds, "seconds": report["seconds"],
                     "train_examples": report["train_examples"] + report["dev_examples"],
                     "test_examples": report["test_examples"], "max_train": args.max_train})
    with open(os.path.join(args.work, f"timing-{args.size}.json"), "w") as f:
        json.dump({"size": args.size, "threads": torch.get_num_threads(), "runs": runs}, f, indent=2)
    print(json.dumps(runs, indent=2))


# ----------------------------------------------------------------------------- report

def _cell(result: dict, metric: str) -> str:
    return f"{result[metric]['mean']:.2f} ± {result[metric]['std']:.2f}"


def report(args) -> None:
    models = [m for m in ("demo", "default", "adam-warmup")
              if any(os.path.exists(os.path.join(args.work, f"probe-{m}-{t}.json")) for t in TASKS)]
    columns = [*SETTINGS.split(","), "random:mix"]
    lines = [f"# bilm probe: what the vectors are worth ({datetime.date.today().isoformat()})", "",
             f"Machine: {machine_line()}; `lscpu` flags: {cpu_flags()}", "",
             "Made by `benchmarks/probe.py` (its docstring lists the stages). Test scores in percent, mean ± "
             "standard deviation over 3 seeds of a linear head (Adam, early stopping on a dev split of 10% of the "
             "training file); `random:mix` is the mix of a biLM of the same shape with the initial weights of a "
             "training run (seed 0).", ""]
    collected: dict = {"machine": machine_line(), "models": {}}
    for task, label in (("mr", "MR sentence polarity, accuracy"), ("ewt", "UD English-EWT POS, accuracy")):
        lines += [f"## {label}", "", "| model | heldout ppl (test.txt 5%) | valid.txt ppl | "
                  + " | ".join(columns) + " | mix weights (0, 1, 2) | probe wall s |",
                  "| --- | --- | --- | " + " | ".join("---" for _ in columns) + " | --- | --- |"]
        for model in models:
            path = os.path.join(args.work, f"probe-{model}-{task}.json")
            if not os.path.exists(path):
                continue
            result = json.load(open(path))
            collected["models"].setdefault(model, {})[task] = result
            ppl = ["-", "-"]
            evaluation = os.path.join(args.work, model, "evaluate.json")
            if os.path.exists(evaluation):
                e = json.load(open(evaluation))
                ppl = [f"{e['heldout']['average_perplexity']:.1f}", f"{e['valid']['average_perplexity']:.1f}"]
                collected["models"][model]["perplexity"] = {k: e[k]["average_perplexity"] for k in e}
            weights = ", ".join(f"{w:.2f}" for w in result["results"]["mix"]["mix_weights"])
            lines.append(f"| {model} | {ppl[0]} | {ppl[1]} | "
                         + " | ".join(_cell(result["results"][c], "accuracy") for c in columns)
                         + f" | {weights} | {result.get('wall_seconds', 0):.0f} |")
            if result.get("subsample"):
                lines.append(f"| | training file subsampled: {result['subsample']['examples']} of "
                             f"{result['train_file_examples']} | | | | | | | | |")
        lines.append("")
    for model in models:
        steps = os.path.join(args.work, model, "train_seconds.jsonl")
        if os.path.exists(steps):
            chunks = [json.loads(line) for line in open(steps)]
            lines.append(f"Training `{model}`: {chunks[-1]['to']} steps in {sum(c['seconds'] for c in chunks):.0f} s "
                         f"({len(chunks)} resumed chunks).")
    lines.append("")
    for size in ("demo", "original"):
        path = os.path.join(args.work, f"timing-{size}.json")
        if os.path.exists(path):
            t = json.load(open(path))
            collected[f"timing-{size}"] = t
            for run in t["runs"]:
                sample = f" (training file subsampled to {run['max_train']})" if run["max_train"] else ""
                lines.append(f"Timing, `{size}` biLM, MR{sample}, {run['cache']} cache: `bilm probe` "
                             f"{run['wall_seconds']:.1f} s wall (embedding {run['seconds']['embed']:.1f} s, "
                             f"heads {run['seconds']['heads']:.1f} s; "
                             f"{run['train_examples']} + {run['test_examples']} sentences; {t['threads']} threads).")
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    plot_models(collected["models"], columns, os.path.splitext(args.out)[0] + ".png")
    with open(args.out, "w") as f:
        f.write(text)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(collected, f, indent=2)
    print(text)


def plot_models(models: dict, columns: list[str], path: str) -> None:
    """Grouped bars: each task a panel, each setting a group, each model a bar (error bar: the seeds' std)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in ("mr", "ewt") if any(t in m for m in models.values())]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 3.8), squeeze=False)
    names = list(models)
    width = 0.8 / max(len(names), 1)
    for ax, task in zip(axes[0], tasks):
        low = 100.0
        for i, model in enumerate(names):
            result = models[model].get(task)
            if result is None:
                continue
            means = [result["results"][c]["accuracy"]["mean"] for c in columns]
            stds = [result["results"][c]["accuracy"]["std"] for c in columns]
            low = min(low, *means)
            ax.bar([k + (i - (len(names) - 1) / 2) * width for k in range(len(columns))], means, width, yerr=stds,
                   capsize=2, label=model)
        ax.set_xticks(range(len(columns)), columns)
        ax.set_ylim(max(0.0, low - 5), None)
        ax.set_title({"mr": "MR polarity", "ewt": "UD English-EWT POS"}[task], fontsize=10)
        ax.set_ylabel("test accuracy (%)")
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["prepare", "train", "evaluate", "probe", "timing", "report"])
    parser.add_argument("--work", default="/tmp/bilm-probe-bench")
    parser.add_argument("--corpora", default=CORPORA, help="the shared corpora folder (wikitext-2/, probe/)")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="default")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--chunk", type=int, default=2000)
    parser.add_argument("--model", choices=["demo", "default", "adam-warmup"], default="demo")
    parser.add_argument("--task", choices=sorted(TASKS), default="mr")
    parser.add_argument("--size", choices=["demo", "original"], default="demo")
    parser.add_argument("--max-train", type=int)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                      f"probe-{datetime.date.today().isoformat()}.md"))
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    {"prepare": prepare, "train": train, "evaluate": evaluate, "probe": probe, "timing": timing,
     "report": report}[args.stage](args)


if __name__ == "__main__":
    main()
