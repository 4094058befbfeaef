"""What continuing a bilm-tf checkpoint with its softmax is worth, and what its conversion costs in memory.

    python benchmarks/continue_tf.py worth [--work /tmp/bilm-continue] [--seeds 0 1] [--steps 50 100 200]
        [--tf-python PY_WITH_TF --peer-src BILM_TF_TREE]
    python benchmarks/continue_tf.py memory [--vocab-size 793471] [--work /tmp/bilm-continue-memory]

worth: the stand-in for the published checkpoint is a biLM trained on WikiText-2's validation split
(``--pretrain-text``) with that split's vocabulary. With ``--tf-python`` and ``--peer-src`` it is
trained by bilm-tf's own ``train()`` (../shared/peers/harness/bilmtf_train.py); without them by
``bilm train`` with the same semantics (pinned to bilm-tf by tests/test_bilmtf_parity.py) and
written as a bilm-tf save_dir by benchmarks/tf_save_dir.py. It is then continued in bilm on the
test split's articles after the first twelve (text it did not see; ``bilm prepare`` of it gives a
vocabulary that differs from the checkpoint's), and scored by ``bilm evaluate`` (full softmax) on
the first twelve (data/sample/heldout.txt) after each of ``--steps``:
  (a) today's ``--init-model`` with published-format weights: char CNN + LSTMs, a fresh softmax and
      fresh Adagrad state;
  (b) ``--init-model SAVE_DIR --init-vocab``: softmax rows and accumulators of known words carried,
      new words by each ``--new-rows`` rule;
  (c) ``--keep-vocab``: the checkpoint's vocabulary, every row carried. Its perplexity is over
      another vocabulary (other words are <UNK>), so it is not comparable with (a) and (b) figure
      for figure.
memory: a bilm-tf save_dir with ``elmo_original``'s shapes and a ``--vocab-size`` softmax (random
values, benchmarks/tf_save_dir.py), loaded into a model and its Adagrad state as ``bilm train``
does (``TFStart.load_into``), in a fresh process that samples its memory: the peak RSS (which counts
the pages of the mapped checkpoint the kernel has read) and the peak of anonymous memory (what the
process itself holds), against the same after only building the model and the optimizer.

Run alone (flock -x /tmp/bilm-cpu.lock): on 2 cores another job changes every time.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from machine import machine_line  # noqa: E402
from parity_bilmtf import bilm_cmd, evaluate, sh  # noqa: E402

TINY = os.path.join(ROOT, "configs", "tiny.yaml")
HELDOUT = os.path.join(ROOT, "data", "sample", "heldout.txt")  # the first 12 articles of WikiText-2's test split
VARIANTS = ("a", "b", "c")


# ----------------------------------------------------------------------------- worth

def prepare_data(a) -> tuple[str, str]:
    """(pretraining manifest, continuation manifest): the continuation text is the test split less
    the heldout articles."""
    data = os.path.join(a.work, "data")
    domain_text = os.path.join(data, "domain.txt")
    if not os.path.exists(domain_text):
        os.makedirs(data, exist_ok=True)
        heldout = set(open(HELDOUT, encoding="utf-8").read().splitlines())
        with open(a.domain_text, encoding="utf-8") as f, open(domain_text, "w", encoding="utf-8") as out:
            out.writelines(line for line in f if line.rstrip("\n") not in heldout)
    manifests = []
    for name, text in (("pretrain", a.pretrain_text), ("domain", domain_text)):
        out = os.path.join(data, name)
        if not os.path.exists(os.path.join(out, "manifest.json")):
            sh(bilm_cmd("prepare", text, "--out", out, "--heldout-fraction", "0", "--no-progress"),
               os.path.join(data, f"prepare-{name}.log"))
        manifests.append(os.path.join(out, "manifest.json"))
    return manifests[0], manifests[1]


def pretrain(a, manifest: str) -> tuple[str, str, str]:
    """(bilm-tf save_dir, its vocab, published-format model dir) of the stand-in."""
    save_dir = os.path.join(a.work, "standin-tf")
    export = os.path.join(a.work, "standin-export")
    vocab = os.path.join(os.path.dirname(manifest), "vocab.txt")
    if os.path.exists(os.path.join(export, "weights.hdf5")):
        return save_dir, vocab, export
    if a.tf_python:
        out = os.path.join(a.work, "standin-bilmtf")
        shutil.rmtree(out, ignore_errors=True)
        options = {"lstm": {"dim": a.lstm_dim, "projection_dim": a.projection_dim}, "batch_size": a.batch_size,
                   "unroll_steps": 10, "n_negative_samples_batch": 256, "dropout": 0.1,
                   "char_cnn": {"filters": [[1, 8], [2, 16], [3, 32], [4, 64]], "n_highway": 1,
                                "embedding": {"dim": 8}}}
        sh([a.tf_python, os.path.join(a.harness, "bilmtf_train.py"), "--peer-src", a.peer_src,
            "--train-prefix", os.path.join(os.path.dirname(manifest), "train", "shard-*"), "--heldout-prefix",
            os.path.join(os.path.dirname(manifest), "train", "shard-*"), "--vocab", vocab, "--out", out,
            "--batches", str(a.pretrain_steps), "--skip-fixture", "--skip-test", "--options-json", json.dumps(options)],
           out + ".log")
        shutil.rmtree(save_dir, ignore_errors=True)
        shutil.copytree(os.path.join(out, "ckpt"), save_dir)
        imported = os.path.join(a.work, "standin-imported")
        sh(bilm_cmd("import-bilm-tf", "--tf-save-dir", save_dir, "--vocab", vocab, "--out", imported, "--force"),
           imported + ".log")
        run = imported
    else:
        run = os.path.join(a.work, "standin-bilm")
        shutil.rmtree(run, ignore_errors=True)
        sh(bilm_cmd("train", "--config", TINY, "--data", manifest, "--out", run, "--no-progress",
                    *sum((["--set", s] for s in (
                        f"model.lstm.dim={a.lstm_dim}", f"model.lstm.projection_dim={a.projection_dim}",
                        f"train.batch_size={a.batch_size}", f"train.max_steps={a.pretrain_steps}",
                        "train.device=cpu", "train.seed=0", "train.log_every_steps=100",
                        f"train.checkpoint_every_steps={a.pretrain_steps}")), [])), run + ".log")
        sh([sys.executable, os.path.join(ROOT, "benchmarks", "tf_save_dir.py"), "from-run", "--run", run,
            "--out", save_dir], save_dir + ".log")
        vocab = os.path.join(save_dir, "vocab.txt")
    sh(bilm_cmd("export", "--checkpoint", run, "--out", export, "--force"), export + ".log")
    return save_dir, vocab, export


def continue_run(a, name: str, seed: int, manifest: str, init: list[str]) -> dict:
    """``bilm train`` from the stand-in for max(--steps) steps, scored after each of --steps."""
    out = os.path.join(a.work, f"{name}-seed{seed}")
    result_file = out + ".json"
    if os.path.exists(result_file):
        return json.load(open(result_file))
    shutil.rmtree(out, ignore_errors=True)
    steps = sorted(a.steps)
    sets = [f"train.max_steps={steps[-1]}", f"train.batch_size={a.batch_size}", "train.device=cpu",
            f"train.seed={seed}", "train.log_every_steps=10", f"train.checkpoint_every_steps={steps[0]}",
            f"train.keep_checkpoints={steps[-1] // steps[0] + 1}", *a.continue_set]
    log = sh(bilm_cmd("train", "--config", TINY, "--data", manifest, "--out", out, "--no-progress", *init,
                      *sum((["--set", s] for s in sets), [])), out + ".log")
    result = {"init": next((ln for ln in log.splitlines() if "initialized from" in ln), ""), "eval": {}}
    for step in steps:
        ckpt = os.path.join(out, "checkpoints", f"step-{step:08d}.pt")
        result["eval"][step] = evaluate(ckpt, HELDOUT, f"{out}-eval-{step}.log")
    json.dump(result, open(result_file, "w"), indent=1)
    shutil.rmtree(out, ignore_errors=True)  # the checkpoints: tens of MB each
    return result


def worth(a) -> None:
    start = time.time()
    os.makedirs(a.work, exist_ok=True)
    pretrain_manifest, domain_manifest = prepare_data(a)
    save_dir, vocab, export = pretrain(a, pretrain_manifest)
    variants = [("a-fresh-softmax", ["--init-model", export])]
    variants += [(f"b-{rule}", ["--init-model", save_dir, "--init-vocab", vocab, "--new-rows", rule])
                 for rule in a.rules]
    variants.append(("c-keep-vocab", ["--init-model", save_dir, "--init-vocab", vocab, "--keep-vocab"]))
    results = {name: {seed: continue_run(a, name, seed, domain_manifest, init) for seed in a.seeds}
               for name, init in variants}
    standin = evaluate(os.path.join(a.work, "standin-imported" if a.tf_python else "standin-bilm"), HELDOUT,
                       os.path.join(a.work, "standin-eval.log"))
    print(f"\ncontinue a bilm-tf checkpoint ({'bilm-tf train()' if a.tf_python else 'bilm stand-in'}, "
          f"{a.pretrain_steps} steps on {os.path.basename(a.pretrain_text)}); {machine_line()}")
    print(f"the stand-in itself on the heldout text: {standin['ppl']:.1f} (its own vocabulary)")
    for name, by_seed in results.items():
        print(f"  {name}: {by_seed[a.seeds[0]]['init'].split('): ', 1)[-1]}")
    header = "| variant | " + " | ".join(f"after {s} steps" for s in sorted(a.steps)) + " |"
    print("\nheldout perplexity (bilm evaluate, average of the directions), median of seeds " +
          ", ".join(map(str, a.seeds)) + " (each seed)\n" + header + "\n|" + " --- |" * (len(a.steps) + 1))
    for name, by_seed in results.items():
        cells = []
        for step in sorted(a.steps):
            values = [by_seed[seed]["eval"][str(step)]["ppl"] if str(step) in by_seed[seed]["eval"]
                      else by_seed[seed]["eval"][step]["ppl"] for seed in a.seeds]
            cells.append(f"{statistics.median(values):.1f} ({', '.join(f'{v:.1f}' for v in values)})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    summary = {"machine": machine_line(), "standin": standin, "results": results, "args": vars(a),
               "wall_s": time.time() - start}
    if a.out_json:
        path = os.path.join(ROOT, "benchmarks", "results", f"continue-tf-{time.strftime('%Y-%m-%d')}.json")
        json.dump(summary, open(path, "w"), indent=1)
        print(f"wrote {path}")


# ----------------------------------------------------------------------------- memory

def _memory_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class _Sampler:
    """Peak RSS and anonymous memory of this process, sampled every 10 ms."""

    def __init__(self):
        self.peak_rss = self.peak_anon = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop:
            self.peak_rss = max(self.peak_rss, _memory_kib("VmRSS"))
            self.peak_anon = max(self.peak_anon, _memory_kib("RssAnon"))
            time.sleep(0.01)

    def reset(self) -> None:
        self.peak_rss, self.peak_anon = _memory_kib("VmRSS"), _memory_kib("RssAnon")

    def stop(self) -> tuple[float, float]:
        self._stop = True
        self._thread.join()
        return self.peak_rss / 2**20, self.peak_anon / 2**20


def measure_load(save_dir: str, vocab_kind: str, vocab_size: int) -> dict:
    """In this process: build elmo_original's model + Adagrad for the run vocabulary, then load."""
    import torch

    from bilm.runs.config import load_config
    from bilm.commands.continue_tf import TFStart
    from bilm.core.malloc import keep_freed_memory
    from bilm.modules.language_model import LanguageModel
    from bilm.core.options import BiLMOptions
    from bilm.training.optimizers import build_optimizer

    keep_freed_memory()  # as bilm train does
    sampler = _Sampler()
    start = TFStart(save_dir, os.path.join(save_dir, "vocab.txt"), keep_vocab=vocab_kind == "keep")
    if vocab_kind == "keep":
        tokens = start.vocabulary().tokens
    else:  # a domain vocabulary: the checkpoint's most frequent 30,000 words and 20,000 it lacks
        tokens = ["<S>", "</S>", "<UNK>", *(f"w{i}" for i in range(30_000)), *(f"new{i}" for i in range(20_000))]
    cfg = load_config(os.path.join(ROOT, "configs", "elmo_original.yaml"), ["train.device=cpu"])
    cfg.model = BiLMOptions.from_file(start.options_file)
    torch.manual_seed(0)
    model = LanguageModel(cfg.model, len(tokens), sparse_softmax=True)
    optimizer = build_optimizer(cfg, model)
    built_rss, built_anon = _memory_kib("VmRSS") / 2**20, _memory_kib("RssAnon") / 2**20
    sampler.reset()
    t0 = time.perf_counter()
    report = start.load_into(model, optimizer, tokens)
    seconds = time.perf_counter() - t0
    peak_rss, peak_anon = sampler.stop()
    return {"vocab": vocab_kind, "rows": len(tokens), "carried": report["carried"], "new": report["new"],
            "rule": report["rule"], "load_s": round(seconds, 1), "model_and_optimizer_rss_gib": round(built_rss, 2),
            "model_and_optimizer_anon_gib": round(built_anon, 2), "peak_rss_gib": round(peak_rss, 2),
            "peak_anon_gib": round(peak_anon, 2), "anon_added_by_load_gib": round(peak_anon - built_anon, 2)}


