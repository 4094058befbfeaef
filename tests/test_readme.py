"""The README's commands are the ones that run: the demo block equals `make demo`'s recipe."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- demo-commands"


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
    text = (ROOT / "README.md").read_text()
    start = text.index(MARKER)
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_demo_block_is_the_makefile_demo():
    assert readme_demo_commands() == makefile_demo_commands()
    assert len(makefile_demo_commands()) >= 6  # prepare, train, evaluate, export, embed, neighbours


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
    first_block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    assert [line.split("#")[0].strip() for line in first_block.splitlines()] == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_demo_inputs_exist():
    for command in makefile_demo_commands():
        for token in command.split():
            if token.startswith(("data/", "configs/", "examples/")):
                assert (ROOT / token).exists(), f"{token} (in `{command}`) is missing"


def code_map_modules() -> set[str]:
    """The module paths the README's code map names (its table, up to the next section)."""
    text = (ROOT / "README.md").read_text()
    start = text.index("## Code map\n")
    section = text[start:text.index("\n## ", start + 1)]
    return set(re.findall(r"`((?:bilm|data_tools)/[\w/]+\.py)`", section))


def tree_modules() -> set[str]:
    """Every module of bilm/ and data_tools/ (a package's __init__.py is its folder's, not a row)."""
    return {str(p.relative_to(ROOT)) for package in ("bilm", "data_tools") for p in (ROOT / package).rglob("*.py")
            if p.name != "__init__.py"}


def test_code_map_lists_exactly_the_modules_of_the_tree():
    listed, tree = code_map_modules(), tree_modules()
    assert len(tree) > 40
    assert not tree - listed, f"modules missing from the README's code map: {sorted(tree - listed)}"
    assert not listed - tree, f"the README's code map names modules that do not exist: {sorted(listed - tree)}"
