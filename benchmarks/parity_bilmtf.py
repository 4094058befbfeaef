"""bilm vs the original bilm-tf, side by side: same data, same configuration, N batches each, heldout perplexity.

    python benchmarks/parity_bilmtf.py --tf-python /tmp/tf-venv/bin/python --peer-src /tmp/bilm-tf \\
        [--batches 400] [--seeds 0 1] [--work /tmp/bilm-parity]
    python benchmarks/parity_bilmtf.py --grid --tf-python ... --peer-src ... [--seeds 0 1 2] [--batches 300] \
        [--configs NAME ...]   # a part of the grid; finished runs are reused, the table shows what exists
    python benchmarks/parity_bilmtf.py --grid --smoke --tf-python ... --peer-src ...   # the grid's path, in minutes

``--grid`` runs every configuration of ``grid()`` (LSTM 512 / 1024, 1 / 2 highway layers, two filter
sets, WikiText-2's valid or test split to train on, the other held out), each seed, each tool, and
prints one table: heldout perplexity (average, forward, backward; one evaluator for both), training
tokens/s, and bilm / bilm-tf median ratios per configuration and direction, the worst one named. Under
it, lines that read the whole grid: a pooled ratio over healthy seeds with a bootstrap interval, and how
often two tools equal by construction would meet the goal with these seeds (``null_pass_rate``) and with
3 to 30 seeds each (resampled, and in a normal model). It also writes WORK/grid/results.json.
``--smoke`` shrinks every size (tiny LSTMs and char CNNs, 3 batches of 4 x 5, 400 lines of data/sample's
text, one seed) to check the whole path; its figures mean nothing.

Neither TensorFlow nor bilm-tf is a dependency of bilm: give a Python that has tensorflow-cpu 2.15
(+ numpy<2, h5py) and an unmodified bilm-tf tree (../shared/peers/README.md says how to make both).
bilm-tf runs through ../shared/peers/harness/bilmtf_train.py (its own train() and test(), unmodified).

What runs, each stage reused when its output is already in --work:
1. ``bilm prepare`` of the training text and, separately, of the heldout text (the default is
   WikiText-2: valid.txt to train on, test.txt held out); both tools read these shards and vocab.
2. Per seed, bilm-tf: train() for N batches, then its own test() (batch 256, unroll 1; it stops at
   the first row that runs out of data, so it skips the tail; ``--grid`` skips it). Its checkpoint is
   then imported with ``bilm import-bilm-tf`` and scored with ``bilm evaluate`` too: one evaluator for
   both models.
3. Per seed, bilm: ``bilm train`` with the same configuration for N steps, then ``bilm evaluate``.
4. One table: heldout perplexity (each tool's evaluator, and bilm's evaluator for both), forward and
   backward, and training tokens/s (forward tokens, after --warmup batches; both directions train).
   With ``--grid``, steps 1-3 for every configuration (prepared data shared by the configurations that
   train on the same split), then one table for all.

Run one timed job at a time: on 2 cores, two trainings at once slow each other down many times over.
The figures in the README came from this script (the machine is printed with them).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("BILM_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))  # peers/, corpora/
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from machine import machine_line  # noqa: E402  (benchmarks/machine.py)

# The configurations compared, in bilm-tf's options and in bilm's --set keys.
FILTERS_2048 = [[1, 32], [2, 32], [3, 64], [4, 128], [5, 256], [6, 512], [7, 1024]]  # bilm-tf's default CNN
FILTERS_512 = [[1, 32], [2, 32], [3, 64], [4, 128], [5, 256]]                       # configs/elmo_small.yaml's
FILTERS = FILTERS_2048


@dataclass(frozen=True)
class Arch:
    """One configuration of the comparison: the architecture and the text it trains on / holds out."""
    name: str
    lstm_dim: int
    projection_dim: int
    n_highway: int
    filters: tuple
    train_split: str  # which text trains ("valid" or "test" of WikiText-2 in the grid): runs on one split share data
    train_text: str
    heldout_text: str


def grid(corpus_dir: str) -> list[Arch]:
    """The parity grid: LSTM 512 / 1024, 1 / 2 highway layers, 2048 / 512 filters, and which WikiText-2
    split trains (the other is held out); the first is issue 10's run."""
    split = {"valid": (os.path.join(corpus_dir, "valid.txt"), os.path.join(corpus_dir, "test.txt")),
             "test": (os.path.join(corpus_dir, "test.txt"), os.path.join(corpus_dir, "valid.txt"))}
    return [Arch("1024-hw2-f2048-valid", 1024, 128, 2, _tuple(FILTERS_2048), "valid", *split["valid"]),
            Arch("512-hw1-f512-valid", 512, 128, 1, _tuple(FILTERS_512), "valid", *split["valid"]),
            Arch("512-hw2-f2048-test", 512, 128, 2, _tuple(FILTERS_2048), "test", *split["test"]),
            Arch("1024-hw1-f512-test", 1024, 128, 1, _tuple(FILTERS_512), "test", *split["test"])]


