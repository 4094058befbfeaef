"""The GPU check rehearsed here exactly as it runs on the GPU machine: docs/gpu-check.md's command, with an
interpreter that has torch and the listed packages but not bilm (nor DeepSpeed), with nothing
to install from and an audit hook that refuses pip, venv and outside connections; `--smoke`
(tiny shapes, CPU). A GPU session is rare and short: the script must not rot between them."""
import datetime
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _load_gpu_check():
    """benchmarks/gpu_check.py as a module (it imports no torch; its limits are read here), without
    leaving its folders on this process's sys.path."""
    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path[:] = saved


gpu_check = _load_gpu_check()

# What the GPU machine's python3 has (and their dependencies); docs/gpu-check.md names the same list.
GPU_MACHINE_PACKAGES = ["torch", "numpy", "h5py", "sentencepiece", "tqdm", "PyYAML", "tensorboard", "pytest",
                        "hypothesis"]
# The command docs/gpu-check.md gives for the GPU machine; $OUT is the directory that comes back.
GPU_DOC = ROOT / "docs" / "gpu-check.md"
COMMAND = 'python3 benchmarks/gpu_check.py --out "$OUT"'
CLOSED_PORT = "http://127.0.0.1:9"  # discard port: nothing listens, a download fails at once

GUARD = '''"""Rehearsal guard: every interpreter of this venv refuses installs and the network."""
import os
import re
import sys

LOG = {log!r}
INSTALLERS = {{"pip", "pip3", "ensurepip", "venv", "virtualenv", "uv", "conda", "mamba", "easy_install"}}


def _refuse(what):
    with open(LOG, "a") as f:
        f.write(what + "\\n")
    raise RuntimeError("rehearsal: refused " + what)


def _words(argv):
    argv = [argv] if isinstance(argv, (str, bytes, os.PathLike)) else list(argv or ())
    return [os.path.basename(os.fsdecode(a)) for a in argv]


def _hook(event, args):
    if event in ("subprocess.Popen", "os.posix_spawn", "os.exec"):
        words = _words(args[1])
        if any(w in INSTALLERS or re.fullmatch(r"pip[0-9.]*", w) for w in words):
            _refuse(event + " " + " ".join(words))
    elif event == "os.system":
        if any(w in INSTALLERS for w in os.fsdecode(args[0]).split()):
            _refuse("os.system " + os.fsdecode(args[0]))
    elif event == "import" and args[0].split(".")[0] in INSTALLERS:
        _refuse("import " + args[0])
    elif event == "socket.connect" and isinstance(args[1], tuple) and args[1][0] not in ("127.0.0.1", "::1", "localhost"):
        _refuse("connect " + repr(args[1]))


sys.addaudithook(_hook)
'''


def _distributions(names):
    """The installed distributions of names and of everything they require (without extras)."""
    found, todo = {}, list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a requirement of another platform or Python (its marker said so, or not)
        found[name] = dist
        for text in dist.requires or ():
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return found


