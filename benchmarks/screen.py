"""How many of the latent screen's classes the input search needs above 32 classes:
``python -m benchmarks.screen --stats DIR [--out benchmarks/results/screen-top]``.

Reads the stored statistics (:mod:`benchmarks.stats`) of models with more than ``VERIFY["all_up_to"]``
classes whose input search covered at least the largest screen tried, and scores the library's
default rule with the search restricted to the latent screen's top ``k`` classes
(:func:`hub_backdoor.detection.audit.screened_classes`). The restriction is exact: each class's
search follows its own perturbation over the same image sample, so a class's bound does not depend
on which other classes are searched. Writes ``<out>.md`` and ``<out>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from hub_backdoor.defaults import VERIFY
from hub_backdoor.detection.audit import screened_classes
from hub_backdoor.detection.report import atomic_write_text
from hub_backdoor.detection.rules import DEFAULT_RULE, REGISTRY, RULES

from . import stats
from .rescore import working

TOPS = (4, 6, 8, 10, 12, 16)


def restricted(z: dict[str, Any], top: int) -> Any:
    """The model's detection input with input bounds only for the screen's ``top`` classes."""
    inp = stats.detection_input(z)
    ks = screened_classes(np.asarray(z["norms"]), np.asarray(z["perturbations"]), np.asarray(z["h_std"]),
                          top=top)
    full = np.asarray(z["input_bounds"], np.float64)
    b = np.full_like(full, np.nan)
    b[ks] = full[ks]
    return dataclasses.replace(inp, input_bounds=b)


def study(zs: list[dict[str, Any]], tops: tuple[int, ...] = TOPS) -> dict[str, Any]:
    """Per model and screen size: the default rule's top class and score, and the score of its
    input-space part (``input-gap`` in units of its threshold)."""
    rows = []
    for z in zs:
        targets, work = list(z["spec"].get("targets") or []), working(z)
        row: dict[str, Any] = {"id": z["spec"]["id"], "targets": targets, "working": work, "by_top": {}}
        for top in tops:
            inp = restricted(z, top)
            s = RULES[DEFAULT_RULE](inp)
            gap = RULES["input-gap"](inp) / REGISTRY["input-gap"].threshold
            k = int(np.argmax(s))
            row["by_top"][str(top)] = {"class": k, "score": float(s[k]), "input_class": int(np.argmax(gap)),
                                       "input_part": float(np.max(gap))}
        rows.append(row)
    thr = REGISTRY[DEFAULT_RULE].threshold
    backdoored = [r for r in rows if len(r["working"]) == 1]
    clean = [r for r in rows if not r["targets"]]
    summary = {}
    for key in map(str, tops):
        summary[key] = {
            "found": sum(r["by_top"][key]["class"] == r["working"][0] and r["by_top"][key]["score"] > thr
                         for r in backdoored),
            "input_found": sum(r["by_top"][key]["input_class"] == r["working"][0]
                               and r["by_top"][key]["input_part"] > 1.0 for r in backdoored),
            "working": len(backdoored), "clean": len(clean),
            "false_alarms": sum(r["by_top"][key]["score"] > thr for r in clean),
            "clean_input_max": max((r["by_top"][key]["input_part"] for r in clean), default=float("nan")),
        }
    return {"rule": DEFAULT_RULE, "default_top": VERIFY["top"], "tops": list(tops), "models": rows,
            "summary": summary}


def markdown(res: dict[str, Any], source: str) -> str:
    tops, s = res["tops"], res["summary"]
    lines = [f"## Input search on the latent screen's top k classes (`{res['rule']}`)", "",
             f"Statistics: {source}. Library default: k = {res['default_top']}.", "",
             "| k | found (default rule) | false alarms | found by the input part alone | highest clean "
             "input part |", "|---|---|---|---|---|"]
    for k in tops:
        v = s[str(k)]
        lines.append(f"| {k} | {v['found']}/{v['working']} | {v['false_alarms']}/{v['clean']} | "
                     f"{v['input_found']}/{v['working']} | {v['clean_input_max']:.2f} |")
    lines += ["", "Per model: the default rule's top class and its score (1 = the line); in brackets, the "
              "input-space part's highest score (`input-gap` over its threshold).", "",
              "| model | targets | " + " | ".join(f"k = {k}" for k in tops) + " |",
              "|---|---|" + "---|" * len(tops)]
    for r in res["models"]:
        cells = [f"{v['class']}: {v['score']:.2f} ({v['input_part']:.2f})" for v in r["by_top"].values()]
        name = r["id"] + ("" if r["working"] or not r["targets"] else " (backdoor not working)")
        lines.append(f"| {name} | {r['targets'] or '–'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stats", type=Path, required=True, help="folder of stored statistics (*.npz)")
    ap.add_argument("--source", default=None, help="how the statistics are named in the table")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "screen-top")
    args = ap.parse_args(argv)
    zs = [z for z in stats.load_all(args.stats)
          if len(z["norms"]) > VERIFY["all_up_to"] and "input_classes" in z
          and len(z["input_classes"]) >= max(TOPS)]
    if not zs:
        raise SystemExit(f"no model above {VERIFY['all_up_to']} classes searched on >= {max(TOPS)} classes "
                         f"under {args.stats}")
    res = study(zs)
    res["source"] = args.source or str(args.stats)
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(res, indent=1) + "\n")
    atomic_write_text(args.out.with_suffix(".md"), markdown(res, res["source"]))
    print(markdown(res, res["source"]))
    return res


if __name__ == "__main__":
    main()