def _tuple(filters: list) -> tuple:
    return tuple(tuple(f) for f in filters)


SMOKE_LINES = 400  # lines of each data/sample text a smoke run reads


def smoke_texts(work: str) -> str:
    """The head of data/sample's train.txt and heldout.txt in ``work`` (the smoke runs' two "splits")."""
    os.makedirs(work, exist_ok=True)
    for name in ("train.txt", "heldout.txt"):
        with open(os.path.join(ROOT, "data", "sample", name), encoding="utf-8") as f:
            head = [line for _, line in zip(range(SMOKE_LINES), f)]
        with open(os.path.join(work, name), "w", encoding="utf-8") as f:
            f.writelines(head)
    return work


def smoke_arch(arch: Arch, sample_dir: str) -> Arch:
    """The same configuration shrunk to seconds (tiny LSTM and CNN), on ``smoke_texts``."""
    texts = [os.path.join(sample_dir, "train.txt"), os.path.join(sample_dir, "heldout.txt")]
    if arch.train_split != "valid":  # the other split trains: swap the texts as the grid swaps them
        texts.reverse()
    return replace(arch, lstm_dim=arch.lstm_dim // 32, projection_dim=arch.projection_dim // 8,
                   filters=tuple((w, max(1, n // 32)) for w, n in arch.filters),
                   train_text=texts[0], heldout_text=texts[1])


def bilmtf_options(a, arch: Arch) -> dict:
    return {"lstm": {"dim": arch.lstm_dim, "projection_dim": arch.projection_dim}, "batch_size": a.batch_size,
            "unroll_steps": a.unroll, "n_negative_samples_batch": a.negatives, "dropout": a.dropout,
            "all_clip_norm_val": 10.0,
            "char_cnn": {"filters": [list(f) for f in arch.filters], "n_highway": arch.n_highway,
                         "embedding": {"dim": 16}}}


def bilm_overrides(a, arch: Arch, seed: int) -> list[str]:
    return [f"model.lstm.dim={arch.lstm_dim}", f"model.lstm.projection_dim={arch.projection_dim}",
            "model.lstm.n_layers=2", "model.lstm.cell_clip=3", "model.lstm.proj_clip=3",
            "model.lstm.use_skip_connections=true", f"model.char_cnn.filters={json.dumps([list(f) for f in arch.filters])}",
            f"model.char_cnn.n_highway={arch.n_highway}", "model.char_cnn.embedding.dim=16",
            "model.char_cnn.activation=relu", "model.char_cnn.max_characters_per_token=50",
            f"train.batch_size={a.batch_size}", f"train.unroll_steps={a.unroll}", f"train.max_steps={a.batches}",
            f"train.n_negative_samples_batch={a.negatives}", f"train.dropout={a.dropout}", f"train.seed={seed}",
            f"train.log_every_steps={a.log_every}", f"train.checkpoint_every_steps={a.batches}", "train.device=cpu",
            "optim.name=adagrad", "optim.lr=0.2", "optim.initial_accumulator_value=1.0", "optim.max_grad_norm=10.0",
            *a.bilm_set]


def sh(cmd: list[str], log: str, env: dict | None = None, ok: tuple[int, ...] = (0,)) -> str:
    print("  $ " + " ".join(cmd), flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    text = open(log).read()
    if proc.returncode not in ok:
        raise SystemExit(f"failed ({proc.returncode}); last lines of {log}:\n" + "\n".join(text.splitlines()[-15:]))
    return text


def bilm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "bilm.cli", *args]


def prepare(arch: Arch, data: str) -> tuple[str, str, str]:
    """``bilm prepare`` of the training and the heldout text into ``data`` (reused when there)."""
    for name, text in (("train", arch.train_text), ("heldout", arch.heldout_text)):
        out = os.path.join(data, name)
        if not os.path.exists(os.path.join(out, "manifest.json")):
            os.makedirs(data, exist_ok=True)
            sh(bilm_cmd("prepare", text, "--out", out, "--heldout-fraction", "0", "--no-progress"),
               os.path.join(data, f"prepare-{name}.log"))
    return (os.path.join(data, "train", "manifest.json"), os.path.join(data, "heldout", "train", "shard-*"),
            os.path.join(data, "train", "vocab.txt"))


def evaluate(run: str, heldout: str, log: str) -> dict:
    out = sh(bilm_cmd("evaluate", "--checkpoint", run, "--data", heldout, "--pretokenized", "--device", "cpu",
                      "--json"), log)
    result = json.loads(out[out.index("{"):])
    return {"ppl": result["average_perplexity"], "forward": result["forward"]["perplexity"],
            "backward": result["backward"]["perplexity"], "tokens": result["forward"]["tokens"]}


def run_bilmtf(a, arch: Arch, work: str, seed: int, manifest: str, heldout: str, vocab: str) -> dict:
    out = os.path.join(work, f"bilmtf-seed{seed}")
    result_file = out + ".json"
    if os.path.exists(result_file):
        return json.load(open(result_file))
    train_glob = os.path.join(os.path.dirname(manifest), "train", "shard-*")
    log = out + ".log"
    if not (os.path.exists(log) and "bilm-tf train:" in open(log).read()):  # else: trained already
        if os.path.exists(out):
            subprocess.run(["rm", "-rf", out], check=True)
        sh([a.tf_python, os.path.join(a.harness, "bilmtf_train.py"), "--peer-src", a.peer_src,
            "--train-prefix", train_glob, "--heldout-prefix", heldout, "--vocab", vocab, "--out", out,
            "--batches", str(a.batches), "--warmup", str(a.warmup), "--seed", str(seed), "--skip-fixture",
            "--options-json", json.dumps(bilmtf_options(a, arch)), *(["--skip-test"] if a.grid else [])], log)
    line = [ln for ln in open(log).read().splitlines() if ln.startswith("bilm-tf train:")][-1]
    rate = float(re.search(r"bilm-tf train: ([\d.]+) tokens/s", line).group(1))
    own = re.search(r"heldout perplexity ([\d.]+)", line)  # the grid skips bilm-tf's own test(): one evaluator
    own = float(own.group(1)) if own else None
    imported = os.path.join(work, f"bilmtf-seed{seed}-imported")
    sh(bilm_cmd("import-bilm-tf", "--tf-save-dir", os.path.join(out, "ckpt"), "--vocab", vocab, "--out", imported,
                "--force"), imported + ".log")
    result = {"tokens_per_s": rate, "own_ppl": own, "bilm_eval": evaluate(imported, heldout, imported + "-eval.log")}
    json.dump(result, open(result_file, "w"), indent=1)
    return result


def run_bilm(a, arch: Arch, work: str, seed: int, manifest: str, heldout: str, extra_args: tuple[str, ...] = (),
             ok: tuple[int, ...] = (0,)) -> dict:
    """One bilm training run and its evaluation; ``extra_args`` go to ``bilm train``, whose exit code
    may be any of ``ok``."""
    out = os.path.join(work, f"bilm{'-' + a.tag if a.tag else ''}-seed{seed}")
    result_file = out + ".json"
    if os.path.exists(result_file):
        return json.load(open(result_file))
    if os.path.exists(out):
        subprocess.run(["rm", "-rf", out], check=True)
    cmd = bilm_cmd("train", "--config", os.path.join(ROOT, "configs", "elmo_small.yaml"), "--data", manifest,
                   "--out", out, "--no-progress", *extra_args)
    for override in bilm_overrides(a, arch, seed):
        cmd += ["--set", override]
    start = time.perf_counter()
    sh(cmd, out + ".log", ok=ok)
    wall = time.perf_counter() - start
    # tokens/s after the warm-up, as the bilm-tf harness counts: each logged window's tokens over its time.
    import yaml

    t = yaml.safe_load(open(os.path.join(out, "config.yaml")))["train"]
    windows = [w for w in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "tokens_per_second" in w]
    timed = [w for w in windows if w["step"] > a.warmup]
    tokens_per_window = t["batch_size"] * t["unroll_steps"] * t["log_every_steps"]
    seconds = sum(tokens_per_window / w["tokens_per_second"] for w in timed)
    result = {"tokens_per_s": tokens_per_window * len(timed) / seconds, "wall_s": wall,
              "bilm_eval": evaluate(out, heldout, out + "-eval.log")}
    json.dump(result, open(result_file, "w"), indent=1)
    return result


def spread(values: list[float]) -> str:
    """Median (robust to the odd diverged run) and every seed's value."""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"median {statistics.median(values):.1f} (seeds: {', '.join(f'{v:.1f}' for v in values)})"


def unigram_perplexity(manifest: str, heldout: str) -> float:
    """Add-one unigram perplexity of the heldout targets (words and </S>) under the training counts:
    the line a model must beat; a run above it has diverged."""
    import glob

    base = os.path.dirname(manifest)
    counts = {}
    with open(os.path.join(base, "vocab_counts.tsv"), encoding="utf-8") as f:
        for line in f:
            token, _, count = line.rstrip("\n").partition("\t")
            counts[token] = int(count or 0)
    n_sentences = json.load(open(manifest))["n_train_sentences"]
    counts["</S>"] = n_sentences
    total, size = sum(counts.values()), len(counts)
    nll, n = 0.0, 0
    for path in sorted(glob.glob(heldout)):
        with open(path, encoding="utf-8") as f:
            for line in f:
                for token in line.split() + ["</S>"]:
                    nll -= math.log((counts.get(token, counts.get("<UNK>", 0)) + 1) / (total + size))
                    n += 1
    return math.exp(nll / n)


def compare(a, arch: Arch, work: str, data: str) -> dict:
    """Every seed of both tools on one configuration: {"bilm-tf": {seed: result}, "bilm": {...}, "unigram": P}."""
    manifest, heldout, vocab = prepare(arch, data)
    runs = {"bilm-tf": {}, "bilm": {}}
    os.makedirs(work, exist_ok=True)
    for seed in a.seeds:
        if a.only != "bilm":
            print(f"{arch.name}: bilm-tf, seed {seed}", flush=True)
            runs["bilm-tf"][seed] = run_bilmtf(a, arch, work, seed, manifest, heldout, vocab)
        if a.only != "bilm-tf":
            print(f"{arch.name}: bilm, seed {seed}", flush=True)
            runs["bilm"][seed] = run_bilm(a, arch, work, seed, manifest, heldout)
    return {**runs, "unigram": unigram_perplexity(manifest, heldout)}


KEYS = {"average": "ppl", "forward": "forward", "backward": "backward"}


def median_ratios(tf: list[dict], bl: list[dict]) -> dict[str, float]:
    """bilm / bilm-tf of the median over seeds, per direction and for the average, and of tokens/s."""
    med = lambda runs, key: statistics.median(r["bilm_eval"][key] for r in runs)  # noqa: E731
    out = {name: med(bl, key) / med(tf, key) for name, key in KEYS.items()}
    out["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in bl) / \
        statistics.median(r["tokens_per_s"] for r in tf)
    return out


def healthy_logs(res: dict, tool: str, key: str) -> list[float]:
    """One tool's log-perplexities in one direction of one configuration, over its healthy seeds (a direction
    at or below the unigram model)."""
    return [math.log(r["bilm_eval"][key]) for r in res[tool].values() if r["bilm_eval"][key] <= res["unigram"]]


def pooled_ratio(results: dict[str, dict], n_boot: int = 2000) -> tuple[float, float, float, int] | None:
    """bilm / bilm-tf over the whole grid: the geometric mean, over configurations and directions, of the ratio
    of each tool's geometric-mean perplexity over its healthy seeds (``healthy_logs``), with
    a 95% bootstrap interval (seeds resampled within each tool and cell). It pools what one cell's median of
    three cannot resolve; divergences are counted apart, in the table's last column.
    Returns (ratio, low, high, cells), or None when no cell has healthy runs of both tools."""
    cells = []  # (bilm log-perplexities, bilm-tf log-perplexities) per configuration and direction
    for res in results.values():
        for key in ("forward", "backward"):
            logs = [healthy_logs(res, tool, key) for tool in ("bilm", "bilm-tf")]
            if all(logs):
                cells.append(logs)
    if not cells:
        return None
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    gap = lambda draw: mean([mean(draw(bl)) - mean(draw(tf)) for bl, tf in cells])  # noqa: E731
    rng = random.Random(0)  # the same interval each time the table is printed
    boot = sorted(gap(lambda xs: rng.choices(xs, k=len(xs))) for _ in range(n_boot))
    low, high = boot[int(0.025 * n_boot)], boot[int(0.975 * n_boot) - 1]
    return math.exp(gap(lambda xs: xs)), math.exp(low), math.exp(high), len(cells)


def null_pass_rate(results: dict[str, dict], goal: float = 1.03, n_draws: int = 2000,
                   seeds: int | None = None) -> float | None:
    """How often two tools that are the same by construction would meet the grid's goal: each configuration's
    runs of both tools are shuffled and dealt back to the two sides (as many as each had), and every median
    ratio (average, forward, backward, every configuration) is checked against ``goal``. A low rate says the
    goal, at these seed counts, cannot separate a real gap from the seed-to-seed spread. With ``seeds``, each
    side instead draws that many runs with replacement from the configuration's pooled runs: the rate a grid
    of that many seeds per tool would have, if the runs so far show the spread. None without runs."""
    pools = [(list(res["bilm-tf"].values()) + list(res["bilm"].values()), len(res["bilm-tf"]))
             for res in results.values() if res["bilm-tf"] and res["bilm"]]
    if not pools:
        return None
    rng = random.Random(0)
    passed = 0
    for _ in range(n_draws):
        ok = True
        for runs, n_tf in pools:
            if seeds is None:
                dealt = rng.sample(runs, len(runs))
                tf_side, bilm_side = dealt[:n_tf], dealt[n_tf:]
            else:
                tf_side, bilm_side = rng.choices(runs, k=seeds), rng.choices(runs, k=seeds)
            ratios = median_ratios(tf_side, bilm_side)
            ok = ok and all(ratios[key] <= goal for key in KEYS)
        passed += ok
    return passed / n_draws


SEED_COUNTS = (3, 5, 10, 20, 30)  # the grid sizes the "equal tools at N seeds" line projects to


def normal_pass_rate(results: dict[str, dict], seeds: int, goal: float = 1.03) -> tuple[float, float] | None:
    """A cross-check on ``null_pass_rate(seeds=...)``, which errs low (a median of N resampled runs straddles the
    gaps between the few runs there are): equal tools whose healthy log-perplexities are normal, with the sd the
    median over configurations, directions and tools of the healthy runs' sample sd; no divergences and no
    average column (optimistic); every configuration-direction independent (pessimistic, as they correlate).
    A median of N has sd sqrt(pi / 2) sd / sqrt(N), a ratio of two medians sqrt(2) times that: sqrt(pi) sd /
    sqrt(N). Returns (pass rate, sd), or None with fewer than two healthy runs in every cell."""
    sds = []
    for res in results.values():
        for key in ("forward", "backward"):
            for tool in ("bilm", "bilm-tf"):
                logs = healthy_logs(res, tool, key)
                if len(logs) > 1:
                    sds.append(statistics.stdev(logs))
    if not sds:
        return None
    sd = statistics.median(sds)
    ratio_sd = math.sqrt(math.pi) * sd / math.sqrt(seeds)
    cells = 2 * sum(1 for res in results.values() if res["bilm-tf"] and res["bilm"])
    per_cell = statistics.NormalDist().cdf(math.log(goal) / ratio_sd) if ratio_sd > 0 else 1.0
    return per_cell ** cells, sd


def grid_table(results: dict[str, dict]) -> list[str]:
    """Markdown lines: one row per configuration and tool (medians and every seed), the ratio row of each
    configuration, the worst ratio over configurations and directions, then the grid-wide lines (pooled ratio,
    equal tools now, at N seeds resampled, at N seeds in a normal model)."""
    lines = ["| configuration | tool | average | forward | backward | tokens/s | diverged |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    worst = None
    for name, res in results.items():
        for tool in ("bilm-tf", "bilm"):
            runs = list(res[tool].values())
            if not runs:
                continue
            cells = [spread([r["bilm_eval"][key] for r in runs]) for key in KEYS.values()]
            rate = spread([r["tokens_per_s"] for r in runs])
            # diverged: a direction above the add-one unigram model (issue 21's test), even if the average is not
            diverged = sum(max(r["bilm_eval"]["forward"], r["bilm_eval"]["backward"]) > res["unigram"] for r in runs)
            lines.append(f"| {name} | {tool} | {' | '.join(cells)} | {rate} | {diverged} of {len(runs)} |")
        if res["bilm-tf"] and res["bilm"]:
            ratios = median_ratios(list(res["bilm-tf"].values()), list(res["bilm"].values()))
            lines.append(f"| {name} | **bilm / bilm-tf** | " + " | ".join(f"**{ratios[k]:.3f}**" for k in KEYS) +
                         f" | {ratios['tokens_per_s']:.2f} | |")
            for key in KEYS:
                if worst is None or ratios[key] > worst[0]:
                    worst = (ratios[key], name, key)
    if worst is not None:
        lines.append("")
        lines.append(f"worst median ratio: {worst[0]:.3f} ({worst[1]}, {worst[2]}); goal <= 1.03 everywhere")
    pooled = pooled_ratio(results)
    if pooled is not None:
        ratio, low, high, n_cells = pooled
        lines.append(f"pooled over {n_cells} configuration-directions, healthy seeds: bilm / bilm-tf {ratio:.3f} "
                     f"(95% bootstrap interval {low:.3f}-{high:.3f})")
    null = null_pass_rate(results)
    if null is not None:
        lines.append(f"two tools equal by construction (each configuration's runs shuffled between the sides) meet "
                     f"the goal in {100 * null:.0f}% of 2000 draws")
        at = ", ".join(f"{n}: {100 * null_pass_rate(results, seeds=n, n_draws=1000):.0f}%" for n in SEED_COUNTS)
        lines.append(f"the same, at N seeds per tool (each side's runs drawn with replacement from the configuration's "
                     f"runs of both tools): {at}")
        normal = [normal_pass_rate(results, n) for n in SEED_COUNTS]
        if normal[0] is not None:
            at = ", ".join(f"{n}: {100 * rate:.0f}%" for n, (rate, _) in zip(SEED_COUNTS, normal))
            lines.append(f"the same in a normal model (healthy runs' sd of log-perplexity {100 * normal[0][1]:.1f}%, "
                         f"no divergences, independent configuration-directions): {at}")
    return lines


def run_grid(a) -> None:
    archs = grid(a.corpus_dir)
    if a.configs:
        unknown = set(a.configs) - {arch.name for arch in archs}
        if unknown:
            sys.exit(f"--configs: no configuration {sorted(unknown)}; the grid has {[arch.name for arch in archs]}")
        by_name = {arch.name: arch for arch in archs}
        archs = [by_name[name] for name in dict.fromkeys(a.configs)]  # in the order given, once each
    base = os.path.join(a.work, "grid")
    if a.smoke:
        texts = smoke_texts(os.path.join(base, "smoke-text"))
        archs = [smoke_arch(arch, texts) for arch in archs]
    results, configurations = {}, {}
    saved = os.path.join(base, "results.json")
    if a.configs and os.path.exists(saved):  # a part of the grid: keep the other parts' results
        previous = json.load(open(saved))
        results, configurations = previous["results"], previous["configurations"]
    for arch in archs:  # in --configs' order; results.json after each, so a cut-off grid keeps what finished
        results[arch.name] = compare(a, arch, os.path.join(base, arch.name),
                                     os.path.join(base, f"data-{arch.train_split}"))
        configurations[arch.name] = asdict(arch)
        with open(saved, "w") as f:
            json.dump({"machine": machine_line(), "date": time.strftime("%Y-%m-%d"), "args": vars(a),
                       "configurations": configurations, "results": results}, f, indent=1)
    print(f"\n{a.batches} batches of {a.batch_size} x {a.unroll}, {a.negatives} negatives, Adagrad 0.2, clip 10, "
          f"dropout {a.dropout}; seeds {a.seeds}; both models scored by bilm evaluate; {machine_line()}, "
          f"{time.strftime('%Y-%m-%d')}" + (" (SMOKE: tiny sizes, figures mean nothing)" if a.smoke else ""))
    print("\n".join(grid_table(results)))
    print(f"(written to {os.path.join(base, 'results.json')})")


def add_run_arguments(p: argparse.ArgumentParser, work: str, seeds: list[int]) -> None:
    """The data and the run's shape (issue 10's run by default); benchmarks/divergence.py shares them."""
    p.add_argument("--train-text", default=os.path.join(SHARED, "corpora", "wikitext-2", "valid.txt"))
    p.add_argument("--heldout-text", default=os.path.join(SHARED, "corpora", "wikitext-2", "test.txt"))
    p.add_argument("--work", default=work, help="runs and results (reused when present)")
    p.add_argument("--batches", type=int, default=400)
    p.add_argument("--warmup", type=int, default=20, help="batches left out of tokens/s")
    p.add_argument("--seeds", type=int, nargs="+", default=seeds)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--unroll", type=int, default=20)
    p.add_argument("--negatives", type=int, default=1024)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lstm-dim", type=int, default=1024)
    p.add_argument("--projection-dim", type=int, default=128)
    p.add_argument("--n-highway", type=int, default=2)
    p.add_argument("--filters", type=json.loads, default=FILTERS, help="char CNN filters, JSON [[width, count], ...]")
    p.add_argument("--log-every", type=int, default=10, help="bilm's log interval (tokens/s is measured per interval)")


def single_arch(a) -> Arch:
    """The one configuration the command line describes (not --grid)."""
    return Arch("single", a.lstm_dim, a.projection_dim, a.n_highway, _tuple(a.filters), "given", a.train_text,
                a.heldout_text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tf-python", help="a Python with tensorflow-cpu 2.15, numpy<2, h5py (not with --only bilm)")
    p.add_argument("--peer-src", help="unmodified bilm-tf source tree (not with --only bilm)")
    p.add_argument("--harness", default=os.path.join(SHARED, "peers", "harness"))
    add_run_arguments(p, work="/tmp/bilm-parity", seeds=[0, 1])
    p.add_argument("--corpus-dir", default=os.path.join(SHARED, "corpora", "wikitext-2"),
                   help="--grid: WikiText-2's valid.txt and test.txt (each trains in some configurations)")
    p.add_argument("--grid", action="store_true", help="every configuration of GRID, one table (see above)")
    p.add_argument("--smoke", action="store_true", help="with --grid: tiny sizes, 3 batches, one seed (minutes)")
    p.add_argument("--configs", nargs="+", metavar="NAME", help="with --grid: these configurations only, in this "
                   "order (finished runs are reused, so a grid can be run a part at a time)")
    p.add_argument("--only", choices=["bilm", "bilm-tf"], help="run one side only")
    p.add_argument("--bilm-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra --set for bilm's runs (e.g. optim.loss_scale=none to see the mean-loss convention)")
    p.add_argument("--tag", default="", help="name bilm's runs bilm-TAG-seedN (for variants made with --bilm-set)")
    a = p.parse_args()
    if a.only != "bilm" and not (a.tf_python and a.peer_src):
        p.error("--tf-python and --peer-src are needed to run bilm-tf (or pass --only bilm)")
    if a.smoke:
        if not a.grid:
            p.error("--smoke goes with --grid")
        # Seconds per run; a separate work dir, so smoke results never mix with real ones.
        a.batches, a.warmup, a.batch_size, a.unroll, a.negatives, a.log_every = 3, 0, 4, 5, 32, 1
        a.seeds, a.work = a.seeds[:1], a.work.rstrip("/") + "-smoke"
    if a.grid:
        run_grid(a)
        return

    arch = single_arch(a)
    res = compare(a, arch, a.work, os.path.join(a.work, "data"))
    rows = []

    def add(label: str, tf_values: list[float], bilm_values: list[float]) -> None:
        rows.append((label, spread(tf_values) if tf_values else "-", spread(bilm_values) if bilm_values else "-"))

    tf, bl = list(res["bilm-tf"].values()), list(res["bilm"].values())
    add("heldout perplexity, bilm evaluate (both models)", [r["bilm_eval"]["ppl"] for r in tf],
        [r["bilm_eval"]["ppl"] for r in bl])
    add("  forward", [r["bilm_eval"]["forward"] for r in tf], [r["bilm_eval"]["forward"] for r in bl])
    add("  backward", [r["bilm_eval"]["backward"] for r in tf], [r["bilm_eval"]["backward"] for r in bl])
    add("heldout perplexity, bilm-tf test() (its own model only)", [r["own_ppl"] for r in tf], [])
    add("training tokens/s (forward tokens)", [r["tokens_per_s"] for r in tf], [r["tokens_per_s"] for r in bl])
    unigram = res["unigram"]
    diverged = lambda runs: sum(r["bilm_eval"]["ppl"] > unigram for r in runs)  # noqa: E731
    rows.append(("runs worse than add-one unigram (diverged)", f"{diverged(tf)} of {len(tf)}" if tf else "-",
                 f"{diverged(bl)} of {len(bl)}" if bl else "-"))
    n_filters = sum(n for _, n in arch.filters)
    print(f"\n{a.batches} batches of {a.batch_size} x {a.unroll}, LSTM 2 x {a.lstm_dim}/{a.projection_dim}, "
          f"char CNN {n_filters} filters + {a.n_highway} highway, {a.negatives} negatives, Adagrad 0.2, clip 10, "
          f"dropout {a.dropout}; seeds {a.seeds}; {machine_line()}"
          + (f"; bilm with {' '.join(a.bilm_set)}" if a.bilm_set else ""))
    print(f"add-one unigram heldout perplexity (for scale): {unigram:.1f}")
    if tf and bl:
        ratios = median_ratios(tf, bl)
        print(f"bilm / bilm-tf heldout perplexity, median over seeds (bilm evaluate): {ratios['average']:.3f} "
              f"(forward {ratios['forward']:.3f}, backward {ratios['backward']:.3f})")
    width = max(len(r[0]) for r in rows)
    print(f"| {'':{width}} | bilm-tf | bilm |\n|{'-' * (width + 2)}|---|---|")
    for label, tf_text, bilm_text in rows:
        print(f"| {label:{width}} | {tf_text} | {bilm_text} |")


if __name__ == "__main__":
    main()
