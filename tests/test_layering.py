"""The package's shape: layers, bottom to top, every import going down; ``bilm`` never imports
``data_tools``; no import cycle inside ``bilm``.

The import graph is read from the source (ast), not from what happens to be loaded: every
``import``/``from ... import`` of a ``bilm`` module counts, at the top of a file or inside a
function (a lazy import is still a dependency, and a cycle through one is still two modules
that cannot be understood apart).
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import typing

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The one place bilm may import data_tools: the CLI's `prepare` command, lazily.
ALLOWED_DATA_TOOLS_IMPORTS = {"bilm.cli"}

# bilm's layers, bottom to top (docs/architecture.md's code map says the same). A module may import its own
# package and anything in a lower layer. Packages in one layer are peers: they do not import each
# other (formats and data; training, inference and evaluation).
LAYERS = (
    ("basics", ("bilm.core",)),
    ("shared files and data", ("bilm.formats", "bilm.data")),
    ("modules", ("bilm.modules",)),
    ("run store", ("bilm.runs",)),
    ("scoring", ("bilm.scoring",)),
    ("stages", ("bilm.training", "bilm.inference", "bilm.evaluation")),
    ("commands", ("bilm.commands",)),
    ("entry points", ("bilm.cli", "bilm.elmo", "bilm")),
)


def package_of(module: str, layers=LAYERS) -> tuple[int, str]:
    """(layer index, package) of a module: the longest package name it is, or lies inside."""
    found = [(len(p), i, p) for i, (_, packages) in enumerate(layers) for p in packages
             if module == p or (module.startswith(p + ".") and p.count(".") > 0)]
    if not found:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS (and docs/architecture.md's code map)")
    _, index, package = max(found)
    return index, package


def upward_imports(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
    """Every import of a module from a higher layer, or from a peer package of its layer."""
    found = []
    for module, targets in sorted(graph.items()):
        layer, package = package_of(module, layers)
        for target in sorted(targets):
            target_layer, target_package = package_of(target, layers)
            if target_layer > layer:
                found.append(f"{module} ({layers[layer][0]}) imports {target} ({layers[target_layer][0]})")
            elif target_layer == layer and target_package != package and layer < len(layers) - 1:
                found.append(f"{module} imports its peer {target} ({layers[layer][0]})")
    return found


def module_files(package_dir: str) -> dict[str, str]:
    """Dotted module name -> file, for every .py file under ``package_dir`` (a package: its __init__)."""
    base = os.path.dirname(package_dir)
    modules = {}
    for directory, _, files in os.walk(package_dir):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                dotted = os.path.relpath(path, base)[:-3].replace(os.sep, ".")
                modules[dotted.removesuffix(".__init__")] = path
    return modules


def imported_names(path: str, module: str, is_package: bool) -> set[str]:
    """Every module name a file imports (and, for ``from X import y``, ``X.y`` too: y may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                parts = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(package_dir: str) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports (the nearest enclosing module of a name)."""
    modules = module_files(package_dir)
    graph = {}
    for module, path in modules.items():
        targets = set()
        for name in imported_names(path, module, path.endswith("__init__.py")):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_inside_bilm():
    graph = import_graph(os.path.join(ROOT, "bilm"))
    assert len(graph) > 30  # the walk found the package
    found = cycles(graph)
    assert not found, "import cycles inside bilm: " + "; ".join(
        " <-> ".join(f"{m} (imports {', '.join(sorted(graph[m] & set(c)))})" for m in c) for c in found)


def test_every_import_goes_down_a_layer():
    graph = import_graph(os.path.join(ROOT, "bilm"))
    found = upward_imports(graph)
    assert not found, "imports that go up (or sideways between peers):\n  " + "\n  ".join(found)


def test_the_layer_check_finds_an_upward_import_inside_a_function(tmp_path):
    package = tmp_path / "bilm"
    for sub in ("core", "formats", "training", "inference"):
        (package / sub).mkdir(parents=True)
        (package / sub / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "core" / "text.py").write_text("import os\n")
    (package / "formats" / "weights.py").write_text(
        "from bilm.core.text import os\n"           # down: fine
        "def f():\n    from bilm.training import run  # up, and lazy\n")
    (package / "training" / "run.py").write_text("from ..formats import weights\n")  # relative, down
    (package / "inference" / "embedder.py").write_text("import bilm.training.run\n")  # a peer
    graph = import_graph(str(package))
    assert upward_imports(graph) == [
        "bilm.formats.weights (shared files and data) imports bilm.training (stages)",
        "bilm.formats.weights (shared files and data) imports bilm.training.run (stages)",
        "bilm.inference.embedder imports its peer bilm.training.run (stages)"]
    (package / "stray.py").write_text("")
    with pytest.raises(AssertionError, match="bilm.stray is in no layer"):
        upward_imports(import_graph(str(package)))


def test_the_cycle_check_finds_a_cycle(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub.b import thing\n")
    (package / "sub" / "b.py").write_text("def thing():\n    from pkg import a  # lazy, still a cycle\n")
    (package / "c.py").write_text("from . import a\n")  # relative, no cycle
    graph = import_graph(str(package))
    assert graph["pkg.c"] == {"pkg", "pkg.a"}  # importing pkg.a runs pkg/__init__ first
    assert cycles(graph) == [["pkg.a", "pkg.sub.b"]]


def test_bilm_imports_data_tools_only_in_the_cli():
    graph_sources = module_files(os.path.join(ROOT, "bilm"))
    offenders = sorted(m for m, path in graph_sources.items()
                       if any(n == "data_tools" or n.startswith("data_tools.")
                              for n in imported_names(path, m, path.endswith("__init__.py")))
                       and m not in ALLOWED_DATA_TOOLS_IMPORTS)
    assert not offenders, f"bilm modules importing data_tools: {offenders}"


@pytest.mark.parametrize("module", ["bilm.inference.embedder", "bilm.elmo", "bilm.training.run", "bilm.scoring.evaluate",
                                    "bilm.commands.export", "bilm.inference.score"])
def test_library_modules_load_no_data_tools(module):
    code = (f"import sys, {module}\n"
            "loaded = sorted(m for m in sys.modules if m == 'data_tools' or m.startswith('data_tools.'))\n"
            "assert not loaded, loaded\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr


def test_config_lstm_impls_agree_with_the_lstm_module():
    from bilm.runs.config import TrainConfig
    from bilm.modules.lstm import LSTM_IMPLS
    assert typing.get_args(typing.get_type_hints(TrainConfig)["lstm_impl"]) == LSTM_IMPLS
