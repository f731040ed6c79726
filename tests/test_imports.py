"""Every module of hub_backdoor imports alone, and no two modules import each other (directly or
through others), counting imports inside functions too."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import hub_backdoor

ROOT = Path(hub_backdoor.__file__).resolve().parent.parent


def _modules() -> dict[str, Path]:
    """Every module of the package (``__main__`` modules too), by dotted name."""
    found = {"hub_backdoor": Path(hub_backdoor.__file__)}
    for info in pkgutil.walk_packages(hub_backdoor.__path__, prefix="hub_backdoor."):
        spec = info.module_finder.find_spec(info.name)  # type: ignore[union-attr]
        assert spec is not None and spec.origin is not None
        found[info.name] = Path(spec.origin)
    return found


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, known: set[str]) -> list[str]:
    """The package modules an import statement names (``from . import x``: the submodule ``x``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level:
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its source. An import of a module's own
    parent package is left out: Python imports the parents first anyway, so it cannot close a cycle."""
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _targets(name, path.name == "__init__.py", node, known):
                while target not in known and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in known and target != name and not name.startswith(target + "."):
                    edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walk_sees_the_command_modules():
    graph = import_graph()
    for name in ("hub_backdoor.cli.audit", "hub_backdoor.cli.purify", "hub_backdoor.cli.card",
                 "hub_backdoor.cli.demo", "hub_backdoor.adapters.loading", "hub_backdoor.outputs.publish"):
        assert name in graph
    assert "hub_backdoor.demo" in graph["hub_backdoor.cli.demo"]  # function-level imports count


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert cycles(import_graph()) == []


#: The pipeline's stages in order, by top-level module or package of hub_backdoor. A module may
#: import its own stage and earlier ones, never a later one.
STAGES: list[tuple[str, ...]] = [
    ("errors", "defaults", "layout", "distributed"),  # facts and the process runtime every stage shares
    ("sources",),
    ("adapters",),
    ("detection",),
    ("options", "config"),  # the typed options of both jobs (they name the detection rules), and their file
    ("purification",),
    ("outputs",),
    ("jobs", "zoo", "demo"),  # the workflow layer
    ("cli", "integrations"),  # front ends over the workflow layer
]
_RANK = {name: i for i, names in enumerate(STAGES) for name in names}


def _stage(module: str) -> int | None:
    """The stage of ``hub_backdoor.<top>[...]``; ``None`` for the package root (it only names the
    public API, loaded on use)."""
    parts = module.split(".")
    return None if len(parts) == 1 else _RANK.get(parts[1], -1)


def test_every_module_belongs_to_a_stage():
    assert [m for m in _modules() if _stage(m) == -1] == []


def test_no_module_imports_a_later_stage():
    graph = import_graph()
    later = sorted(
        f"{name} -> {target}" for name, edges in graph.items() for target in edges
        if _stage(name) is not None and _stage(target) is not None and _stage(target) > _stage(name)
    )
    assert later == []


def _local_imports() -> list[str]:
    """``module:line`` of every import of the package's own modules inside a function."""
    modules = _modules()
    found = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                own = (isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith(
                    "hub_backdoor"))) or (isinstance(node, ast.Import) and any(
                    a.name.startswith("hub_backdoor") for a in node.names))
                if own:
                    found.append(f"{name}:{node.lineno}")
    return sorted(set(found))


def test_few_imports_of_the_package_inside_functions():
    # the root's lazy public names and optional heavy adapters are the reasons left; everything else
    # imports at the top, so the import graph above is what runs
    assert len(_local_imports()) <= 10, _local_imports()


def test_nothing_in_the_package_runs_the_command_line_by_argv():
    # the demo and the integrations call library functions; only the cli package (and the hf alias,
    # which is the command line under another name) may call cli.main
    graph = import_graph()
    allowed = {"hub_backdoor.integrations"}
    callers = [
        name for name, edges in graph.items()
        if not name.startswith("hub_backdoor.cli") and name not in allowed and "hub_backdoor.cli" in edges
    ]
    assert callers == []


@pytest.mark.parametrize(
    "module",
    sorted(m for m in _modules() if m.startswith("hub_backdoor.cli") and not m.endswith("__main__"))
    + ["hub_backdoor.adapters.loading", "hub_backdoor.outputs.publish", "hub_backdoor.demo",
       "hub_backdoor.integrations"],
)
def test_module_imports_alone(module):
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_python_m_cli_runs_the_command_line():
    done = subprocess.run(
        [sys.executable, "-m", "hub_backdoor.cli", "--version"], cwd=ROOT, capture_output=True, text=True,
        timeout=300,
    )
    assert done.returncode == 0 and done.stdout.startswith("hub-backdoor "), done.stderr[-2000:]


_HEAVY = ("torch", "transformers", "timm", "cvxpy", "matplotlib", "datasets", "accelerate")


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["audit", "--help"], ["purify", "--help"],
                                  ["card", "--help"], ["demo", "--help"]])
def test_version_and_help_import_no_heavy_library(argv):
    # `--version` and `--help` stay fast because they never import torch and friends; the timing
    # itself is benchmarks/startup.py, beside `hf version`
    code = (
        "import sys\n"
        "from hub_backdoor.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(sorted(m for m in {_HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_root_package_loads_its_names_on_use():
    code = (
        "import sys, hub_backdoor\n"
        "assert 'torch' not in sys.modules\n"
        "import hub_backdoor.detection.audit\n"  # the function's module, in the detection stage
        "from hub_backdoor.detection.audit import audit\n"
        "assert hub_backdoor.audit is audit and callable(hub_backdoor.audit)\n"
        "assert set(hub_backdoor.__all__) <= set(dir(hub_backdoor))\n"
        "assert all(getattr(hub_backdoor, n) is not None for n in hub_backdoor.__all__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
