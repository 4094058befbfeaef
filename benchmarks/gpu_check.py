"""GPU check: everything a short GPU session should measure, in one prepared command.

    python3 benchmarks/gpu_check.py --out DIR     # on a GPU: at most 7 minutes, writes DIR/gpu-<gpu>-<date>.{md,json,log}
    python3 benchmarks/gpu_check.py --smoke       # anywhere (CPU): tiny shapes, under a minute; `make test` rehearses it
    make gpu-check PYTHON=python3 GPU_OUT=DIR     # the same command through make

It uses the interpreter it is run with as it is: no venv, no install, bilm imported from
this checkout (it needs torch, numpy, h5py, sentencepiece, tqdm, PyYAML, tensorboard, pytest
and hypothesis; not DeepSpeed, not the network). tests/test_gpu_check.py runs it that way.

Parts, most important first, each in its own process with its own time limit (PARTS). A part's
deadline is the sum of its own and its predecessors' limits from the start, so time a part
leaves unused passes to the next and the whole run never exceeds the sum (TOTAL_LIMIT). A
part that fails or runs out of time is recorded and the others still run; the files in the
output directory are rewritten after every part, so a run cut short keeps what it measured.
- environment: GPU name, driver, torch and CUDA versions, CPU model;
- train:<variant>: training tokens/s (forward tokens; synthetic batches) and peak GPU memory for
  `elmo_original` (batch 128 x unroll 20, 8192 negatives, a 793,471-word vocabulary like the 1B
  Word Benchmark's): `fused` bf16, `fused` fp32, `cudnn` bf16 (clips off: cuDNN cannot clip)
  and `fused` bf16 with the compiled LSTM step; warm-up steps, then timed steps, synchronised
  (`reference` fp32 only when asked: --only train:reference-fp32);
- profile: the 10 kernels that take the most time in a bf16 `fused` training step (torch.profiler);
- embed: embedder sentences/s (original size, batch 256, 20 tokens) in fp32 and bf16;
- evaluate: `bilm evaluate` tokens/s with the full 793k softmax, and its peak memory;
- cuda-tests: `pytest -m cuda -x -q` (fused == reference on CUDA for outputs and gradients in
  fp32; bf16 within its stated tolerance; the embedder against bilm-tf's vectors).
The profile and evaluate parts run the LSTM step uncompiled (compiling it would take most of
their time); the embedder runs as a user gets it (compiled on CUDA, in its warm-up batch).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
from machine import cpu_model  # noqa: E402  (benchmarks/machine.py)

VOCAB_1B = 793_471
TRAIN_VARIANTS = {  # name -> (lstm_impl, precision, compiled LSTM step, clips)
    "fused-bf16": ("fused", "bf16", "off", True),
    "fused-fp32": ("fused", "fp32", "off", True),
    "cudnn-bf16": ("cudnn", "bf16", "off", False),
    "fused-bf16-compiled": ("fused", "bf16", "on", True),
    "reference-fp32": ("reference", "fp32", "off", True),
}
# Seconds per part on the GPU, in the order they run: the training figures first, the CUDA tests
# last (they compile the LSTM step for several shapes). The sum must stay well inside the
# 8 minutes a GPU session can give one command; tests/test_gpu_check.py holds it to 7.
PARTS = {"environment": 25, "train:fused-bf16": 50, "train:fused-fp32": 45, "train:cudnn-bf16": 35,
         "train:fused-bf16-compiled": 90, "profile": 35, "embed": 45, "evaluate": 30, "cuda-tests": 65}
OPTIONAL_PARTS = {"train:reference-fp32": 45}  # run only when named in --only
TOTAL_LIMIT = sum(PARTS.values())
SMOKE_LIMIT = 120  # seconds per part on a CPU
LOG_CHARS = 20_000  # of each part's output kept in the .log file


# ----------------------------------------------------------------------------- the parts (one per process)

def _device():
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device):
    import torch
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def part_environment(smoke: bool) -> dict:
    import torch
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "cpu": cpu_model(), "gpu": None, "driver": None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}")
        try:
            out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            pass
    return out


def part_cuda_tests(smoke: bool) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-x", "-q", "-p", "no:cacheprovider",
           os.path.join(ROOT, "tests")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    # Exit 5 = nothing collected/selected: on a machine without CUDA the cuda tests skip.
    result = {"returncode": done.returncode, "summary": summary}
    if done.returncode not in (0, 5):
        result["error"] = f"cuda tests failed: {summary}"  # the table and make test report it as a failure
    return result


def _train_config(smoke: bool, impl: str, precision: str, clips: bool, compile_mode: str):
    from bilm.runs.config import load_config
    overrides = [f"train.lstm_impl={impl}", f"train.precision={precision}", f"train.device={_device().type}",
                 f"train.lstm_compile={compile_mode}"]
    if smoke:
        path = os.path.join(ROOT, "configs", "tiny.yaml")
        overrides += ["train.batch_size=4", "train.unroll_steps=5", "train.n_negative_samples_batch=64"]
    else:
        path = os.path.join(ROOT, "configs", "elmo_original.yaml")
        overrides += ["train.batch_size=128", "train.unroll_steps=20", "train.n_negative_samples_batch=8192"]
    if not clips:
        overrides += ["model.lstm.cell_clip=0", "model.lstm.proj_clip=0"]
    return load_config(path, overrides)


def part_train(smoke: bool, variant: str) -> dict:
    from bilm.core.distributed import DistEnv
    from train import run  # benchmarks/train.py
    impl, precision, compile_mode, clips = TRAIN_VARIANTS[variant]
    device = _device()
    cfg = _train_config(smoke, impl, precision, clips, compile_mode)
    _reset_peak(device)
    steps, warmup = (3, 1) if smoke else (15, 5)
    result = run(cfg, 500 if smoke else VOCAB_1B, steps, warmup, DistEnv(device=device))
    return {"tokens_per_second": round(result["tokens_per_second"], 1), "step_ms": round(1000 * result["step_seconds"], 1),
            "peak_gpu_gb": _peak_gb(device), "lstm_compile": compile_mode, "batch": cfg.train.batch_size,
            "unroll": cfg.train.unroll_steps,
            "negatives": cfg.train.n_negative_samples_batch, "split_ms": {k: round(1000 * v, 1) for k, v in
                                                                        result["split"].items()}}


def part_profile(smoke: bool) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from bilm.core.distributed import DistEnv
    from bilm.training.step import TrainStep
    from train import synthetic_batches
    device = _device()
    cfg = _train_config(smoke, "fused", "bf16", True, "off")
    vocab = 500 if smoke else VOCAB_1B
    trainer = TrainStep(cfg, vocab, DistEnv(device=device))
    batches = synthetic_batches(4, cfg.train.batch_size, cfg.train.unroll_steps, vocab, True)
    for batch in batches[:2]:
        trainer.step(batch)
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for batch in batches[2:]:
            trainer.step(batch)
        _sync(device)
        wall = time.perf_counter() - start
    # Self time: a kernel's own, not that of the operators and autograd nodes that launched it.
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"

    def micros(event) -> float:  # self_device_time_total since torch 2.4 (self_cuda_time_total before)
        value = getattr(event, key, None)
        if value is None and device.type == "cuda":
            value = getattr(event, "self_cuda_time_total", 0)
        return value or 0

    events = sorted(prof.key_averages(), key=micros, reverse=True)
    top = [{"name": e.key[:90], "ms_per_step": round(micros(e) / 1000 / 2, 2), "calls_per_step": e.count // 2}
           for e in events[:10]]
    # Busy well under wall time: the step waits on launches or host syncs, not on kernels.
    return {"sorted_by": key, "lstm_compile": "off", "wall_ms_per_step": round(1000 * wall / 2, 1),
            "busy_ms_per_step": round(sum(micros(e) for e in events) / 1000 / 2, 1), "top_kernels": top}


def part_embed(smoke: bool) -> dict:
    from bilm import ElmoEmbedder
    from embed import architecture, random_sentences, write_model
    device = _device()
    n, batch = (16, 8) if smoke else (1024, 256)
    sentences = random_sentences(n, 20)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        options, weights = write_model(architecture(small=smoke), tmp)
        for precision in ("fp32", "bf16"):
            embedder = ElmoEmbedder(options, weights, device=str(device), batch_size=batch, stateful=False,
                                    text_pipeline=None, precision=precision)
            embedder.embed_batch(sentences[:batch])  # warm-up (on CUDA: compiles the LSTM step)
            _sync(device)
            _reset_peak(device)
            start = time.perf_counter()
            for i in range(0, n, batch):
                embedder.embed_batch(sentences[i:i + batch])
            _sync(device)
            out[precision] = {"sentences_per_second": round(n / (time.perf_counter() - start), 1),
                              "peak_gpu_gb": _peak_gb(device)}
            del embedder
    return out


def part_evaluate(smoke: bool) -> dict:
    import torch

    from bilm.modules.language_model import LanguageModel
    from bilm.core.distributed import to_device
    from train import synthetic_batches
    device = _device()
    cfg = _train_config(smoke, "fused", "fp32", True, "off")
    vocab = 500 if smoke else VOCAB_1B
    model = LanguageModel(cfg.model, vocab, dropout=0.0, lstm_compile="off").to(device).eval()
    batches = synthetic_batches(4 if smoke else 6, cfg.train.batch_size, cfg.train.unroll_steps, vocab, True)
    batches = [to_device(b, device) for b in batches]
    with torch.no_grad():  # as bilm.scoring.evaluate.perplexity, which also reads each batch's sums back
        model.evaluate(batches[0], None)
        _sync(device)
        _reset_peak(device)
        start = time.perf_counter()
        state = None
        for batch in batches[1:]:
            losses, state = model.evaluate(batch, state)
            sum(float(loss.loss_sum) for loss in losses.values())
        _sync(device)
    tokens = cfg.train.batch_size * cfg.train.unroll_steps * (len(batches) - 1)
    return {"tokens_per_second": round(tokens / (time.perf_counter() - start), 1), "vocab": vocab,
            "peak_gpu_gb": _peak_gb(device), "lstm_compile": "off"}


def run_part(name: str, smoke: bool) -> dict:
    if name.startswith("train:"):
        return part_train(smoke, name.split(":", 1)[1])
    return {"environment": part_environment, "cuda-tests": part_cuda_tests, "profile": part_profile,
            "embed": part_embed, "evaluate": part_evaluate}[name](smoke)


# ----------------------------------------------------------------------------- the driver

def _skip_reason(name: str, smoke: bool, environment: dict):
    """Why a part is not worth a process here (None: run it); environment is that part's result."""
    if name.startswith("train:"):
        impl, _, compile_mode, _ = TRAIN_VARIANTS[name.split(":", 1)[1]]
        if impl == "cudnn" and not environment.get("gpu"):
            return "cudnn needs CUDA"
        if compile_mode == "on" and smoke:
            return "compiling takes about 40 s on a CPU; tests/test_lstm.py covers it (BILM_TEST_COMPILE=1)"
    return None


