"""The docs say what the code does: the generated references are current, every `bilm` command in
the README and docs/ parses, every link resolves, no page names a path of one machine, and the code
map and layer table of docs/architecture.md are the tree's. Cheap: nothing here runs PyTorch."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _load(path: Path, name: str):
    """A script or test module by path, without leaving its folder on sys.path."""
    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path[:] = saved


generate_reference = _load(DOCS / "generate_reference.py", "generate_reference")


def pages() -> list[Path]:
    """Every Markdown page a user reads: the README, the changelog and docs/ (generated ones too)."""
    return [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted(DOCS.rglob("*.md"))]


def code_blocks(text: str) -> list[tuple[int, str, str]]:
    """(line number of the opening fence, language, body) of every fenced block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = re.match(r"^```(\S*)\s*$", lines[i])
        if opening:
            end = next(k for k in range(i + 1, len(lines)) if lines[k].startswith("```"))
            blocks.append((i + 1, opening.group(1), "\n".join(lines[i + 1:end])))
            i = end
        i += 1
    return blocks


def prose(text: str) -> str:
    """The text without fenced blocks and inline code (where links and paths are only examples)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


# ----------------------------------------------------------------------------- generated reference

def test_reference_files_are_current():
    stale = generate_reference.stale()
    assert not stale, (f"stale: {[str(p.relative_to(ROOT)) for p in stale]}; "
                       "run: python docs/generate_reference.py")


def test_check_flag_fails_on_a_stale_file_and_the_script_rewrites_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(generate_reference, "REFERENCE", tmp_path)
    assert generate_reference.main(["--check"]) == 1  # missing files are stale
    assert generate_reference.main([]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli.md", "config.md"]
    assert generate_reference.main(["--check"]) == 0
    (tmp_path / "cli.md").write_text((tmp_path / "cli.md").read_text() + "edited by hand\n")
    assert generate_reference.main(["--check"]) == 1
    assert "cli.md is stale" in capsys.readouterr().err


def test_reference_does_not_depend_on_the_terminal(monkeypatch):
    wide = generate_reference.cli_reference()
    monkeypatch.setenv("COLUMNS", "40")
    assert generate_reference.cli_reference() == wide


# ----------------------------------------------------------------------------- commands

def shell_commands(block: str) -> list[list[str]]:
    """The simple commands of a shell block: continuation lines joined, comments dropped, split at
    ``&&``, ``||``, ``;`` and ``|``, leading ``VAR=value`` assignments removed."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        current: list[str] = []
        for word in words + [";"]:
            if word in ("&&", "||", ";", "|"):
                while current and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", current[0]):
                    current.pop(0)
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(word)
    return commands


def documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for page in pages():
        for line, language, body in code_blocks(page.read_text(encoding="utf-8")):
            if language in ("bash", "sh"):
                where = f"{page.relative_to(ROOT)}:{line}"
                found += [(where, command) for command in shell_commands(body)]
    return found


def test_every_bilm_command_in_the_docs_parses():
    from bilm.cli import build_parser

    parser, _ = build_parser()
    checked, failures = 0, []
    for where, command in documented_commands():
        if command[0] != "bilm":
            continue
        checked += 1
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                parser.parse_args(command[1:])
        except SystemExit as e:
            if e.code not in (0, None):  # --version and --help exit 0
                failures.append(f"{where}: {shlex.join(command)}\n  {stderr.getvalue().strip().splitlines()[-1]}")
    assert checked > 30
    assert not failures, "\n".join(failures)


def test_every_make_target_in_the_docs_exists():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, re.M))
    for where, command in documented_commands():
        if command[0] == "make":
            for word in command[1:]:
                if "=" not in word and not word.startswith("-"):
                    assert word in targets, f"{where}: make {word}: no such target in the Makefile"


