"""The package's layout rules: no function of hub_backdoor/ runs over 80 lines (from its ``def`` to its
last line, docstring included); longer ones are split into small documented helpers."""

from __future__ import annotations

import ast
from pathlib import Path

import hub_backdoor

PACKAGE = Path(hub_backdoor.__file__).resolve().parent
MAX_LINES = 80


def long_functions(root: Path = PACKAGE, limit: int = MAX_LINES) -> list[str]:
    """``"path:line name (N lines)"`` of every function under ``root`` longer than ``limit`` lines."""
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > limit:
                    out.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return out


def test_no_function_is_over_80_lines():
    assert long_functions() == []


def test_the_count_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(80))
    (tmp_path / "m.py").write_text(f"def f():\n{body}\n")
    assert long_functions(tmp_path) == [f"{tmp_path.name}/m.py:1 f (81 lines)"]