def memory(a) -> None:
    save_dir = os.path.join(a.work, f"synthetic-{a.vocab_size}")
    os.makedirs(a.work, exist_ok=True)
    if not os.path.exists(os.path.join(save_dir, "checkpoint")):
        t0 = time.perf_counter()
        sh([sys.executable, os.path.join(ROOT, "benchmarks", "tf_save_dir.py"), "synthetic", "--vocab-size",
            str(a.vocab_size), "--out", save_dir], save_dir + ".log")
        print(f"wrote the synthetic save_dir in {time.perf_counter() - t0:.0f} s")
    size = sum(os.path.getsize(os.path.join(save_dir, n)) for n in os.listdir(save_dir)) / 2**30
    print(f"{save_dir}: {size:.2f} GiB; {machine_line()}")
    rows = []
    for kind in a.vocabs:
        subprocess.run(["sync"], check=False)
        out = subprocess.run([sys.executable, __file__, "_measure", save_dir, kind, str(a.vocab_size)],
                             capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    if a.out_json:
        path = os.path.join(ROOT, "benchmarks", "results", f"continue-tf-memory-{time.strftime('%Y-%m-%d')}.json")
        json.dump({"machine": machine_line(), "save_dir_gib": size, "rows": rows}, open(path, "w"), indent=1)
        print(f"wrote {path}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_measure":  # the child process of `memory`
        print(json.dumps(measure_load(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worth")
    w.add_argument("--work", default="/tmp/bilm-continue")
    w.add_argument("--pretrain-text", default=os.path.join(SHARED, "corpora", "wikitext-2", "valid.txt"))
    w.add_argument("--domain-text", default=os.path.join(SHARED, "corpora", "wikitext-2", "test.txt"))
    w.add_argument("--pretrain-steps", type=int, default=2000)
    w.add_argument("--steps", type=int, nargs="+", default=[50, 100, 200])
    w.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    w.add_argument("--rules", nargs="+", default=["char", "mean", "unk", "fresh"])
    w.add_argument("--lstm-dim", type=int, default=256)
    w.add_argument("--projection-dim", type=int, default=64)
    w.add_argument("--batch-size", type=int, default=16)
    w.add_argument("--continue-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra --set for the continued runs")
    w.add_argument("--tf-python", help="a Python with tensorflow-cpu 2.15: the stand-in is trained by bilm-tf")
    w.add_argument("--peer-src", help="unmodified bilm-tf source tree (with --tf-python)")
    w.add_argument("--harness", default=os.path.join(SHARED, "peers", "harness"))
    w.add_argument("--out-json", action="store_true", help="write benchmarks/results/continue-tf-DATE.json")
    m = sub.add_parser("memory")
    m.add_argument("--work", default="/tmp/bilm-continue-memory")
    m.add_argument("--vocab-size", type=int, default=793471)
    m.add_argument("--vocabs", nargs="+", default=["keep", "domain"], choices=["keep", "domain"])
    m.add_argument("--out-json", action="store_true", help="write benchmarks/results/continue-tf-memory-DATE.json")
    a = p.parse_args()
    worth(a) if a.command == "worth" else memory(a)


if __name__ == "__main__":
    main()
