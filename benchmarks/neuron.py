"""Neuron-space study on the standard zoo: ``python -m benchmarks.neuron [--train] [--report-only]``.

The zoo's weights are not committed (only their statistics, ``results/standard/*.npz``), and a
model trained again on another machine is another model (a retrained PreAct-ResNet18 agreed with
its stored logits on 95 % of the reference images, max logit difference 3.6). So every number here
is measured on the retrained models themselves: clean accuracy and ASR, the default's two parts
(the latent QP's ``agree-mad`` and the input search's ``input-gap``, recomputed with the suite's
settings), and the neuron-noise scores (:mod:`hub_backdoor.detection.neuron`). Models are taken in
:data:`benchmarks.neuron_order.ORDER` (balanced tiers; whatever is trained counts).

Per model the results go to ``results/neuron.json`` as they come (resumable). The report
(``results/neuron.md``) gives, for each statistic alone and fused with the default's parts:
TPR at 0 false positives in-sample, leave-one-family-out (LOFO) and leave-one-attack-out (LOAO),
per attack kind and per family. Thresholds are set out of sample: just above the highest clean
score of the models the held-out part does not contain (LOFO: the other families' clean models;
LOAO: all clean models, which contain no attack, so a fixed rule's LOAO equals its in-sample 0-FP
figure, and LOAO only bites for the *selected* rule: the candidate is picked on the other attacks).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hub_backdoor.detection.report import atomic_write_text
from hub_backdoor.detection.rules import RULES

from .neuron_order import ORDER

RESULTS = Path(__file__).resolve().parent / "results"
WORKING_ASR = 0.5
#: the untargeted onset probe: the library's defaults (hub_backdoor.detection.neuron.neuron_scores)
ONSET_KW: dict[str, Any] = {}
#: the per-class targeted bound search (40 images per class, 12 levels, one step each)
TARGETED_KW: dict[str, Any] = {"n_images": 40, "n_targeted": 40, "steps": 12, "eps_min": 0.005,
                               "eps_max": 0.5, "inner": 1}


# -- measuring ------------------------------------------------------------------------------------
def measure(runner: Any, spec: dict[str, Any], train: bool) -> dict[str, Any] | None:
    from hub_backdoor.detection.neuron import bound_scores, neuron_scores
    from hub_backdoor.detection.verification import verify_input_space

    from . import core
    from .models import audit_view
    from .run import planted

    loaded = runner.trained(spec) if train else runner._load(spec)
    if loaded is None:
        return None
    clf, _ = loaded
    trig = runner.triggered(spec)
    ev = [core.evaluate(clf.model, runner.Xte, runner.Yte, x, y, t)
          for (x, y), (_, t) in zip(trig, planted(spec))]
    acc = ev[0]["acc"] if ev else core.evaluate(clf.model, runner.Xte, runner.Yte, None, None, None)["acc"]
    view = audit_view(clf)
    t0 = time.perf_counter()
    au = core.audit(view, runner.Xc, runner.Yc)
    t_latent = time.perf_counter() - t0
    ver = verify_input_space(view, runner.Xc, runner.Yc, seed=0, **runner.cfg["verify"])
    au.inp.input_bounds = ver.full_bounds(view.num_classes)
    onset = neuron_scores(view, runner.Xc, runner.Yc, seed=0, **ONSET_KW)
    tg = neuron_scores(view, runner.Xc, runner.Yc, seed=0, targeted=True, **TARGETED_KW)
    inp = au.inp
    return {
        "spec": spec, "acc": acc, "asr": [e.get("asr") for e in ev],
        "latent": {"agree-mad": RULES["agree-mad"](inp).tolist(), "seconds": t_latent},
        "input": {"bounds": inp.input_bounds.tolist(), "input-gap": RULES["input-gap"](inp).tolist(),
                  "seconds": ver.seconds},
        "default": RULES["latent-or-input"](inp).tolist(),
        "onset": {"scores": onset.scores.tolist(), "acc_clean": onset.acc_clean, "eps": onset.eps.tolist(),
                  "acc": onset.untargeted_acc.tolist(), "counts": onset.counts.tolist(),
                  "layers": onset.layers, "seconds": onset.seconds},
        "neuron": {"scores": bound_scores(tg).tolist(), "bounds": tg.bounds.tolist(), "eps": tg.eps.tolist(),
                   "flip_curve": tg.flip_curve.tolist(), "layers": tg.layers, "seconds": tg.seconds},
    }


# -- statistics from a stored entry ----------------------------------------------------------------
def _onset(drop: float) -> Callable[[dict[str, Any]], np.ndarray]:
    def fn(m: dict[str, Any]) -> np.ndarray:
        from hub_backdoor.detection.neuron import onset_shares

        o = m["onset"]
        return onset_shares(o["acc_clean"], np.asarray(o["acc"]), np.asarray(o["counts"]), drop)

    return fn


def _half(m: dict[str, Any]) -> np.ndarray:
    """The issue's untargeted probe, normalised per model: at the first noise level where the
    accuracy falls below half its clean value, the share of the misclassified images on k."""
    o = m["onset"]
    acc, counts = np.asarray(o["acc"]), np.asarray(o["counts"])
    below = np.flatnonzero(acc < 0.5 * o["acc_clean"])
    c = counts[:, int(below[0]) if len(below) else -1]
    return c / max(1.0, c.sum())


#: name -> fn(entry) -> scores (C,). The two neuron statistics were fixed before the zoo was
#: scored (the onset share after the digits model of tests/test_neuron.py, the targeted bound
#: before anything); the drop variants and the half-accuracy probe are exploratory.
STATS: dict[str, Callable[[dict[str, Any]], np.ndarray]] = {
    "neuron onset share (drop 20 %)": _onset(0.2),
    "neuron targeted bound log-ratio": lambda m: np.asarray(m["neuron"]["scores"]),
    "neuron onset share (drop 10 %)": _onset(0.1),
    "neuron onset share (drop 30 %)": _onset(0.3),
    "untargeted probe (share at half accuracy)": _half,
    "agree-mad (latent)": lambda m: np.asarray(m["latent"]["agree-mad"]),
    "input-gap (input)": lambda m: np.asarray(m["input"]["input-gap"]),
    "latent-or-input (default, library thr)": lambda m: np.asarray(m["default"]),
}
PRIMARY = "neuron onset share (drop 20 %)"
TARGETED = "neuron targeted bound log-ratio"
DEFAULT_PARTS = ("agree-mad (latent)", "input-gap (input)")
#: fused rules: the larger of the parts' scores, each in units of the highest clean score of the
#: calibration models (set out of sample like every threshold here)
FUSED: dict[str, tuple[str, ...]] = {
    "latent-or-input (units set out of sample)": DEFAULT_PARTS,
    "latent-or-input-or-onset": (*DEFAULT_PARTS, PRIMARY),
    "latent-or-input-or-targeted": (*DEFAULT_PARTS, TARGETED),
    "latent-or-input-or-onset-or-targeted": (*DEFAULT_PARTS, PRIMARY, TARGETED),
}


def working(m: dict[str, Any]) -> list[int]:
    t = m["spec"].get("targets") or []
    return [k for k, a in zip(t, m["asr"]) if a is not None and a >= WORKING_ASR]


def _attack(m: dict[str, Any]) -> str:
    return str(m["spec"]["attack"] or "clean")


def _scores(ms: list[dict[str, Any]], name: str) -> dict[str, np.ndarray]:
    return {m["spec"]["id"]: np.asarray(STATS[name](m), np.float64) for m in ms}


def _fused(ms: list[dict[str, Any]], parts: tuple[str, ...], cal: list[dict[str, Any]]
           ) -> dict[str, np.ndarray]:
    per = {p: _scores(ms, p) for p in parts}
    units = []
    for p in parts:
        u = max(float(np.max(per[p][c["spec"]["id"]])) for c in cal)
        units.append(u if u > 0 else 1.0)
    return {m["spec"]["id"]: np.max([per[p][m["spec"]["id"]] / u for p, u in zip(parts, units)], axis=0)
            for m in ms}


def _hit(s: np.ndarray, target: int, thr: float) -> bool:
    k = int(np.argmax(s))
    return k == target and float(s[k]) > thr


def evaluate(ms: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """One statistic (or fused rule): TP/FP at 0 FP in-sample, LOFO, LOAO; per attack, per family."""
    single = [m for m in ms if len(m["spec"].get("targets") or []) == 1 and working(m)]
    clean = [m for m in ms if not m["spec"].get("targets")]
    fams = sorted({m["spec"]["arch"] for m in ms})
    attacks = sorted({_attack(m) for m in single})

    def scored(cal: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        return _fused(ms, FUSED[name], cal) if name in FUSED else _scores(ms, name)

    def thr_of(sc: dict[str, np.ndarray], cal: list[dict[str, Any]]) -> float:
        if name in FUSED:
            return 1.0
        return max(float(np.max(sc[c["spec"]["id"]])) for c in cal)

    def count(sc: dict[str, np.ndarray], thr: float, pos: list[dict[str, Any]], neg: list[dict[str, Any]]
              ) -> tuple[int, int]:
        tp = sum(_hit(sc[m["spec"]["id"]], m["spec"]["targets"][0], thr) for m in pos)
        fp = sum(float(np.max(sc[m["spec"]["id"]])) > thr for m in neg)
        return tp, fp

    sc_all = scored(clean)
    thr0 = thr_of(sc_all, clean)
    tp0, _ = count(sc_all, thr0, single, [])
    per_attack = {a: count(sc_all, thr0, [m for m in single if _attack(m) == a], [])[0] for a in attacks}
    lofo: dict[str, Any] = {}
    for f in fams:
        cal = [c for c in clean if c["spec"]["arch"] != f]
        sc = scored(cal)
        thr = thr_of(sc, cal)
        pos = [m for m in single if m["spec"]["arch"] == f]
        neg = [c for c in clean if c["spec"]["arch"] == f]
        tp, fp = count(sc, thr, pos, neg)
        lofo[f] = {"tp": tp, "n": len(pos), "fp": fp, "n_clean": len(neg), "thr": thr}
    top = sum(int(np.argmax(sc_all[m["spec"]["id"]])) == m["spec"]["targets"][0] for m in single)
    return {
        "n": len(single), "n_clean": len(clean), "thr_0fp": thr0, "tp_0fp": tp0, "top_is_target": top,
        "per_attack_0fp": per_attack,
        "n_per_attack": {a: sum(_attack(m) == a for m in single) for a in attacks},
        "per_family_0fp": {f: count(sc_all, thr0, [m for m in single if m["spec"]["arch"] == f], [])[0]
                           for f in fams},
        "n_per_family": {f: sum(m["spec"]["arch"] == f for m in single) for f in fams},
        "lofo": lofo, "lofo_tp": sum(v["tp"] for v in lofo.values()),
        "lofo_fp": sum(v["fp"] for v in lofo.values()),
        # a fixed rule's threshold sees no backdoored model: LOAO = in-sample 0 FP
        "loao_tp": tp0, "loao_fp": 0,
        "library_thr": dict(zip(("tp", "fp"), count(sc_all, 1.0, single, clean)))
        if name.startswith("latent-or-input (default") else None,
    }


def selected(ms: list[dict[str, Any]], candidates: list[str]) -> dict[str, Any]:
    """A learned choice, validated twice: the candidate with the most TPs at 0 FP on the rest (the
    other attacks / the other families; threshold from the rest's clean models) is applied to the
    held-out part."""
    single = [m for m in ms if len(m["spec"].get("targets") or []) == 1 and working(m)]
    clean = [m for m in ms if not m["spec"].get("targets")]
    out: dict[str, Any] = {"candidates": candidates, "loao": {}, "lofo": {}}

    def best(pos: list[dict[str, Any]], cal: list[dict[str, Any]]) -> str:
        def tp(name: str) -> int:
            sc = _fused(ms, FUSED[name], cal) if name in FUSED else _scores(ms, name)
            thr = 1.0 if name in FUSED else max(float(np.max(sc[c["spec"]["id"]])) for c in cal)
            return sum(_hit(sc[m["spec"]["id"]], m["spec"]["targets"][0], thr) for m in pos)

        return max(candidates, key=lambda n: (tp(n), -candidates.index(n)))

    for a in sorted({_attack(m) for m in single}):
        choice = best([m for m in single if _attack(m) != a], clean)
        held = [m for m in single if _attack(m) == a]
        r = evaluate([*held, *clean], choice)
        out["loao"][a] = {"choice": choice, "tp": r["tp_0fp"], "n": len(held)}
    for f in sorted({m["spec"]["arch"] for m in ms}):
        cal = [c for c in clean if c["spec"]["arch"] != f]
        choice = best([m for m in single if m["spec"]["arch"] != f], cal)
        out["lofo"][f] = {"choice": choice, **evaluate(ms, choice)["lofo"][f]}
    out["loao_tp"] = sum(v["tp"] for v in out["loao"].values())
    out["lofo_tp"] = sum(v["tp"] for v in out["lofo"].values())
    out["lofo_fp"] = sum(v["fp"] for v in out["lofo"].values())
    out["n"] = len(single)
    return out


# -- report -------------------------------------------------------------------------------------
def _f(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.2f}"


def report(models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ms = [models[i] for i in ORDER if i in models] + [m for i, m in models.items() if i not in ORDER]
    rows = {name: evaluate(ms, name) for name in [*STATS, *FUSED]}
    sel = selected(ms, [PRIMARY, TARGETED, *FUSED])
    cost = {k: float(np.mean([m[k]["seconds"] for m in ms])) for k in ("latent", "input", "onset", "neuron")}
    planted = [(m["spec"]["id"], t) for m in ms for t in (m["spec"].get("targets") or [])]
    return {"rows": rows, "selected": sel, "seconds_per_model": cost, "n_models": len(ms),
            "n_planted": len(planted), "n_working": sum(len(working(m)) for m in ms),
            "families": sorted({m["spec"]["arch"] for m in ms})}


def markdown(rep: dict[str, Any], models: dict[str, dict[str, Any]]) -> str:
    rows, fams = rep["rows"], rep["families"]
    r0 = next(iter(rows.values()))
    n, nc = r0["n"], r0["n_clean"]
    attacks = list(r0["n_per_attack"])
    cost = rep["seconds_per_model"]
    L = ["# Neuron-space evidence on the standard zoo (issue 32, item 1): a measured study", "",
         f"**Scope: {rep['n_models']} retrained models of the standard zoo** ({n} working single-target "
         f"backdoors, {nc} clean; {rep['n_working']} of {rep['n_planted']} planted triggers reach ASR "
         ">= 50 % on the retrained models), not the committed 100: the zoo's weights are not committed "
         "and a CPU retrains about one model a minute, so the models were trained again in the "
         "balanced order of `benchmarks/neuron_order.py` (every family in each round) until the time "
         "ran out. The default's parts are recomputed on these same models with the suite's settings, "
         "so every row below is scored on one set of models. Two-target models are left out.", "",
         "Protocol: TP = the statistic's top class is the target and its score exceeds the threshold; FP = "
         "a clean model whose top score exceeds it. *0 FP in-sample*: threshold just above the highest clean "
         "score of these models. *LOFO*: per family, threshold just above the highest clean score of the "
         "other families, applied to the held-out family (its clean models count as FPs). *LOAO*: a "
         "fixed rule's threshold sees only clean models, so it equals the in-sample 0-FP figure; only the "
         "*selected* rule (bottom) is a real LOAO. Fused rules: the larger of the parts' scores, each "
         "divided by the highest clean score of the calibration models (those that set the threshold).",
         "",
         f"Cost per model (mean, 1 CPU thread on a shared 2-core machine): latent QP {cost['latent']:.1f} s, "
         f"input search {cost['input']:.1f} s, neuron onset probe {cost['onset']:.1f} s (library defaults), "
         f"targeted neuron search {cost['neuron']:.1f} s (settings: {TARGETED_KW}).", "",
         "| statistic | TP at 0 FP in-sample (thr) | **LOFO TP** | LOFO FP | LOAO TP | top = target | "
         + " | ".join(f"{a} (0 FP)" for a in attacks) + " |",
         "|---|---|---|---|---|---|" + "---|" * len(attacks)]
    for name, r in rows.items():
        mark = " **(fixed beforehand)**" if name in (PRIMARY, TARGETED) else ""
        L.append(f"| {name}{mark} | {r['tp_0fp']}/{n} ({_f(r['thr_0fp'])}) | **{r['lofo_tp']}/{n}** | "
                 f"{r['lofo_fp']}/{nc} | {r['loao_tp']}/{n} | {r['top_is_target']}/{n} | "
                 + " | ".join(f"{r['per_attack_0fp'][a]}/{r['n_per_attack'][a]}" for a in attacks) + " |")
    d = rows["latent-or-input (default, library thr)"]["library_thr"]
    L += ["", "The default at its library threshold (1.0, set on the committed zoo's clean models): "
          f"{d['tp']}/{n} found, {d['fp']}/{nc} clean models flagged.", "",
          "LOFO per held-out family (TP / working, FP / clean, threshold):", "",
          "| statistic | " + " | ".join(fams) + " |", "|---" * (len(fams) + 1) + "|"]
    for name, r in rows.items():
        L.append(f"| {name} | " + " | ".join(
            f"{r['lofo'][f]['tp']}/{r['lofo'][f]['n']}, {r['lofo'][f]['fp']}/{r['lofo'][f]['n_clean']} "
            f"({_f(r['lofo'][f]['thr'])})" for f in fams) + " |")
    sel = rep["selected"]
    L += ["", "**Selected rule, validated out of sample**: among "
          + ", ".join(f"`{c}`" for c in sel["candidates"])
          + ", the one with the most TPs at 0 FP on the rest is applied to the held-out part.", "",
          f"- LOAO: **{sel['loao_tp']}/{sel['n']}** ("
          + "; ".join(f"{a}: {v['tp']}/{v['n']} with `{v['choice']}`" for a, v in sel["loao"].items()) + ")",
          f"- LOFO: **{sel['lofo_tp']}/{sel['n']}**, {sel['lofo_fp']}/{nc} FP ("
          + "; ".join(f"{f}: {v['tp']}/{v['n']}, {v['fp']} FP with `{v['choice']}`"
                      for f, v in sel["lofo"].items())
          + ")", "",
          "Per model (retrained): ACC, ASR, the onset share's top class (score) and the target's score; "
          "the targeted bound's and the default's top class and score:", "",
          "| model | targets | ACC | ASR | onset top (score) | onset score of target | "
          "targeted top (score) | default top (score) |",
          "|---|---|---|---|---|---|---|---|"]
    for mid in ORDER:
        m = models.get(mid)
        if m is None:
            continue
        s, dft, tg = np.asarray(STATS[PRIMARY](m)), np.asarray(m["default"]), np.asarray(STATS[TARGETED](m))
        t = m["spec"].get("targets") or []
        L.append(f"| {mid} | {t or '–'} | {100 * m['acc']:.1f} | "
                 + (", ".join(f"{100 * a:.0f}" for a in m["asr"]) or "–")
                 + f" | {int(np.argmax(s))} ({s.max():.2f}) | "
                 + (", ".join(_f(float(s[k])) for k in t) or "–")
                 + f" | {int(np.argmax(tg))} ({tg.max():.2f}) | {int(np.argmax(dft))} ({dft.max():.2f}) |")
    L += ["", NOTES]
    return "\n".join(L) + "\n"


NOTES = """## Findings (23 models: 13 working single-target backdoors, 10 clean; see the scope above)

- **The goal is missed.** No neuron statistic alone reaches a useful TPR at 0 FP: the onset share
  (fixed beforehand) finds 0/13 in-sample and out of sample, and puts the target first in only
  3/13; the targeted bound finds 2/13 in-sample, 3/13 LOFO.
- **The targeted bound ranks well but does not calibrate across families.** Its top class is the
  target in 9/13 (WaNet 4/4 among them, the default's weak spot), but the clean PreAct-ResNet18s
  score up to 0.75 while the other families' backdoors score 0.2-0.5, so a threshold from the
  other families' clean models misses them (LOFO 0/3 on each non-PreAct family).
- **Fused with the default** (max of parts in units of the highest clean score of the
  calibration models): LOFO 9/13 for latent-or-input-or-targeted against 8/13 for the default's
  parts alone, with the same 2/10 false alarms; in-sample and LOAO unchanged (8/13). The onset
  share only adds false alarms (4/10). One extra hit on 13 is not evidence of a gain.
- **Cost** (1 thread on a shared 2-core CPU): onset probe ~18 s, targeted search ~14 s per model,
  beside ~12 s for the input search and ~1 s for the latent QP.

## Notes

- **How the statistics were fixed.** The targeted bound log-ratio (mean over flip shares 50-90 %)
  was written first. On the tiny digits BadNets model of `tests/test_neuron.py` it failed: every
  class was reached at about the same noise (bounds 0.034-0.056, target 3 fifth), because noise on
  every layer sends the images anywhere at one scale. The untargeted probe's curve on the same
  model showed the signal at the *onset*: while accuracy was still 85-90 %, the few errors went
  to the target (share 0.06-0.11 against <= 0.06 for any other class), and only at larger noise
  did a sink class (9) take everything, in the clean twin too. So the onset share (drop 20 %) was
  fixed from that one model, before any zoo model was scored with it; the 10 % / 30 % variants
  and the half-accuracy probe are looked at on the zoo (exploratory, in-sample choices).
- **No cached weights.** `results/standard/*.npz` hold statistics, not weights. Retraining on this
  machine does not reproduce the committed models (max logit difference 3.6 on the first one), so
  the default's parts are recomputed here and the committed standard.json scores are not reused.
- **Left:** the rest of the zoo (the order file's tier 2: 5 % rates, WaNet 20 %, clean seeds 4-11,
  two-target models); a GPU run (`--train` on a device) would take minutes; wiring the stage into
  `audit()` as a named option with its seconds in the evidence; BAN's feature-mask refinement.
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", action="store_true", help="train models whose weights are not cached")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--limit", type=int, default=None, help="at most this many new models")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--follow", type=float, default=0.0,
                    help="keep polling this many seconds for models another process trains")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    js = args.out / "neuron.json"
    store: dict[str, Any] = json.loads(js.read_text()) if js.exists() else {}
    models: dict[str, Any] = store.get("models", {})
    if not args.report_only:
        from .run import SUITES, Runner, model_specs

        runner = Runner("standard", torch.device("cpu"), args.out, log=False)
        by_id = {s["id"]: s for s in model_specs(SUITES["standard"])}
        new, t_end = 0, time.time() + args.follow
        while True:
            for mid in ORDER:
                if mid in models or (args.limit is not None and new >= args.limit):
                    continue
                m = measure(runner, by_id[mid], args.train)
                if m is None:
                    continue
                models[mid] = m
                new += 1
                atomic_write_text(js, json.dumps({"models": models}, default=float) + "\n")
                print(f"{mid}: targets {m['spec']['targets']}, onset {np.round(m['onset']['scores'], 2)}, "
                      f"targeted {np.round(m['neuron']['scores'], 2)}, "
                      f"{m['onset']['seconds']:.1f} + {m['neuron']['seconds']:.1f} s", flush=True)
            if time.time() > t_end or len(models) == len(ORDER):
                break
            time.sleep(20)
    if not models:
        raise SystemExit("no model measured yet")
    rep = report(models)
    atomic_write_text(js, json.dumps({"report": rep, "targeted_kw": TARGETED_KW, "models": models},
                                     default=float) + "\n")
    (args.out / "neuron.md").write_text(markdown(rep, models))
    print(markdown(rep, models))


if __name__ == "__main__":
    main()
