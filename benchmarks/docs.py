"""Render docs/benchmarks.md from its template and the committed results:
``python -m benchmarks.docs`` (``--check`` only says whether the page is current).

The template (``benchmarks/benchmarks.template.md``) holds the prose; every number table and every
number quoted in the prose comes from ``benchmarks/results/``, so a re-run of a benchmark followed by
this command updates the page, and ``tests/test_benchmark_docs.py`` fails while it is stale.

Directives (``SOURCE`` is a results file, ``scale.json#qp`` a table rendered from a JSON file;
``SECTION`` a piece of a heading of that file, ``""`` for the whole file; ``N`` counts the
section's tables from 1):

* ``{{table SOURCE SECTION N [rows=A;B] [cols=X;Y]}}`` on a line of its own: that table, with only
  the named rows (first cell, its `code` part if it has one) and columns (header without markup),
  in the order named.
* ``{{text SOURCE SECTION PREFIX}}``: the section's paragraph that starts with PREFIX (joined
  into one line when the directive shares its line).
* ``{{cell SOURCE SECTION N ROW COLUMN}}`` anywhere: one cell, without its markup.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TEMPLATE = ROOT / "benchmarks" / "benchmarks.template.md"
PAGE = ROOT / "docs" / "benchmarks.md"
MAX_BYTES = 20 * 1024

_DIRECTIVE = re.compile(r"\{\{(table|text|cell) (.*?)\}\}")
_HEADING = re.compile(r"^#+ ")


# --- tables rendered from the JSON files that have no markdown of their own ---------------------

def _s(x: float) -> str:
    """Seconds at three significant digits, as the tables have always shown them."""
    return f"{x:.3g} s" if x < 100 else f"{x:,.0f} s"


def _runs(name: str) -> list[dict[str, Any]]:
    data = json.loads((RESULTS / name).read_text())
    runs = data["runs"] if "runs" in data else [data]
    return [r for run in runs for r in run["results"]]


def _qp(name: str) -> str:
    L = ["| C | d | fast solver: all classes | per class (median) | cvxpy: per class | "
         "max relative norm difference |", "|---|---|---|---|---|---|"]
    for r in (r for r in _runs(name) if r["part"] == "qp"):
        cv = r.get("cvxpy_per_class_seconds") or []
        diff = r.get("cvxpy_max_rel_norm_diff")
        total = _s(r["total_seconds"]) + ("" if r["measured"] == "all classes" else ", extrapolated")
        L.append(f"| {r['C']:,} | {r['d']:,} | {total} | {1000 * r['per_class_median']:.2g} ms | "
                 f"{_s(max(cv)) if cv else '–'} | "
                 f"{'–' if diff is None else f'{diff:.0e}'} |")
    return "\n".join(L)


def _head(name: str) -> str:
    L = ["| model | C | d | fast solver: all classes | per class (median) | cvxpy: per class | "
         "max relative norm difference |", "|---|---|---|---|---|---|---|"]
    for r in (r for r in _runs(name) if r["part"] == "head"):
        L.append(f"| {r['model']} | {r['C']:,} | {r['d']:,} | {_s(r['fast_all_classes_seconds'])} | "
                 f"{1000 * r['fast_per_class_median']:.2g} ms | {_s(max(r['cvxpy_per_class_seconds']))} | "
                 f"{r['cvxpy_max_rel_norm_diff']:.0e} |")
    return "\n".join(L)


def _overhead(name: str) -> str:
    """Minimum of the alternating runs, on CPU time where the run measured on it (a shared CPU
    inflates wall time) and on wall time on a GPU."""
    L = ["| model | C | input | n | plain | audit | audit / plain | reference pass / plain | QP |",
         "|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in _runs(name) if r["part"] == "overhead"):
        on = "cpu" if r["ratio_on"] == "cpu time" else "wall"
        model = r["model"].removesuffix(" (random weights)")  # the page says they all are
        L.append(f"| {model} | {r['C']:,} | {r['input']} | {r['n']:,} | "
                 f"{_s(min(r[f'plain_{on}']))} | {_s(min(r[f'audit_{on}']))} | {r['ratio_total']:.3f} | "
                 f"{r['ratio_reference_pass']:.3f} | {_s(min(r['qp_wall']))} |")
    return "\n".join(L)


def _memory(name: str) -> str:
    rows = [r for r in _runs(name) if r["part"] == "memory"]
    L = ["| images | time | peak RSS | growth over the peak before the audit | peak RSS / first row's |",
         "|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| {r['n']:,} | {_s(r['seconds'])} | {r['peak_rss_mib']:.1f} MiB | "
                 f"{r['growth_mib']:.1f} MiB | {r['peak_rss_mib'] / rows[0]['peak_rss_mib']:.3f} |")
    return "\n".join(L)


RENDERERS: dict[str, Callable[[str], str]] = {"qp": _qp, "head": _head, "overhead": _overhead,
                                              "memory": _memory}


# --- picking pieces out of a source -------------------------------------------------------------

def source(name: str) -> str:
    file, _, part = name.partition("#")
    if part:
        return RENDERERS[part](file) + "\n"
    return (RESULTS / file).read_text(encoding="utf-8")


def section(name: str, heading: str) -> list[str]:
    """The lines under the first heading that contains ``heading``, up to the next heading."""
    lines = source(name).splitlines()
    if not heading:
        return lines
    for i, line in enumerate(lines):
        if _HEADING.match(line) and heading in line:
            end = next((j for j in range(i + 1, len(lines)) if _HEADING.match(lines[j])), len(lines))
            return lines[i + 1:end]
    raise KeyError(f"{name}: no heading contains {heading!r}")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _bare(cell: str) -> str:
    code = re.match(r"`([^`]*)`", cell)
    return code.group(1) if code else cell.replace("*", "").strip()


def tables(name: str, heading: str) -> list[list[str]]:
    out: list[list[str]] = []
    prev = False
    for line in section(name, heading):
        is_row = line.startswith("|")
        if is_row and not prev:
            out.append([])
        if is_row:
            out[-1].append(line)
        prev = is_row
    return out


def table(name: str, heading: str, n: int, rows: list[str] | None = None,
          cols: list[str] | None = None) -> list[str]:
    found = tables(name, heading)
    if not 1 <= n <= len(found):
        raise KeyError(f"{name} {heading!r}: no table {n} (it has {len(found)})")
    head, rule, *body = found[n - 1]
    names = [_bare(c) for c in _cells(head)]
    keep = list(range(len(names)))
    if cols:
        missing = [c for c in cols if c not in names]
        if missing:
            raise KeyError(f"{name} {heading!r} table {n}: no column {missing} (it has {names})")
        keep = [names.index(c) for c in cols]
    if rows:
        by_key = {_bare(_cells(line)[0]): line for line in body}
        missing = [r for r in rows if r not in by_key]
        if missing:
            raise KeyError(f"{name} {heading!r} table {n}: no row {missing} (it has {list(by_key)})")
        body = [by_key[r] for r in rows]

    def pick(line: str) -> str:
        cells = _cells(line)
        return "| " + " | ".join(cells[i] for i in keep) + " |"

    return [pick(head), "|---" * len(keep) + "|", *map(pick, body)]


def cell(name: str, heading: str, n: str, row: str, col: str) -> str:
    lines = table(name, heading, int(n), rows=[row], cols=[col])
    return _bare(_cells(lines[2])[0])


def text(name: str, heading: str, prefix: str) -> list[str]:
    paras = "\n".join(section(name, heading)).split("\n\n")
    for p in paras:
        if p.strip().startswith(prefix):
            return p.strip().splitlines()
    raise KeyError(f"{name} {heading!r}: no paragraph starts with {prefix!r}")


# --- the page ------------------------------------------------------------------------------------

def _block(kind: str, args: list[str]) -> list[str]:
    if kind == "text":
        return text(*args)
    opts = dict(a.split("=", 1) for a in args[3:])
    unknown = set(opts) - {"rows", "cols"}
    if unknown:
        raise ValueError(f"table {args[:3]}: unknown option {sorted(unknown)}")
    split = {k: v.split(";") for k, v in opts.items()}
    src = args[0].partition("#")[0]
    # where the table came from, for whoever reads the markdown source
    return [f"<!-- benchmarks/results/{src} -->", *table(args[0], args[1], int(args[2]), **split)]


def render(template: str | None = None) -> str:
    template = TEMPLATE.read_text(encoding="utf-8") if template is None else template
    out: list[str] = []
    for line in template.splitlines():
        whole = _DIRECTIVE.fullmatch(line.strip())
        if whole and whole.group(1) != "cell":
            out += _block(whole.group(1), shlex.split(whole.group(2)))
            continue
        out.append(_DIRECTIVE.sub(lambda m: _inline(m.group(1), m.group(2)), line))
    return "\n".join(out).rstrip("\n") + "\n"


def _inline(kind: str, args: str) -> str:
    if kind == "table":
        raise ValueError("{{table ...}} belongs on a line of its own")
    return cell(*shlex.split(args)) if kind == "cell" else " ".join(text(*shlex.split(args)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only say whether docs/benchmarks.md is current")
    args = ap.parse_args(argv)
    page = render()
    size = len(page.encode("utf-8"))
    if size > MAX_BYTES:
        print(f"docs/benchmarks.md would be {size} bytes (at most {MAX_BYTES}): link to results instead",
              file=sys.stderr)
        return 1
    if args.check:
        current = PAGE.exists() and PAGE.read_text(encoding="utf-8") == page
        print("docs/benchmarks.md is " + ("current" if current else "stale: run python -m benchmarks.docs"))
        return 0 if current else 1
    PAGE.write_text(page, encoding="utf-8")
    print(f"wrote docs/benchmarks.md ({size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
