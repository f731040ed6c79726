"""Many-class probe: the library's default audit on 100-class models whose embedding is narrower
than C - 1 (timm ``test_resnet``, d = 96), trained on digit pairs (:func:`hub_backdoor.zoo.digit_pairs`),
clean and backdoored, a few seeds each.

    python -m benchmarks.many_classes --out benchmarks/results/many-classes-probe.json

A probe, not the zoo family: few models, one architecture, thresholds from the 10-class
calibration (so an unflagged model is "inconclusive, outside calibration"). It prints one row per
model and writes the JSON and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hub_backdoor import audit, zoo

TARGETS = (37, 62, 81)


def run_one(kind: str, seed: int, *, n_train: int, n_ref: int, epochs: int) -> dict[str, Any]:
    """Train one 100-class model (``kind``: ``clean`` or an attack of :data:`hub_backdoor.zoo.ATTACKS`)
    and audit it with the library's defaults."""
    train = zoo.digit_pairs(n_train, seed=seed)
    target = None
    if kind != "clean":
        target = TARGETS[seed % len(TARGETS)]
        train = zoo.poison(train, zoo.ATTACKS[kind](), target=target, rate=0.1, seed=seed)
    clf = zoo.timm_model("test_resnet", num_classes=100, size=32, seed=seed)
    t0 = time.perf_counter()
    zoo.train(clf, train, epochs=epochs, lr=0.05, seed=seed)
    t_train = time.perf_counter() - t0
    test = zoo.digit_pairs(n_ref, seed=1000 + seed, split="test")
    acc = zoo.accuracy(clf, test)
    asr = None
    if target is not None:
        asr = float(zoo.attack_success(clf, test, zoo.ATTACKS[kind](), target=target)[0])
    t0 = time.perf_counter()
    r = audit(clf, test, progress=False, seed=seed)
    top = int(np.argmax(r.anomaly_indices))
    return {
        "kind": kind, "seed": seed, "target": target, "C": clf.num_classes, "d": clf.embed_dim,
        "accuracy": acc, "asr": asr, "verdict": r.verdict, "reason": r.reason, "flagged": r.flagged,
        "top_class": top, "top_score": float(r.anomaly_indices[top]),
        "target_score": None if target is None else float(r.anomaly_indices[target]),
        "target_rank": (None if target is None
                        else int((r.anomaly_indices > r.anomaly_indices[target]).sum()) + 1),
        "searched": next((int(s.get("classes", 0)) for s in r.evidence["stages"]
                          if s["stage"] == "additive verification"), 0),
        "target_searched": None if target is None else r.classes[target].input_bound is not None,
        "audit_seconds": time.perf_counter() - t0, "train_seconds": t_train,
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | seed | acc | ASR | verdict | flagged | target | target's rank (score) | "
             "target searched | top class (score) | audit s |", "|" + "---|" * 11]
    for r in rows:
        asr = "" if r["asr"] is None else f"{r['asr']:.2f}"
        rank = "" if r["target"] is None else f"{r['target_rank']} ({r['target_score']:.2f})"
        searched = "" if r["target"] is None else ("yes" if r["target_searched"] else "no")
        lines.append(f"| {r['kind']} | {r['seed']} | {r['accuracy']:.3f} | {asr} | {r['verdict']} | "
                     f"{r['flagged'][:3]} | {r['target'] if r['target'] is not None else ''} | {rank} | "
                     f"{searched} | {r['top_class']} ({r['top_score']:.2f}) | {r['audit_seconds']:.0f} |")
    bd = [r for r in rows if r["target"] is not None and (r["asr"] or 0) >= 0.5]
    found = sum(1 for r in bd if r["flagged"][:1] == [r["target"]])
    clean = [r for r in rows if r["target"] is None]
    fp = sum(1 for r in clean if r["flagged"])
    lines += ["", f"Working backdoors (ASR >= 50 %) found with their class: {found} of {len(bd)}; "
              f"clean models flagged: {fp} of {len(clean)}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.many_classes", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default="clean,badnets,blend")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-ref", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for kind in args.kinds.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            row = run_one(kind, seed, n_train=args.n_train, n_ref=args.n_ref, epochs=args.epochs)
            print(json.dumps(row), flush=True)
            rows.append(row)
            if args.out is not None:  # after every model: a stopped run keeps what it measured
                args.out.parent.mkdir(parents=True, exist_ok=True)
                record = {"command": " ".join(sys.argv), "rows": rows}
                args.out.write_text(json.dumps(record, indent=1) + "\n")
                args.out.with_suffix(".md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
