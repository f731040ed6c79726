"""A quick purification probe on a slice of the standard zoo (true target given).

    python -m benchmarks.probe [--models ID,...] [--variant NAME ...] [--out FILE]

Trains (or loads from the standard suite's cache) the 10 %-poison BadNets, Blend and Trojan
models of every family, solves s_t as the audit does, and purifies each with the study variants
named (``benchmarks.run.STUDY``) through :func:`hub_backdoor.purify`.
Per model and variant it prints ACC / ASR, the target class's own accuracy and the held-out
latent-trigger share at scales 1 and 2 (clean test images of the other classes that ``h + scale
* s_t`` sends to the target), and ACC / ASR of the guarded model (:mod:`hub_backdoor.purification.guard`).
Twelve models and three variants take about 10 minutes in one process with the models cached
(about 2 more to train them). It is a probe, not the study: the study's table (``--suite
standard``) decides the defaults.
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

from . import core
from .models import audit_view
from .run import OURS, RESULTS, STANDARD_ARCHS, STUDY, Runner, model_specs, zoo_report

PROBE_MODELS = [f"{a}-{k}-10pct" for k in ("badnets", "blend", "trojan") for a in STANDARD_ARCHS]


@torch.no_grad()
def latent_share(clf: Any, X: torch.Tensor, Y: torch.Tensor, s_t: np.ndarray, target: int, scale: float
                 ) -> float:
    """Share of the images of ``X`` not of ``target`` that ``head(h + scale * s_t)`` sends to it."""
    clf.model.eval()
    keep = Y != target
    _, h = clf.forward(X[keep])
    s = scale * torch.as_tensor(s_t, dtype=h.dtype, device=h.device)
    return float((clf.head_logits(h + s).argmax(1) == target).float().mean())


def probe(runner: Runner, spec: dict[str, Any], variants: list[str]) -> dict[str, dict[str, float]]:
    """ACC / ASR / target-class ACC and latent shares of ``spec``'s model before and after each variant."""
    t = spec["target"]
    clf, _ = runner.trained(spec)
    trig = runner.triggered(spec)[0]
    au = core.audit(audit_view(clf), runner.Xc, runner.Yc)
    report = zoo_report(clf, au.perturbations, au.inp.norms)
    s_t = au.perturbations[t]
    Xh, Yh = runner.Xte[:1000], runner.Yte[:1000]

    def measure(c: Any) -> dict[str, float]:
        out = core.evaluate(c.model, runner.Xte, runner.Yte, *trig, t)
        out |= {f"latent_x{k:g}": latent_share(c, Xh, Yh, s_t, t, k) for k in (1.0, 2.0)}
        if c is not clf:  # the guarded model (hub_backdoor.purification.guard): the original unless it says t
            g = core.metrics(core.guarded_predict(clf.model, c.model, t), runner.Xte, runner.Yte, *trig, t)
            out |= {f"{k}_guarded": v for k, v in g.items()}
        return out

    res = {"none": measure(clf)}
    for name in variants:
        p = {**OURS, **STUDY[name]}
        t0 = time.perf_counter()
        tuned = runner.purified(spec, clf, report, p, t)
        res[name] = measure(tuned) | {"seconds": time.perf_counter() - t0}
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.probe", description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(PROBE_MODELS), help="comma-separated zoo ids")
    ap.add_argument("--variant", action="append", choices=sorted(STUDY), help="study variant (repeatable)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    variants = args.variant or ["library default"]
    runner = Runner("standard", torch.device("cpu"), RESULTS, stacked=False)
    specs = {s["id"]: s for s in model_specs(runner.cfg)}
    unknown = [m for m in args.models.split(",") if m not in specs]
    if unknown:
        ap.error(f"not a standard-zoo model: {', '.join(unknown)}")
    out: dict[str, Any] = {}
    for mid in args.models.split(","):
        out[mid] = rec = probe(runner, specs[mid], variants)
        for name, m in rec.items():
            guarded = (f" guarded ACC {100 * m['acc_guarded']:5.1f} ASR {100 * m['asr_guarded']:5.1f}"
                       if "acc_guarded" in m else "")
            print(f"{mid:28s} {name:44s} ACC {100 * m['acc']:5.1f} ASR {100 * m['asr']:5.1f} "
                  f"target-class ACC {100 * m['acc_target']:5.1f} latent x1 {m['latent_x1']:.2f} "
                  f"x2 {m['latent_x2']:.2f}{guarded}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