def _spawn(name: str, smoke: bool, limit: float) -> tuple[dict, str]:
    """Run one part in a child process. Returns (result, output)."""
    return _run_limited([sys.executable, os.path.abspath(__file__), "--part", name] + (["--smoke"] if smoke else []),
                        limit)


def _run_limited(cmd: list[str], limit: float) -> tuple[dict, str]:
    """Run cmd, which prints RESULT <json>, in its own session, so that at its limit it is ended
    with everything it started (pytest, compile workers). Returns (result or error, output)."""
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                             start_new_session=True)
    timed_out = False
    try:
        stdout, stderr = child.communicate(timeout=max(limit, 1))
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        # The whole group, always: a part out of time, and whatever a finished part left behind
        # (compile workers, pytest) that would hold the GPU or the pipes.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
    if timed_out:
        try:
            stdout, stderr = child.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # something outside the group still holds the pipes
            child.kill()
            stdout, stderr = "", "(no output: the pipes stayed open)"
    seconds = round(time.perf_counter() - start, 1)
    output = f"$ {' '.join(cmd)}\n{stdout}{stderr}"
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if child.returncode == 0 and lines:  # done, even if what it left behind held the pipes past the limit
        return {**json.loads(lines[-1][len("RESULT "):]), "seconds": seconds}, output
    if timed_out:
        return {"error": f"ran past its {limit:.0f} s limit", "seconds": seconds}, output
    tail = (stderr or stdout).strip().splitlines()[-3:]
    return {"error": f"exit {child.returncode}: {' | '.join(tail)[:400]}", "seconds": seconds}, output


