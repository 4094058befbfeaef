"""Does training diverge, and does the guard or another recipe prevent it? Seeds x recipes on issue 10's parity run.

    python benchmarks/divergence.py [--seeds 0 1 2 3 4 5] [--batches 400] [--work /tmp/bilm-divergence]
        [--recipes bilmtf rollback adam adam-warmup] [--smoke] [--report]

The run of benchmarks/parity_bilmtf.py (WikiText-2 valid.txt to train, test.txt held out; LSTM 2 x
1024/128, char CNN of 2048 filters, batch 32 x 20, 1024 negatives, 400 batches), bilm only, with
one of these recipes per run (each run, and its evaluation, is reused when found in --work):

    bilmtf    the bilm-tf recipe as today (Adagrad 0.2); the guard only watches (on_divergence: warn)
    rollback  the same, with the guard acting (on_divergence: rollback, checkpoints at every evaluation);
              run on the seeds where ``bilmtf`` diverged (``--rollback-all``: on every seed)
    rollback-skip    the same, skipping the batches the abandoned stretch trained on (rollback_skip_data)
    rollback-back    rollback-skip, each rollback in a row one checkpoint further back (rollback_further_back)
    adam      Adam, learning rate 0.002 (the guard watches)
    adam-decay       Adam 0.002, decayed linearly to 0 at the last batch (the guard watches)
    adam-warmup      Adam 0.004, reached linearly over the first 100 batches (the guard watches)
    adam-beta0.99    Adam 0.003 with beta2 0.99 (the guard watches)

While training, the guard watches ``--watch-data`` (default: the scored heldout file, test.txt as
``bilm prepare`` tokenized and shuffled it, of which the guard reads the first ``--eval-tokens``
tokens: a small part of the scored data, used only to decide rollbacks), scored with carried states
as the final evaluation is. At the end every run is scored by ``bilm evaluate`` on the whole of that
file, and a direction has diverged when its perplexity is above the add-one unigram model's. The table (per seed and direction: perplexity,
diverged or not, training tokens/s, wall time, guard firings) is printed and written to
--work/divergence.md and .json.

``--smoke`` runs the same pipeline on the bundled sample with a tiny model in seconds (tests do).
Run one at a time, alone on the machine: the wall times are part of the result.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from machine import machine_line  # noqa: E402
from parity_bilmtf import add_run_arguments, prepare, run_bilm, single_arch, unigram_perplexity  # noqa: E402

EXIT_DIVERGED = 3  # bilm.cli.EXIT_DIVERGED (not imported: the benchmark runs bilm as a user does)

RECIPES = {
    "bilmtf": ["train.on_divergence=warn"],
    "rollback": ["train.on_divergence=rollback", "train.rollback_skip_data=false", "train.rollback_further_back=false"],
    "rollback-skip": ["train.on_divergence=rollback", "train.rollback_skip_data=true"],
    "rollback-back": ["train.on_divergence=rollback", "train.rollback_skip_data=true", "train.rollback_further_back=true"],
    "adam": ["train.on_divergence=warn", "optim.name=adam", "optim.lr=0.002"],
    "adam-decay": ["train.on_divergence=warn", "optim.name=adam", "optim.lr=0.002", "optim.decay=linear"],
    "adam-warmup": ["train.on_divergence=warn", "optim.name=adam", "optim.lr=0.004", "optim.warmup_steps=100"],
    "adam-beta0.99": ["train.on_divergence=warn", "optim.name=adam", "optim.lr=0.003", "optim.adam_betas=[0.9, 0.99]"],
}


def guard_settings(a) -> list[str]:
    """The guard watches every --eval-every batches; a checkpoint there is a place to roll back to."""
    return [f"train.eval_every_steps={a.eval_every}", f"train.eval_tokens={a.eval_tokens}",
            f"train.checkpoint_every_steps={a.eval_every}", "train.keep_checkpoints=2"]


def run_recipe(a, recipe: str, seed: int, manifest: str, heldout: str) -> dict:
    args = types.SimpleNamespace(**vars(a))
    args.tag = recipe
    args.bilm_set = [*guard_settings(a), *RECIPES[recipe], *a.bilm_set]
    result = run_bilm(args, single_arch(a), a.work, seed, manifest, heldout, extra_args=("--eval-data", a.watch_data),
                      ok=(0, EXIT_DIVERGED))
    run = os.path.join(a.work, f"bilm-{recipe}-seed{seed}")
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    events = [r for r in rows if r.get("event") == "divergence"]
    result["firings"] = {action: sum(e["action"] == action for e in events) for action in ("warn", "rollback", "stop")}
    result["stopped"] = any(e["action"] == "stop" for e in events)
    # The checkpoint bilm evaluate scored: the newest of the series (a stopped run's last good one).
    steps = [int(name[5:-3]) for name in os.listdir(os.path.join(run, "checkpoints"))
             if name.startswith("step-") and name.endswith(".pt")]
    result["scored_step"] = max(steps) if steps else None
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(p, work="/tmp/bilm-divergence", seeds=[0, 1, 2, 3, 4, 5])
    p.add_argument("--watch-data", help="what the guard watches while training (--eval-data; default: the scored "
                                        "heldout file)")
    p.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=["bilmtf", "rollback", "adam", "adam-warmup"])
    p.add_argument("--rollback-all", action="store_true", help="run the rollback recipe on every seed")
    p.add_argument("--eval-every", type=int, default=50, help="batches between the guard's evaluations")
    p.add_argument("--eval-tokens", type=int, default=10000, help="tokens the guard scores each time")
    p.add_argument("--bilm-set", action="append", default=[], metavar="KEY=VALUE", help="extra --set for every run")
    p.add_argument("--smoke", action="store_true", help="the bundled sample, a tiny model, a few batches")
    p.add_argument("--report", action="store_true",
                   help="train nothing: the table of the runs already finished in --work (e.g. while others run)")
    a = p.parse_args()
    os.makedirs(os.path.join(a.work, "data"), exist_ok=True)
    if a.smoke:  # slices of the bundled sample
        for name, lines in (("train", 300), ("heldout", 20)):
            with open(os.path.join(ROOT, "data", "sample", f"{name}.txt"), encoding="utf-8") as f:
                head = [line for _, line in zip(range(lines), f)]
            path = os.path.join(a.work, f"smoke-{name}.txt")
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(head)
            setattr(a, f"{name}_text", path)
        a.batches, a.warmup, a.eval_every, a.eval_tokens = 4, 0, 2, 300
        a.batch_size, a.unroll, a.negatives, a.lstm_dim, a.projection_dim = 4, 5, 64, 32, 16
        a.rollback_all = True

    manifest, heldout, _ = prepare(single_arch(a), os.path.join(a.work, "data"))
    a.watch_data = a.watch_data or heldout
    unigram = unigram_perplexity(manifest, heldout)
    diverged = lambda r, d: r["bilm_eval"][d] > unigram
    runs: dict[str, dict[int, dict]] = {recipe: {} for recipe in a.recipes}
    for seed in a.seeds:
        for recipe in a.recipes:
            if recipe.startswith("rollback") and not a.rollback_all and "bilmtf" in runs:
                base = runs["bilmtf"].get(seed)
                if base is not None and not any(diverged(base, d) for d in ("forward", "backward")):
                    continue  # the guard is for the seeds that diverge
            if a.report and not os.path.exists(os.path.join(a.work, f"bilm-{recipe}-seed{seed}.json")):
                continue  # not finished (or not started)
            print(f"{recipe}, seed {seed}", flush=True)
            runs[recipe][seed] = run_recipe(a, recipe, seed, manifest, heldout)

    lines = [f"{a.batches} batches of {a.batch_size} x {a.unroll}, LSTM 2 x {a.lstm_dim}/{a.projection_dim}, "
             f"{a.negatives} negatives; guard: heldout every {a.eval_every} batches on {a.eval_tokens:,} tokens of "
             f"{os.path.basename(a.watch_data)} (carried states); {machine_line()}",
             f"add-one unigram heldout perplexity: {unigram:.1f} (a direction above it has diverged)", "",
             "| recipe | seed | forward | backward | diverged | scored step | tokens/s | wall s | guard firings |",
             "|---|---|---|---|---|---|---|---|---|"]
    for recipe, by_seed in runs.items():
        for seed, r in sorted(by_seed.items()):
            e = r["bilm_eval"]
            bad = [d for d in ("forward", "backward") if diverged(r, d)]
            firings = ", ".join(f"{n} {k}" for k, n in r["firings"].items() if n) or "none"
            lines.append(f"| {recipe} | {seed} | {e['forward']:.1f} | {e['backward']:.1f} | "
                         f"{', '.join(bad) or 'no'} | {r['scored_step']} | {r['tokens_per_s']:.0f} | {r['wall_s']:.0f} | {firings} |")
    lines.append("")
    for recipe, by_seed in runs.items():
        results = list(by_seed.values())
        n_bad = sum(any(diverged(r, d) for d in ("forward", "backward")) for r in results)
        healthy = [r for r in results if not any(diverged(r, d) for d in ("forward", "backward"))]
        median = statistics.median(r["bilm_eval"]["ppl"] for r in healthy) if healthy else float("nan")
        lines.append(f"{recipe}: {n_bad} of {len(results)} seeds diverged; median heldout perplexity of the healthy "
                     f"seeds {median:.1f}")
    text = "\n".join(lines)
    print("\n" + text)
    with open(os.path.join(a.work, "divergence.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(a.work, "divergence.json"), "w") as f:
        json.dump({"unigram": unigram, "runs": {k: {str(s): r for s, r in v.items()} for k, v in runs.items()}}, f,
                  indent=1)


if __name__ == "__main__":
    main()