def test_commands_use_the_activated_environment():
    """One convention: `source .venv/bin/activate` once, then bare `bilm` and `python`. Only the
    install block names .venv/bin/ (to put a CUDA torch into the environment before make)."""
    readme = (ROOT / "README.md").read_text()
    assert "source .venv/bin/activate" in readme
    for page in pages():
        for line, _, body in code_blocks(page.read_text(encoding="utf-8")):
            for text in body.splitlines():
                if ".venv/bin/" in text:
                    assert text.startswith(".venv/bin/pip install torch") or "source .venv/bin/activate" in text, (
                        f"{page.relative_to(ROOT)}:{line}: {text!r}: use the activated environment")


# ----------------------------------------------------------------------------- links and paths

def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", prose_keep_headings(page.read_text(encoding="utf-8")), re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return out


def prose_keep_headings(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def test_every_link_resolves():
    failures = []
    for page in pages():
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(page.read_text(encoding="utf-8"))):
            if re.match(r"^[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                failures.append(f"{page.relative_to(ROOT)}: {target}: no such file")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                failures.append(f"{page.relative_to(ROOT)}: {target}: no such heading in {file.name}")
    assert not failures, "\n".join(failures)


MACHINE_PATHS = re.compile(r"(?<![\w.~])(/tmp/|/work/|/home/|/Users/|/root/|/scratch/|\.\./shared)")


def test_no_path_of_a_particular_machine():
    failures = []
    for page in pages():
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if MACHINE_PATHS.search(line):
                failures.append(f"{page.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not failures, "\n".join(failures)


def test_the_readme_index_names_every_page():
    readme = (ROOT / "README.md").read_text()
    index = readme[readme.index("## Documentation"):]
    index = index[:index.index("\n## ", 1)]
    linked = set(re.findall(r"\]\((docs/[^)#]+\.md)\)", index))
    on_disk = {str(p.relative_to(ROOT)) for p in DOCS.rglob("*.md")}
    assert not on_disk - linked, f"pages the README's docs index does not list: {sorted(on_disk - linked)}"


# ----------------------------------------------------------------------------- architecture

def _section(page: Path, heading: str) -> str:
    text = page.read_text(encoding="utf-8")
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else len(text)]


def code_map_modules() -> set[str]:
    """The module paths the code map names (its table, up to the next section)."""
    return set(re.findall(r"`((?:bilm|data_tools)/[\w/]+\.py)`", _section(DOCS / "architecture.md", "Code map")))


def tree_modules() -> set[str]:
    """Every module of bilm/ and data_tools/ (a package's __init__.py is its folder's, not a row)."""
    return {str(p.relative_to(ROOT)) for package in ("bilm", "data_tools") for p in (ROOT / package).rglob("*.py")
            if p.name != "__init__.py"}


def test_code_map_lists_exactly_the_modules_of_the_tree():
    listed, tree = code_map_modules(), tree_modules()
    assert len(tree) > 40
    assert not tree - listed, f"modules missing from docs/architecture.md's code map: {sorted(tree - listed)}"
    assert not listed - tree, f"docs/architecture.md's code map names modules that do not exist: {sorted(listed - tree)}"


def test_layer_table_is_the_layering_tests_order():
    """The layers table of docs/architecture.md lists tests/test_layering.py's LAYERS, in order."""
    layers = _load(ROOT / "tests" / "test_layering.py", "layering_for_docs").LAYERS
    rows = [line for line in _section(DOCS / "architecture.md", "Layers").splitlines()
            if re.match(r"^\| \d+\. ", line)]
    row_of = {}
    for index, row in enumerate(rows):
        for path in re.findall(r"`(bilm/[\w/.]*)`", row.split("|")[2]):
            row_of[path.rstrip("/").removesuffix(".py").removesuffix("/__init__").replace("/", ".")] = index
    previous = -1
    for name, packages in layers:
        present = [p for p in packages if (ROOT / p.replace(".", "/")).exists()
                   or (ROOT / (p.replace(".", "/") + ".py")).exists() or p == "bilm"]
        for package in present:
            assert package in row_of, f"layer {name!r}: {package} is not in docs/architecture.md's layer table"
        indices = {row_of[p] for p in present}
        assert len(indices) == 1 and min(indices) > previous, f"layer {name!r} is out of order in docs/architecture.md"
        previous = min(indices)