def _table(results: dict) -> str:
    env = results.get("environment", {})
    lines = [f"# GPU check {results['date']}{' (smoke, CPU)' if results['smoke'] else ''}", "",
             f"GPU {env.get('gpu')} ({env.get('gpu_memory_gb')} GiB), driver {env.get('driver')}, torch "
             f"{env.get('torch')}, CUDA {env.get('cuda')}, CPU {env.get('cpu')}", "",
             "| part | result | peak GPU memory | seconds |", "| --- | --- | --- | --- |"]
    for name, r in results["parts"].items():
        if name == "environment":
            continue
        if "error" in r:
            text = f"FAILED: {r['error']}"
        elif "skipped" in r:
            text = f"skipped: {r['skipped']}"
        elif name.startswith("train:"):
            text = f"{r['tokens_per_second']:,.0f} tokens/s (step {r['step_ms']} ms; batch {r['batch']} x {r['unroll']}, " \
                   f"{r['negatives']} negatives)"
        elif name == "embed":
            text = ", ".join(f"{p} {v['sentences_per_second']:,.0f} sentences/s" for p, v in r.items()
                             if isinstance(v, dict))
        elif name == "evaluate":
            text = f"{r['tokens_per_second']:,.0f} tokens/s (vocabulary {r['vocab']:,})"
        elif name == "cuda-tests":
            text = r["summary"]
        elif name == "profile":
            text = f"busy {r['busy_ms_per_step']} of {r['wall_ms_per_step']} ms a step (profiled); top 3: " + \
                "; ".join(f"{k['name']} {k['ms_per_step']} ms" for k in r["top_kernels"][:3])
        else:
            text = json.dumps(r)
        peak = r.get("peak_gpu_gb") if isinstance(r, dict) else None
        if name == "embed" and "error" not in r and "skipped" not in r:
            peak = max((v.get("peak_gpu_gb") or 0 for v in r.values() if isinstance(v, dict)), default=None) or None
        lines.append(f"| {name} | {text} | {peak if peak is not None else '-'} | {r.get('seconds', '-')} |")
    if "profile" in results["parts"] and "top_kernels" in results["parts"]["profile"]:
        lines += ["", f"Top kernels of a bf16 `fused` training step ({results['parts']['profile']['sorted_by']}):", "",
                  "| kernel | ms per step | calls per step |", "| --- | --- | --- |"]
        lines += [f"| {k['name']} | {k['ms_per_step']} | {k['calls_per_step']} |"
                  for k in results["parts"]["profile"]["top_kernels"]]
    return "\n".join(lines) + "\n"


