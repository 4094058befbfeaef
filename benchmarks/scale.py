"""Scale: every stage of the pipeline on a 1B-Word-sized corpus, run as a user runs it (the CLI,
one process per stage), with wall time, tokens/s and peak memory per stage and corpus size.

    python benchmarks/scale.py                                   # 800M tokens, 793,471-word vocabulary
    python benchmarks/scale.py --sizes 10000000,100000000,800000000 --out-json
    python benchmarks/scale.py --tokens 2000000 --vocab-size 50000 --eval-tokens 5000   # a smoke run

The corpus (benchmarks/corpus.py: Zipfian words, a long tail of rare types, news-like sentence
lengths, 100 files ``news.en-000NN-of-00100``, plus ``vocab.txt``, the full vocabulary) is
written once into ``--work`` and reused by later runs. Then, per corpus size:

    prepare     bilm prepare (whitespace, --workers 2, --min-count 3) of the whole corpus;
                heldout fraction chosen to hold out about --eval-tokens tokens
    reader      bilm.data.LMDataset over the prepared shards with the full vocabulary and char
                ids: time to the first batch, then forward tokens/s for --reader-seconds
    train       bilm train --config configs/elmo_original.yaml with the full vocabulary on the
                CPU, --train-steps steps of --train-batch x 20 (a smaller batch than the config's
                128); step time from metrics.jsonl; the checkpoint's model and Adagrad bytes
    resume      bilm train --resume of that run for one more step: memory while restoring
    evaluate    bilm evaluate (full softmax over the vocabulary) on the heldout split
    export      bilm export; export+softmax: the same with --include-softmax
    dump        bilm dump-token-embeddings of the full vocabulary

Memory: a sampler thread walks the stage's process tree (/proc) every --interval seconds;
"largest" is the peak RSS of the largest process (its VmHWM, and the kernel's maxrss of the
process and its waited-for children as a cross-check), "all" the peak of the sum of the tree's
RSS (pages shared between processes, e.g. libraries, count in each). The model stages do not
depend on the corpus size (the vocabulary is the same; ``--model-vocab prepared`` uses the one
prepare found instead); they run at every size to show it.

Cost at full size (793k words, elmo_original, CPU): evaluate takes about 1.9 GFLOP per heldout
token (the full softmax, both directions), so the default 100k tokens take tens of minutes on
two cores, and dump-token-embeddings about 53 MFLOP per vocabulary token (the char CNN); lower
--eval-tokens for a quicker look at evaluate's memory.

Disk: about 6.8 bytes a token for the corpus and as much again for the prepared shards (800M
tokens: 5.4 GB each), plus a checkpoint of model and Adagrad state (4 GB at 793k words) and the
exports; ``--clean`` deletes all but the corpus of a size once its stages are done.

The table (markdown) is printed at the end; ``--out-json [PATH]`` also writes every figure
(default path benchmarks/results/scale-<date>.json).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(1, ROOT)
import corpus as corpus_module  # noqa: E402  (benchmarks/corpus.py)
from machine import machine_line  # noqa: E402  (benchmarks/machine.py)

STAGES = ("corpus", "prepare", "reader", "train", "resume", "evaluate", "export", "export+softmax", "dump")
CONFIG = os.path.join(ROOT, "configs", "elmo_original.yaml")


# ---------------------------------------------------------------- measuring a process tree

def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, of every process visible in /proc."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()  # after "pid (comm) "
        children.setdefault(int(fields[1]), []).append(int(name))
    return children


def _tree(root: int) -> list[int]:
    children, pids, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return pids


def _memory_kb(pid: int) -> tuple[int, int, int]:
    """(VmRSS, VmHWM, RssAnon) of a process in kB; zeros once it is gone. RssAnon leaves out
    pages of mapped files (a memory-mapped checkpoint), which the kernel can drop and read again."""
    rss = hwm = anon = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith(b"VmHWM:"):
                    hwm = int(line.split()[1])
                elif line.startswith(b"RssAnon:"):
                    anon = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm, anon


class TreeSampler(threading.Thread):
    """Peak RSS of the largest process of a tree and of the whole tree, sampled until stopped."""

    def __init__(self, root: int, interval: float):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak_largest_kb = self.peak_all_kb = self.peak_anon_kb = 0
        self.max_processes = 0
        self.timeline: list[tuple[float, int]] = []  # (seconds since start, RSS of all in kB)
        self._done = threading.Event()

    def run(self) -> None:
        started = time.perf_counter()
        while True:
            total = 0
            pids = _tree(self.root)
            for pid in pids:
                rss, hwm, anon = _memory_kb(pid)
                total += rss
                self.peak_largest_kb = max(self.peak_largest_kb, hwm)  # VmHWM >= VmRSS
                self.peak_anon_kb = max(self.peak_anon_kb, anon)  # sampled: a brief peak may be missed
            self.peak_all_kb = max(self.peak_all_kb, total)
            self.timeline.append((time.perf_counter() - started, total))
            self.max_processes = max(self.max_processes, len(pids))
            if self._done.wait(self.interval):
                return

    def stop(self) -> None:
        self._done.set()
        self.join()


def run_measured(cmd: list[str], log_path: str, env: dict, interval: float, timeout: float | None = None) -> dict:
    """Run ``cmd`` (stdout and stderr into ``log_path``), sampling its process tree's memory."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        started = time.perf_counter()
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        sampler = TreeSampler(process.pid, interval)
        sampler.start()
        timer = threading.Timer(timeout, process.kill) if timeout else None
        if timer:
            timer.start()
        # wait4: the exit status and the kernel's peak RSS of the process and its waited-for children.
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        if timer:
            timer.cancel()
        sampler.stop()
    largest_kb = max(sampler.peak_largest_kb, usage.ru_maxrss)  # ru_maxrss is in kB on Linux
    with open(log_path, encoding="utf-8", errors="replace") as f:
        output = f.read()
    return {"rc": process.returncode, "wall_s": wall, "peak_rss_largest": largest_kb * 1024,
            # the sum at any moment is at least the largest process: a stage shorter than one
            # sampling interval still gets a sound figure
            "peak_rss_all": max(sampler.peak_all_kb, largest_kb) * 1024,
            "peak_anon_largest_sampled": sampler.peak_anon_kb * 1024,
            "maxrss_wait4": usage.ru_maxrss * 1024, "processes": sampler.max_processes,
            "cpu_s": usage.ru_utime + usage.ru_stime, "output": output, "log": log_path,
            "rss_timeline": _downsample(sampler.timeline, 200)}


