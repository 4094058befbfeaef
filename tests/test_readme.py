"""The README's commands are the ones that run: the demo block equals `make demo`'s recipe, and every
other command block either runs, twice, in a scratch copy of the repository (as a user pastes it
after `make demo`) or says on the line above it why it is not run here:

    <!-- not run: downloads the published model -->

Blocks run with the environment activated (`.venv/bin` first on PATH), offline, against stand-in demo
outputs: the Makefile's own prepare, train (cut to a few steps) and export commands."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = "<!-- demo-commands"
NOT_RUN = re.compile(r"^<!-- not run: (\S.*?) -->$")
RUNNABLE = ("bash", "sh", "python")
MAX_LINES = 250


def makefile_demo_commands() -> list[str]:
    text = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", text, re.M)
    assert recipe, "Makefile has no demo recipe"
    variables = {"$(BILM)": "bilm", "$(PY)": "python", "$(DEMO_OUT)": "demo_out"}
    commands = []
    for line in recipe.group(1).splitlines():
        line = line.strip()
        line = re.sub(r"^test -f \S+ \|\| ", "", line)  # the guard that reuses a finished stage
        for name, value in variables.items():
            line = line.replace(name, value)
        assert "$(" not in line, f"unknown Makefile variable in: {line}"
        commands.append(line)
    return commands


def readme_demo_commands() -> list[str]:
    text = README.read_text()
    start = text.index(MARKER)
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_demo_block_is_the_makefile_demo():
    assert readme_demo_commands() == makefile_demo_commands()
    assert len(makefile_demo_commands()) >= 6  # prepare, train, evaluate, export, embed, neighbours


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1)
    assert [line.split("#")[0].strip() for line in first_block.splitlines()] == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_demo_inputs_exist():
    for command in makefile_demo_commands():
        for token in command.split():
            if token.startswith(("data/", "configs/", "examples/")):
                assert (ROOT / token).exists(), f"{token} (in `{command}`) is missing"


def test_readme_is_short_and_keeps_no_history():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_LINES, "the README gets a newcomer running: move the rest to docs/"
    # Per-commit history (test timings at a commit, ...) belongs in CHANGELOG.md.
    assert not re.search(r"\bat [0-9a-f]{7}\b", text), "per-commit figures belong in CHANGELOG.md"
    assert not re.search(r"\d+ passed", text), "test-suite timings belong in docs/development.md"


# ----------------------------------------------------------------------------- the command blocks

def readme_blocks() -> list[tuple[int, str, str, str | None]]:
    """(line of the opening fence, language, body, the not-run reason or None) of every fenced block."""
    lines = README.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = re.match(r"^```(\S*)\s*$", lines[i])
        if opening:
            end = next(k for k in range(i + 1, len(lines)) if lines[k].startswith("```"))
            reason, above = None, i - 1
            while above >= 0 and lines[above].startswith("<!--"):  # the comments directly above
                marked = NOT_RUN.match(lines[above])
                reason = marked.group(1) if marked else reason
                above -= 1
            blocks.append((i + 1, opening.group(1), "\n".join(lines[i + 1:end]) + "\n", reason))
            i = end
        i += 1
    return blocks


RUN = [(line, language, body) for line, language, body, reason in readme_blocks()
       if language in RUNNABLE and reason is None]


def test_every_block_runs_or_says_why_not():
    blocks = readme_blocks()
    unlabelled = [line for line, language, _, _ in blocks if not language]
    assert not unlabelled, f"README.md:{unlabelled}: give each block a language (bash, python, ...)"
    marked_other = [line for line, language, _, reason in blocks if reason and language not in RUNNABLE]
    assert not marked_other, f"README.md:{marked_other}: only bash, sh and python blocks are run or marked"
    # The newcomer's blocks that can run here do: the environment, the vectors, scoring.
    assert len(RUN) >= 4, f"only {len(RUN)} README blocks run; mark as not run only what cannot run here"


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> tuple[Path, dict]:
    """A scratch copy of the repository as `make demo` leaves it (the environment linked, stand-in
    demo outputs made by the Makefile's own commands with training cut to 20 steps), and the
    environment a shell has after `source .venv/bin/activate`."""
    venv = ROOT / ".venv"
    if not (venv / "bin" / "bilm").exists():
        pytest.skip("no .venv with bilm installed: run make setup")
    here = tmp_path_factory.mktemp("clone")
    for name in ("data", "configs", "examples", "launch"):
        shutil.copytree(ROOT / name, here / name)
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, here / name)
    (here / ".venv").symlink_to(venv)
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           "VIRTUAL_ENV": str(venv), "BILM_OFFLINE": "1", "BILM_CACHE": str(here / "cache")}
    env.pop("PYTHONHOME", None)
    prepare, train, _, export = makefile_demo_commands()[:4]
    for command in (prepare + " --no-progress", train + " --set train.max_steps=20 --no-progress", export):
        done = subprocess.run(["bash", "-c", command], cwd=here, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
    return here, env


@pytest.mark.parametrize("line,language,body", RUN, ids=[f"README.md:{line}" for line, _, _ in RUN])
def test_readme_block_runs_twice(clone, line, language, body):
    here, env = clone
    if language == "python":
        script = here / f"readme_block_{line}.py"
        script.write_text(body)
        command = [str(ROOT / ".venv" / "bin" / "python"), str(script)]
    else:
        command = ["bash", "-e", "-o", "pipefail", "-c", body]
    for attempt in ("first", "second"):
        done = subprocess.run(command, cwd=here, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (f"README.md:{line}, pasted a {attempt} time, failed:\n{body}\n"
                                      f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