def _write(results: dict, logs: dict, out_dir: str) -> str:
    """(Re)write <stem>.json, .md and .log in out_dir; returns the stem."""
    gpu = results["environment"].get("gpu") or "cpu"
    stem = os.path.join(out_dir, f"gpu-{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-').lower()}-{results['date']}")
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(_table(results))
    with open(stem + ".log", "w") as f:
        for name, output in logs.items():
            f.write(f"===== {name}\n{output[-LOG_CHARS:]}\n")
    return stem


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device there is (seconds)")
    p.add_argument("--out", help="results directory (default benchmarks/results; with --smoke a temporary one)")
    p.add_argument("--part", help=argparse.SUPPRESS)  # run one part in this process, print RESULT <json>
    p.add_argument("--only", nargs="+", metavar="PART",
                   help=f"run these parts only (of {', '.join([*PARTS, *OPTIONAL_PARTS])}; 'train' = every default train part)")
    a = p.parse_args(argv)
    if a.part:
        print("RESULT " + json.dumps(run_part(a.part, a.smoke)), flush=True)
        return {}

    def chosen(name: str) -> bool:  # environment always: the file names and the skips need it
        if not a.only or name == "environment":
            return name in PARTS
        return name in a.only or (name in PARTS and name.split(":")[0] in a.only)

    unknown = set(a.only or ()) - {*PARTS, *OPTIONAL_PARTS, *(n.split(":")[0] for n in PARTS)}
    if unknown:
        p.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    # Ended from outside (SIGTERM): unwind, so the running part's process group is ended too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    out_dir = a.out or (tempfile.mkdtemp(prefix="gpu-check-") if a.smoke else os.path.join(HERE, "results"))
    os.makedirs(out_dir, exist_ok=True)
    results = {"date": datetime.date.today().isoformat(), "smoke": a.smoke, "environment": {}, "parts": {}}
    logs: dict[str, str] = {}
    start, deadline = time.perf_counter(), 0.0
    for name, limit in {**PARTS, **OPTIONAL_PARTS}.items():
        if not chosen(name):
            continue
        # Time an earlier part left unused passes on: each part ends by the sum of the limits so far.
        deadline += SMOKE_LIMIT if a.smoke else limit
        budget = deadline - (time.perf_counter() - start)
        skip = _skip_reason(name, a.smoke, results["environment"])
        print(f"gpu-check: {name} " + (f"skipped: {skip}" if skip else f"(up to {budget:.0f} s) ..."),
              file=sys.stderr, flush=True)
        results["parts"][name], logs[name] = ({"skipped": skip}, "") if skip else _spawn(name, a.smoke, budget)
        if name == "environment":
            results["environment"] = results["parts"][name]
        stem = _write(results, logs, out_dir)
    print(_table(results))
    print(f"wrote {stem}.md, .json and .log ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