def _gpu_machine_venv(tmp_path) -> tuple[Path, dict, Path]:
    """A venv holding only GPU_MACHINE_PACKAGES (links into this interpreter's site-packages), no
    pip, the guard loaded by every interpreter it starts. Returns (bin dir, environment, guard log)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    for dist in _distributions(GPU_MACHINE_PACKAGES).values():
        source = Path(dist.locate_file(""))
        for top in {f.parts[0] for f in dist.files or () if f.parts[0] not in ("..", "__pycache__")}:
            if (source / top).exists() and not (site / top).exists():
                (site / top).symlink_to(source / top)
    log = tmp_path / "refused.txt"
    log.touch()
    (site / "_rehearsal_guard.py").write_text(GUARD.format(log=str(log)))
    (site / "_rehearsal_guard.pth").write_text("import _rehearsal_guard\n")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV")) and k.lower() not in ("http_proxy", "https_proxy")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", PYTHONNOUSERSITE="1", PIP_NO_INDEX="1",
               PIP_INDEX_URL=CLOSED_PORT, http_proxy=CLOSED_PORT, https_proxy=CLOSED_PORT,
               HTTP_PROXY=CLOSED_PORT, HTTPS_PROXY=CLOSED_PORT, OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    return venv / "bin", env, log


def _python(env, code, cwd):
    return subprocess.run(["python3", "-c", code], env=env, cwd=cwd, capture_output=True, text=True)


def test_readme_command_runs_on_a_bare_interpreter_offline(tmp_path):
    bin_dir, env, refused = _gpu_machine_venv(tmp_path)
    assert shutil.which("python3", path=env["PATH"]) == str(bin_dir / "python3")
    # The interpreter is what the GPU machine has: the packages, but not bilm, DeepSpeed or pip ...
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert _python(env, "import " + ", ".join(["torch", "numpy", "h5py", "sentencepiece", "tqdm", "yaml",
                                                "tensorboard", "pytest", "hypothesis"]), outside).returncode == 0
    for missing in ("bilm", "deepspeed"):
        done = _python(env, f"import {missing}", outside)
        assert f"No module named '{missing}'" in done.stderr, done.stderr
    # ... and the guard holds: installing is refused and logged (so the run below would fail on it).
    done = _python(env, "import subprocess; subprocess.run(['pip', 'install', 'x'])", outside)
    assert done.returncode != 0 and "refused" in done.stderr and refused.read_text()
    refused.write_text("")

    assert COMMAND in GPU_DOC.read_text(), "docs/gpu-check.md's command changed: rehearse the new one"
    out = tmp_path / "out"  # does not exist yet: the command makes it
    done = subprocess.run(["bash", "-c", COMMAND + " --smoke"], env={**env, "OUT": str(out)}, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert refused.read_text() == "", f"the GPU check tried to install or connect: {refused.read_text()}"

    stem = f"gpu-cpu-{datetime.date.today().isoformat()}"
    assert sorted(os.listdir(out)) == [f"{stem}.json", f"{stem}.log", f"{stem}.md"]
    results = json.loads((out / f"{stem}.json").read_text())
    assert results["smoke"] is True and results["environment"]["torch"]
    assert list(results["parts"]) == list(gpu_check.PARTS)  # every part, in the order of importance
    failed = {name: r["error"] for name, r in results["parts"].items() if "error" in r}
    assert not failed, f"{failed}\n{(out / f'{stem}.log').read_text()[-3000:]}"
    for variant in ("fused-bf16", "fused-fp32"):
        assert results["parts"][f"train:{variant}"]["tokens_per_second"] > 0
    assert len(results["parts"]["profile"]["top_kernels"]) == 10
    assert all(results["parts"]["embed"][p]["sentences_per_second"] > 0 for p in ("fp32", "bf16"))
    assert results["parts"]["evaluate"]["tokens_per_second"] > 0
    assert re.search(r"\bskipped\b|\bpassed\b", results["parts"]["cuda-tests"]["summary"])
    table = (out / f"{stem}.md").read_text()
    assert all(f"| {name} |" in table for name in gpu_check.PARTS if name != "environment")
    assert "===== train:fused-bf16" in (out / f"{stem}.log").read_text()


def test_limits_fit_the_gpu_session_and_make_runs_the_same_command():
    assert sum(gpu_check.PARTS.values()) == gpu_check.TOTAL_LIMIT <= 7 * 60  # one command may take 10 min at most
    assert list(gpu_check.PARTS)[:2] == ["environment", "train:fused-bf16"]  # the figures that matter most first
    doc = GPU_DOC.read_text()
    table = doc[doc.index("<!-- gpu-check-parts"):].split("\n\n")[0]
    rows = re.findall(r"^\| ([a-z0-9:-]+) \| (\d+) \|", table, re.M)
    assert {name: int(limit) for name, limit in rows} == gpu_check.PARTS and [r[0] for r in rows] == list(gpu_check.PARTS)
    assert f"{gpu_check.TOTAL_LIMIT} s" in doc
    if shutil.which("make") is None:
        pytest.skip("no make here")
    # As a user runs it: not inside another make (`make test` sets MAKELEVEL, and a nested make prints
    # "Entering directory" lines).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    done = subprocess.run(["make", "-n", "gpu-check", "PYTHON=python3", "GPU_OUT=/tmp/gpu out"], cwd=ROOT,
                          capture_output=True, text=True, check=True, env=env)
    # One command, nothing built or installed first: the documented command with the caller's directory.
    assert [shlex.split(line) for line in done.stdout.strip().splitlines()] == [
        shlex.split(COMMAND.replace('"$OUT"', '"/tmp/gpu out"'))]


def _alive(stat: Path) -> bool:
    """Whether the process of /proc/PID/stat exists and is not a zombie."""
    try:
        return stat.read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


# The grandchild a part leaves behind sleeps this long: no wait here comes near it, so a call that
# returns before it means the call did not wait for the grandchild.
GRANDCHILD_SECONDS = 600


def _run_limited_in_time(part, mode, reached):
    """gpu_check._run_limited of the part at a 3 s limit, or, where this machine did not get the part to
    the point the mode is about (``reached``: the output) within it, at twice the limit, and so on: the
    limit is the thing tested, and a slow machine's start-up must not pass for it."""
    limit = 3
    while True:
        result, output = gpu_check._run_limited([sys.executable, "-c", part, mode], limit=limit)
        if reached(output) or limit >= GRANDCHILD_SECONDS // 4:
            return result, output, limit
        limit *= 2


def test_a_part_past_its_limit_is_ended_with_what_it_started(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    part = ("import os, subprocess, sys, time\n"
            f"p = subprocess.Popen(['sleep', '{GRANDCHILD_SECONDS}'])\n"
            f"open({str(pid_file)!r} + '.part', 'w').write(str(p.pid))\n"
            f"os.replace({str(pid_file)!r} + '.part', {str(pid_file)!r})\n"
            "if sys.argv[1] == 'done':\n"
            "    print('RESULT {}', flush=True)\n"
            "    os._exit(0)\n"
            "print('HANGING', flush=True)\n"
            f"time.sleep({GRANDCHILD_SECONDS})\n")
    for mode in ("hangs", "done"):  # done: the part printed its result, a process it left holds the pipes
        if pid_file.exists():
            pid_file.unlink()
        # "hangs" is about a part that started its grandchild and then ran past the limit; "done" about
        # one that printed its result within it.
        said = "HANGING" if mode == "hangs" else "RESULT {}"  # a line of its own (the code is in the output too)
        result, output, limit = _run_limited_in_time(part, mode, lambda out: said in out.splitlines())
        assert ("error" in result) == (mode == "hangs"), (limit, result, output)
        if mode == "hangs":
            assert result["error"] == f"ran past its {limit} s limit"
        assert result["seconds"] < GRANDCHILD_SECONDS  # it did not wait for the grandchild to end by itself
        grandchild = Path(f"/proc/{pid_file.read_text()}/stat")
        # SIGKILL is delivered asynchronously: on a loaded machine the process may still be running its
        # exit for a while; it must be gone (or a zombie) before its sleep would have ended (the wait
        # is a guard only: it ends as soon as the grandchild is gone).
        deadline = time.monotonic() + GRANDCHILD_SECONDS // 2
        while _alive(grandchild) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(grandchild)  # gone (or a zombie)