def _downsample(timeline: list[tuple[float, int]], n: int) -> list[tuple[float, int]]:
    """At most about ``n`` points of (seconds, MiB of all processes), each the peak of its stretch."""
    step = max(1, -(-len(timeline) // n))
    return [(round(timeline[i][0], 2), max(kb for _, kb in timeline[i:i + step]) // 1024)
            for i in range(0, len(timeline), step)]


# ---------------------------------------------------------------- the stages

class StageFailed(RuntimeError):
    pass


def _bilm(*args: str) -> list[str]:
    return [sys.executable, "-m", "bilm.cli", *args]


def _check(result: dict, stage: str) -> None:
    if result["rc"] != 0:
        tail = "\n".join(result["output"].splitlines()[-15:])
        raise StageFailed(f"{stage} failed (exit {result['rc']}; log {result['log']}):\n{tail}")


def _last_json(output: str) -> dict:
    """The last JSON object printed (a line ``{`` to the matching ``}`` at the end of the output)."""
    start = output.rfind("\n{")
    return json.loads(output[start + 1 if start >= 0 else output.index("{"):])


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([os.environ["PYTHONPATH"]]
                                                           if os.environ.get("PYTHONPATH") else []))
        if args.threads:
            for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                self.env[name] = str(args.threads)
        self.env.setdefault("TQDM_DISABLE", "1")

    def run(self, cmd: list[str], stage: str, size_dir: str) -> dict:
        result = run_measured(cmd, os.path.join(size_dir, "logs", f"{stage.replace('+', '-')}.log"), self.env,
                              self.args.interval, self.args.stage_timeout)
        _check(result, stage)
        return result

    # Each stage returns a row: tokens (what tokens/s counts), notes, extra figures.

    def corpus(self, tokens: int, size_dir: str) -> dict:
        a = self.args
        directory = self.corpus_dir(tokens)
        marker = os.path.join(directory, corpus_module.MARKER)
        cmd = [sys.executable, os.path.join(HERE, "corpus.py"), "--out", directory, "--tokens", str(tokens),
               "--vocab-size", str(a.vocab_size), "--files", str(a.files), "--seed", str(a.seed)]
        reused = os.path.exists(marker)
        result = self.run(cmd, "corpus", size_dir)
        with open(marker, encoding="utf-8") as f:
            record = json.load(f)
        row = {**result, "tokens": record["tokens"], "reused": reused,
               "corpus_bytes": record["bytes"], "sentences": record["sentences"]}
        if reused:  # the figures of the run that wrote it
            row.update(wall_s=record["seconds"], peak_rss_largest=None, peak_rss_all=None)
            row["notes"] = f"reused (written in {record['seconds']:.1f} s); {record['bytes'] / 2**30:.2f} GiB"
        else:
            row["notes"] = f"{record['bytes'] / 2**30:.2f} GiB in {a.files} files"
        return row

    def corpus_dir(self, tokens: int) -> str:
        return os.path.join(self.args.work, f"corpus-{tokens}-v{self.args.vocab_size}-s{self.args.seed}")

    def prepare(self, tokens: int, size_dir: str) -> dict:
        a = self.args
        out = os.path.join(size_dir, "prepared")
        heldout = min(0.5, a.eval_tokens / tokens)
        cmd = _bilm("prepare", os.path.join(self.corpus_dir(tokens), "news.en-*"), "--out", out, "--force",
                    "--workers", str(a.prepare_workers), "--min-count", str(a.min_count),
                    "--heldout-fraction", f"{heldout:.6g}", "--no-progress")
        result = self.run(cmd, "prepare", size_dir)
        with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
            m = json.load(f)
        tokens_in = m["n_train_tokens"] + m["n_heldout_tokens"]
        return {**result, "tokens": tokens_in, "vocab_size": m["vocab_size"],
                "distinct_tokens": m["distinct_train_tokens"], "train_shards": len(m["train"]["shards"]),
                "heldout_tokens": m["n_heldout_tokens"],
                "notes": f"vocab {m['vocab_size']:,} (of {m['distinct_train_tokens']:,} types); "
                         f"{len(m['train']['shards'])} train shards; heldout {m['n_heldout_tokens']:,} tokens"}

    def manifest(self, size_dir: str) -> str:
        path = os.path.join(size_dir, "prepared", "manifest.json")
        if not os.path.exists(path):
            raise StageFailed(f"{path} is missing: run the prepare stage first")
        return path

    def model_vocab(self, tokens: int, size_dir: str) -> str:
        if self.args.model_vocab == "full":
            return os.path.join(self.corpus_dir(tokens), "vocab.txt")
        return os.path.join(size_dir, "prepared", "vocab.txt")

    def reader(self, tokens: int, size_dir: str) -> dict:
        a = self.args
        spec = {"manifest": self.manifest(size_dir), "vocab": self.model_vocab(tokens, size_dir),
                "batch_size": a.reader_batch, "unroll_steps": 20, "seconds": a.reader_seconds}
        result = self.run([sys.executable, os.path.abspath(__file__), "_reader", json.dumps(spec)], "reader", size_dir)
        r = _last_json(result["output"])
        return {**result, **r,
                "notes": f"first batch {r['first_batch_s']:.2f} s ({r['shards_encoded_first']} of {r['shards']} "
                         f"shards encoded), vocab {r['vocab_size']:,} read in {r['vocab_s']:.2f} s; "
                         f"{r['shards_encoded']} shards encoded in {r['steady_s']:.0f} s; RSS after imports "
                         f"{_mb(r['rss_after_imports'])}, after the vocabulary {_mb(r['rss_after_vocab'])}"}

    def train(self, tokens: int, size_dir: str) -> dict:
        a = self.args
        out = os.path.join(size_dir, "run")
        if os.path.exists(out):
            shutil.rmtree(out)
        steps, batch = a.train_steps, a.train_batch
        cmd = _bilm("train", "--config", CONFIG, "--data", self.manifest(size_dir),
                    "--vocab", self.model_vocab(tokens, size_dir), "--out", out, "--device", "cpu", "--no-progress",
                    "--set", f"train.max_steps={steps}", "--set", f"train.batch_size={batch}",
                    "--set", "train.log_every_steps=1", "--set", f"train.checkpoint_every_steps={steps}",
                    "--set", "train.checkpoint_every_minutes=100000", "--set", "train.keep_checkpoints=1")
        result = self.run(cmd, "train", size_dir)
        with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
            metrics = [json.loads(line) for line in f if line.strip()]
        per_step = batch * 20
        step_s = [per_step / m["tokens_per_second"] for m in metrics]
        steady = step_s[1:] or step_s  # the first step pays for warm-up
        step = statistics.median(steady)
        sizes = checkpoint_sizes(os.path.join(out, "checkpoints"))
        expected = sizes["model_bytes"] + sizes["optimizer_bytes"] + sizes["dense_grad_bytes"]
        return {**result, "tokens": per_step * len(steady), "tokens_per_s": per_step / step, "step_s": step,
                "step_s_all": step_s, "batch": f"{batch}x20", **sizes, "expected_bytes": expected,
                "notes": f"batch {batch}x20, {steps} steps, step {step:.2f} s (median after the first); "
                         f"model {_gib(sizes['model_bytes'])} (softmax {_gib(sizes['softmax_bytes'])}) + "
                         f"Adagrad {_gib(sizes['optimizer_bytes'])} + dense grads "
                         f"{_gib(sizes['dense_grad_bytes'])} = {_gib(expected)}, plus about 0.2 GiB of "
                         "Python and torch, the reader and activations"}

    def resume(self, tokens: int, size_dir: str) -> dict:
        """One more step of the train stage's run, resumed from its checkpoint (model, Adagrad state
        and data position), as a preempted run restarts."""
        a = self.args
        out = self.run_dir(size_dir)
        steps = a.train_steps + 1
        cmd = _bilm("train", "--config", CONFIG, "--data", self.manifest(size_dir),
                    "--vocab", self.model_vocab(tokens, size_dir), "--out", out, "--device", "cpu", "--no-progress",
                    "--resume", "--set", f"train.max_steps={steps}", "--set", f"train.batch_size={a.train_batch}",
                    "--set", "train.log_every_steps=1", "--set", f"train.checkpoint_every_steps={steps}",
                    "--set", "train.checkpoint_every_minutes=100000", "--set", "train.keep_checkpoints=1")
        result = self.run(cmd, "resume", size_dir)
        if f"(step {a.train_steps})" not in result["output"]:
            raise StageFailed(f"resume did not resume from step {a.train_steps} (log {result['log']})")
        sizes = checkpoint_sizes(os.path.join(out, "checkpoints"))
        kept = sizes["model_bytes"] + sizes["optimizer_bytes"] + sizes["dense_grad_bytes"]
        return {**result, "tokens": a.train_batch * 20, **sizes, "expected_bytes": kept,
                "notes": f"from step {a.train_steps} to {steps}; peak anonymous memory (sampled) "
                         f"{_gib(result['peak_anon_largest_sampled'])} against {_gib(kept)} of model, Adagrad and "
                         f"grads; the rest of the RSS is pages of the mapped {_gib(sizes['checkpoint_file_bytes'])} "
                         "checkpoint file"}

    def run_dir(self, size_dir: str) -> str:
        path = os.path.join(size_dir, "run")
        if not glob.glob(os.path.join(path, "checkpoints", "step-*.pt")):
            raise StageFailed(f"no checkpoint in {path}: run the train stage first")
        return path

    def evaluate(self, tokens: int, size_dir: str) -> dict:
        a = self.args
        run = self.run_dir(size_dir)
        cmd = _bilm("evaluate", "--checkpoint", run, "--data", self.manifest(size_dir), "--device", "cpu",
                    "--batch-size", str(a.eval_batch), "--json")
        result = self.run(cmd, "evaluate", size_dir)
        r = _last_json(result["output"])
        n = r["forward"]["tokens"]
        sizes = checkpoint_sizes(os.path.join(run, "checkpoints"))
        over = result["peak_rss_largest"] - sizes["model_bytes"]
        return {**result, "tokens": n, "perplexity": r["average_perplexity"], "model_bytes": sizes["model_bytes"],
                "rss_over_model": over,
                "notes": f"{n:,} heldout tokens, batch {a.eval_batch}x20; model {_gib(sizes['model_bytes'])}, "
                         f"peak RSS - model = {_gib(over)}"}

    def _export(self, size_dir: str, softmax: bool) -> dict:
        name = "export+softmax" if softmax else "export"
        out = os.path.join(size_dir, name.replace("+", "-"))
        cmd = _bilm("export", "--checkpoint", self.run_dir(size_dir), "--out", out, "--force",
                    *(["--include-softmax"] if softmax else []))
        result = self.run(cmd, name, size_dir)
        files = {f: os.path.getsize(os.path.join(out, f)) for f in sorted(os.listdir(out))
                 if os.path.isfile(os.path.join(out, f))}
        return {**result, "tokens": None, "files": files,
                "notes": ", ".join(f"{f} {_mb(s)}" for f, s in files.items() if s > 1 << 20)}

    def export(self, tokens: int, size_dir: str) -> dict:
        return self._export(size_dir, softmax=False)

    def export_softmax(self, tokens: int, size_dir: str) -> dict:
        return self._export(size_dir, softmax=True)

    def dump(self, tokens: int, size_dir: str) -> dict:
        export = os.path.join(size_dir, "export")
        if not os.path.exists(os.path.join(export, "weights.hdf5")):
            raise StageFailed(f"{export}/weights.hdf5 is missing: run the export stage first")
        vocab = self.model_vocab(tokens, size_dir)
        out = os.path.join(size_dir, "token-embeddings.hdf5")
        cmd = _bilm("dump-token-embeddings", "--vocab", vocab, "--options", os.path.join(export, "options.json"),
                    "--weights", os.path.join(export, "weights.hdf5"), "--out", out)
        result = self.run(cmd, "dump", size_dir)
        with open(vocab, encoding="utf-8") as f:
            n = sum(1 for line in f if line.strip())
        return {**result, "tokens": n, "notes": f"{n:,} vocabulary tokens -> {_mb(os.path.getsize(out))}"}


def checkpoint_sizes(directory: str) -> dict:
    """Bytes of the newest checkpoint's model (and of its softmax), optimizer state, and what dense
    gradients take (every parameter but the sparse softmax's), read without loading the tensors."""
    import torch

    path = sorted(glob.glob(os.path.join(directory, "step-*.pt")))[-1]
    payload = torch.load(path, map_location="cpu", mmap=True, weights_only=True)  # as bilm reads them

    def nbytes(obj) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(nbytes(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(nbytes(v) for v in obj)
        return 0

    model = payload["model"]
    softmax = sum(nbytes(v) for k, v in model.items() if k.startswith("softmax."))
    sparse = payload["config"]["train"].get("sparse_softmax", True)
    return {"model_bytes": nbytes(model), "softmax_bytes": softmax, "optimizer_bytes": nbytes(payload.get("optimizer")),
            "dense_grad_bytes": nbytes(model) - (softmax if sparse else 0), "checkpoint_file_bytes": os.path.getsize(path)}


def reader_child(spec: dict) -> None:
    """The reader stage, in its own process: prints one JSON object."""
    started = time.perf_counter()
    import bilm.data.shards
    from bilm.data import LMDataset
    from bilm.core.vocab import Vocabulary
    import_s = time.perf_counter() - started
    rss_imports = _memory_kb(os.getpid())[0] * 1024

    encoded = []
    encode_shard = bilm.data.shards.encode_shard

    def counting_encode_shard(path, *args, **kwargs):
        result = encode_shard(path, *args, **kwargs)
        encoded.append(path)
        return result

    bilm.data.shards.encode_shard = counting_encode_shard  # the shard cache calls it by this name

    start = time.perf_counter()
    vocab = Vocabulary.from_file(spec["vocab"])
    vocab_s = time.perf_counter() - start
    rss_vocab = _memory_kb(os.getpid())[0] * 1024
    start = time.perf_counter()
    dataset = LMDataset(spec["manifest"], vocab, spec["batch_size"], spec["unroll_steps"], mode="train", seed=0,
                        rank=0, world_size=1, char_inputs=True)
    batches = iter(dataset)
    next(batches)
    first_s = time.perf_counter() - start
    shards_first = len(encoded)
    tokens, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < spec["seconds"]:
        tokens += int(next(batches)["forward"]["mask"].sum())
    steady_s = time.perf_counter() - start
    print(json.dumps({"import_s": import_s, "vocab_s": vocab_s, "vocab_size": len(vocab), "first_batch_s": first_s,
                      "shards": len(dataset.shards), "shards_encoded_first": shards_first,
                      "shards_encoded": len(encoded), "tokens": tokens, "steady_s": steady_s,
                      "cpu_s": time.process_time() - cpu_start, "tokens_per_s": tokens / steady_s,
                      "rss_after_imports": rss_imports, "rss_after_vocab": rss_vocab}))


# ---------------------------------------------------------------- report

def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 2**20:.2f} MiB"


def _tokens(n: int) -> str:
    for unit, scale in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= scale:
            return f"{n / scale:g}{unit}"
    return str(n)


def table(rows: list[dict]) -> str:
    lines = ["| stage | corpus | wall | tokens/s | peak RSS, largest process | peak RSS, all processes | notes |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    order = {s: i for i, s in enumerate(STAGES)}
    for r in sorted(rows, key=lambda r: (order[r["stage"]], r["corpus_tokens"])):
        if "error" in r:
            lines.append(f"| {r['stage']} | {_tokens(r['corpus_tokens'])} | failed | | | | {r['error'].splitlines()[0]} |")
            continue
        rate = r.get("tokens_per_s") or (r["tokens"] / r["wall_s"] if r.get("tokens") else None)
        lines.append(f"| {r['stage']} | {_tokens(r['corpus_tokens'])} | {r['wall_s']:.1f} s | "
                     f"{'-' if rate is None else f'{rate:,.0f}'} | {_mb(r.get('peak_rss_largest'))} | "
                     f"{_mb(r.get('peak_rss_all'))} | {r.get('notes', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "_reader":
        reader_child(json.loads(sys.argv[2]))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=800_000_000, help="corpus size in tokens (default 800M)")
    p.add_argument("--sizes", help="several corpus sizes, comma-separated, run in turn (instead of --tokens)")
    p.add_argument("--vocab-size", type=int, default=793_471,
                   help="the full vocabulary, three specials included (default 793,471, as the 1B Word Benchmark)")
    p.add_argument("--files", type=int, default=100, help="corpus files (default 100)")
    p.add_argument("--seed", type=int, default=0, help="corpus seed")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated subset of {','.join(STAGES)} (default: all); a stage reuses the "
                        "outputs the earlier ones left in --work")
    p.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "bilm-scale"),
                   help="corpus, prepared data, runs and logs (default $TMPDIR/bilm-scale); corpora are reused")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the stages (default: as the environment)")
    p.add_argument("--prepare-workers", type=int, default=2)
    p.add_argument("--min-count", type=int, default=3, help="prepare's --min-count (1B Word: 3)")
    p.add_argument("--model-vocab", choices=("full", "prepared"), default="full",
                   help="vocabulary of reader/train/evaluate/dump: the corpus's full one (same at every size; "
                        "default) or the one prepare built")
    p.add_argument("--reader-batch", type=int, default=128)
    p.add_argument("--reader-seconds", type=float, default=20.0, help="steady reading after the first batch")
    p.add_argument("--train-steps", type=int, default=4)
    p.add_argument("--train-batch", type=int, default=16, help="rows per step (the config's 128 is slow on a CPU)")
    p.add_argument("--eval-tokens", type=int, default=100_000,
                   help="heldout tokens for evaluate (prepare holds out this share of the corpus); at 793k words "
                        "each costs about 1.9 GFLOP")
    p.add_argument("--eval-batch", type=int, default=128)
    p.add_argument("--interval", type=float, default=0.2, help="memory sampling interval, seconds")
    p.add_argument("--stage-timeout", type=float, help="kill a stage after this many seconds")
    p.add_argument("--clean", action="store_true",
                   help="delete a size's prepared data, run and exports once its stages are done (corpora are kept)")
    p.add_argument("--out-json", nargs="?", const="", metavar="PATH",
                   help="also write every figure as JSON (default path benchmarks/results/scale-<date>.json)")
    args = p.parse_args(argv)

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        p.error(f"unknown stages {unknown}; choose from {','.join(STAGES)}")
    sizes = [int(float(s)) for s in args.sizes.split(",")] if args.sizes else [args.tokens]
    os.makedirs(args.work, exist_ok=True)
    bench = Bench(args)
    methods = {"corpus": bench.corpus, "prepare": bench.prepare, "reader": bench.reader, "train": bench.train,
               "resume": bench.resume, "evaluate": bench.evaluate, "export": bench.export,
               "export+softmax": bench.export_softmax, "dump": bench.dump}
    rows: list[dict] = []
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    for tokens in sizes:
        size_dir = os.path.join(args.work, f"{tokens}-v{args.vocab_size}")
        for stage in STAGES:
            if stage not in stages:
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {_tokens(tokens)} tokens: {stage} ...", file=sys.stderr, flush=True)
            try:
                row = methods[stage](tokens, size_dir)
            except StageFailed as e:
                print(str(e), file=sys.stderr)
                row = {"error": str(e)}
            row.pop("output", None)
            row.update(stage=stage, corpus_tokens=tokens)
            rows.append(row)
            if "error" not in row:
                print(f"    {row['wall_s']:.1f} s, peak RSS {_mb(row.get('peak_rss_largest'))} largest, "
                      f"{_mb(row.get('peak_rss_all'))} all; {row.get('notes', '')}", file=sys.stderr, flush=True)
        if args.clean:
            for name in ("prepared", "run", "export", "export-softmax", "token-embeddings.hdf5"):
                target = os.path.join(size_dir, name)
                if os.path.isdir(target):
                    shutil.rmtree(target)
                elif os.path.exists(target):
                    os.remove(target)
    threads = bench.env.get("OMP_NUM_THREADS", "unset")
    header = (f"{machine_line()}, OMP_NUM_THREADS={threads}; "
              f"vocabulary {args.vocab_size:,}; {started}")
    text = table(rows)
    print(f"\n{header}\n\n{text}")
    if args.out_json is not None:
        path = args.out_json or os.path.join(HERE, "results", f"scale-{time.strftime('%Y-%m-%d')}.json")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"environment": header, "arguments": vars(args), "rows": rows, "table": text}, f, indent=2)
        print(f"wrote {path}", file=sys.stderr)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
