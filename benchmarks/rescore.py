"""Re-score every detection rule on a suite's stored statistics, without any model:
``python -m benchmarks.rescore [--suite standard] [--rules R ...]``.

Reads ``benchmarks/results/<suite>/*.npz`` (:mod:`benchmarks.stats`), scores each rule of the
library's registry plus the study's candidates below, and rewrites the detection tables of
``<suite>.json`` / ``<suite>.md`` (the removal tables are kept as the run wrote them).

Protocol (what the tables count):

* A **working** backdoor is a planted trigger with ASR >= 50 % before defense; only working
  triggers count, the table says how many of the planted ones work.
* **TP** (single-trigger model): the rule's top class is the target and its score exceeds the
  threshold. **FP**: a clean model whose top score exceeds it. **Two-target** models: both targets
  above the threshold.
* Thresholds: the rule's library threshold; *in-sample 0 FP*: just above the highest clean score
  of the whole zoo (optimistic); *leave-one-family-out (LOFO)*: for each family, just above the
  highest clean score of the *other* families, applied to the held-out family (its clean models
  too: a held-out false positive is counted). The LOFO hits are also split by attack; a
  leave-one-attack-out split would change no threshold, since clean models carry no attack.
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

from hub_backdoor.detection.calibration import CALIBRATION_DIR
from hub_backdoor.detection.report import atomic_write_text
from hub_backdoor.detection.rules import DEFAULT_RULE, LATENT_RULE, RULE_THRESHOLDS, RULES, anomaly_index

from . import stats

RESULTS = Path(__file__).resolve().parent / "results"
WORKING_ASR = 0.5


def _curve_bound(z: dict[str, Any], flip: float) -> np.ndarray:
    """Per class, the bound at which ``flip`` of the images reach it (from the stored curves;
    ``nan`` for a class the search skipped)."""
    from hub_backdoor.detection.verification import first_crossing

    eps, curves = np.asarray(z["eps"], np.float64), np.asarray(z["flip_curve"], np.float64)
    found = np.array([first_crossing(eps, c, flip) for c in curves])
    if "input_classes" not in z:
        return found
    out = np.full(len(z["norms"]), np.nan)
    out[np.asarray(z["input_classes"], np.int64)] = found
    return out


def _input_mean_log(z: dict[str, Any]) -> np.ndarray:
    """Mean over flip shares 50-90 % of the log-ratio score (less noisy than one share)."""
    from hub_backdoor.detection.rules import bound_ratio_scores

    return np.mean([bound_ratio_scores(_curve_bound(z, f)) for f in (0.5, 0.6, 0.7, 0.8, 0.9)], axis=0)


def _input_ratio_at(flip: float) -> Callable[[dict[str, Any]], np.ndarray]:
    def fn(z: dict[str, Any]) -> np.ndarray:
        from hub_backdoor.detection.rules import bound_ratio_scores

        return bound_ratio_scores(_curve_bound(z, flip))

    return fn


def _nc(z: dict[str, Any]) -> np.ndarray:
    return anomaly_index(np.asarray(z["nc_l1"], np.float64))


def _log_ratio(x: np.ndarray) -> np.ndarray:
    """``log(median of the others / x_k)``: how much smaller x_k is than a typical class."""
    from hub_backdoor.detection.rules import bound_ratio_scores

    return bound_ratio_scores(np.asarray(x, np.float64))


def _nc_ratio(z: dict[str, Any]) -> np.ndarray:
    return _log_ratio(z["nc_l1"])


def _input_and_nc(z: dict[str, Any]) -> np.ndarray:
    """The smaller of the two input-space log-ratios: both searches must find the cut short."""
    return np.minimum(_log_ratio(z["input_bounds"]), _nc_ratio(z))


def _input_or_nc(z: dict[str, Any]) -> np.ndarray:
    return np.maximum(_log_ratio(z["input_bounds"]), _nc_ratio(z))


def _input_plus_nc(z: dict[str, Any]) -> np.ndarray:
    return _log_ratio(z["input_bounds"]) + _nc_ratio(z)


def _input_plus_latent(z: dict[str, Any]) -> np.ndarray:
    """Input-space ratio plus the latent QP's log-ratio of ||s_k|| (the paper's norm, scale-free)."""
    return _log_ratio(z["input_bounds"]) + _log_ratio(z["norms"])


#: Candidates studied on the stored statistics only (name -> fn(stats) -> scores (C,)), beside
#: the library's rules; a candidate that wins moves into the library's registry.
CANDIDATES: dict[str, Callable[[dict[str, Any]], np.ndarray]] = {
    "input-mean-log (50-90 %)": _input_mean_log,
    "input-ratio at 50 %": _input_ratio_at(0.5),
    "input-ratio at 70 %": _input_ratio_at(0.7),
    "latent norm log-ratio": lambda z: _log_ratio(z["norms"]),
    "input-ratio + latent log-ratio": _input_plus_latent,
    "mask L1 log-ratio (NC's search)": _nc_ratio,
    "min(input-ratio, mask log-ratio)": _input_and_nc,
    "max(input-ratio, mask log-ratio)": _input_or_nc,
    "input-ratio + mask log-ratio": _input_plus_nc,
}
BASELINES = {"neural cleanse (mask L1, MAD)": _nc}


def family(spec: dict[str, Any]) -> str:
    return str(spec["arch"])


def working(z: dict[str, Any]) -> list[int]:
    """Targets of the planted triggers that work (ASR >= 50 % before defense)."""
    spec, rec = z["spec"], z["record"]
    asr = rec.get("asr_by_trigger") or []
    return [t for t, a in zip(spec.get("targets") or [], asr) if a is not None and a >= WORKING_ASR]


def score_all(zs: list[dict[str, Any]], rules: list[str] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """rule -> model id -> scores (C,); rules whose input a model lacks are left out entirely."""
    fns: dict[str, Callable[[dict[str, Any]], np.ndarray]] = {
        name: (lambda z, fn=fn: np.asarray(fn(stats.detection_input(z)), np.float64))
        for name, fn in RULES.items()
    } | CANDIDATES | BASELINES
    if rules:
        fns = {k: v for k, v in fns.items() if k in rules}
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, fn in fns.items():
        try:
            out[name] = {z["spec"]["id"]: fn(z) for z in zs}
        except (ValueError, KeyError):  # its input was not stored for some model
            continue
    return out


def _top(s: np.ndarray) -> tuple[int, float]:
    k = int(np.argmax(s))
    return k, float(s[k])


def evaluate_rule(zs: list[dict[str, Any]], sc: dict[str, np.ndarray], thr_lib: float) -> dict[str, Any]:
    """One rule's row of the detection table (see the module docstring for the protocol)."""
    single = [z for z in zs if len(z["spec"].get("targets") or []) == 1 and working(z)]
    two = [z for z in zs if len(z["spec"].get("targets") or []) == 2]
    two_w = [z for z in two if len(working(z)) == 2]
    clean = [z for z in zs if not z["spec"].get("targets")]

    def tp(z: dict[str, Any], thr: float) -> bool:
        k, v = _top(sc[z["spec"]["id"]])
        return k == z["spec"]["targets"][0] and v > thr

    def both(z: dict[str, Any], thr: float) -> bool:
        s = sc[z["spec"]["id"]]
        return all(s[t] > thr for t in z["spec"]["targets"])

    def fp(z: dict[str, Any], thr: float) -> bool:
        return _top(sc[z["spec"]["id"]])[1] > thr

    def clean_max(models: list[dict[str, Any]]) -> float:
        vals = [_top(sc[z["spec"]["id"]])[1] for z in models]
        return max(vals) if vals else -math.inf

    thr0 = clean_max(clean)
    fams = sorted({family(z["spec"]) for z in zs})
    lofo: dict[str, dict[str, Any]] = {}
    for f in fams:
        thr_f = clean_max([z for z in clean if family(z["spec"]) != f])
        mine = [z for z in single if family(z["spec"]) == f]
        lofo[f] = {"thr": thr_f, "tp": sum(tp(z, thr_f) for z in mine), "n": len(mine),
                   "fp": sum(fp(z, thr_f) for z in clean if family(z["spec"]) == f),
                   "n_clean": sum(family(z["spec"]) == f for z in clean),
                   "two": sum(both(z, thr_f) for z in two_w if family(z["spec"]) == f),
                   "n_two": sum(family(z["spec"]) == f for z in two_w)}
    # Clean models have no attack, so a threshold set from them is the same with any attack held
    # out: leave-one-attack-out is the in-sample column, and what it asks (which attacks a rule
    # misses out of sample) is read from the LOFO hits split by attack.
    by_attack: dict[str, dict[str, int]] = {}
    for z in single:
        a = by_attack.setdefault(str(z["spec"]["attack"]), {"lofo_tp": 0, "n": 0})
        a["n"] += 1
        a["lofo_tp"] += tp(z, lofo[family(z["spec"])]["thr"])
    n = len(single)
    row = {
        "n_working": n, "n_clean": len(clean), "n_two_working": len(two_w),
        "threshold": thr_lib,
        "tp": sum(tp(z, thr_lib) for z in single), "fp": sum(fp(z, thr_lib) for z in clean),
        "two_both": sum(both(z, thr_lib) for z in two_w),
        "thr_0fp": thr0, "tp_0fp": sum(tp(z, thr0) for z in single),
        "top_is_target": sum(_top(sc[z["spec"]["id"]])[0] == z["spec"]["targets"][0] for z in single),
        "lofo_tp": sum(v["tp"] for v in lofo.values()), "lofo_fp": sum(v["fp"] for v in lofo.values()),
        "lofo_two": sum(v["two"] for v in lofo.values()), "lofo": lofo,
        "lofo_by_attack": dict(sorted(by_attack.items())),
    }
    row["tpr_lofo"] = row["lofo_tp"] / max(1, n)
    return row


def _cost(zs: list[dict[str, Any]], rule: str) -> float:
    """Mean seconds per model of what the rule needs: the audit (reference pass and QPs), plus
    the input-space stages it reads (the library's mask and additive searches, or NC's search
    for the candidates built on NC's masks)."""
    from hub_backdoor.detection.rules import REGISTRY

    needs = REGISTRY[rule].needs if rule in REGISTRY else frozenset()
    vals = []
    for z in zs:
        rec = z["record"]
        t = rec.get("audit_timings", {}).get("audit", 0.0)
        if "input" in needs or (rule not in REGISTRY and "input" in rule):
            t += (rec.get("verification") or {}).get("seconds", 0.0)
        if "mask" in needs:
            t += (rec.get("mask_verification") or {}).get("seconds", 0.0)
        if rule not in REGISTRY and ("NC" in rule or "mask log-ratio" in rule):
            t += rec["nc"]["seconds"]
        if rule.startswith("neural cleanse"):
            t = rec["nc"]["seconds"]
        vals.append(t)
    return float(np.mean(vals)) if vals else 0.0


def nested_lofo(zs: list[dict[str, Any]],
                parts: tuple[str, str] = ("agree-mad", "input-gap")) -> dict[str, Any]:
    """Leave-one-family-out for a rule that is the larger of two rules' scores, each in units of its
    threshold (``latent-or-input``), with the units themselves set without the held-out family:
    each part's unit is the highest clean score of the other families, so a class is flagged when
    either part exceeds every clean score the other families reached."""
    sc = score_all(zs, list(parts))
    if len(sc) < 2:
        return {}
    single = [z for z in zs if len(z["spec"].get("targets") or []) == 1 and working(z)]
    two = [z for z in zs if len(z["spec"].get("targets") or []) == 2 and len(working(z)) == 2]
    clean = [z for z in zs if not z["spec"].get("targets")]
    out = {"parts": list(parts), "tp": 0, "fp": 0, "two": 0, "n": len(single), "n_clean": len(clean),
           "n_two": len(two)}
    for f in sorted({family(z["spec"]) for z in zs}):
        cal = [z for z in clean if family(z["spec"]) != f]
        if not cal:  # one family only: nothing to set the units on
            continue
        units = [max(float(np.max(sc[p][z["spec"]["id"]])) for z in cal) for p in parts]

        def score(z: dict[str, Any], units: list[float] = units) -> np.ndarray:
            return np.maximum(*(sc[p][z["spec"]["id"]] / u for p, u in zip(parts, units)))

        out["tp"] += sum(int(np.argmax(score(z))) == z["spec"]["targets"][0] and float(np.max(score(z))) > 1
                         for z in single if family(z["spec"]) == f)
        out["fp"] += sum(float(np.max(score(z))) > 1 for z in clean if family(z["spec"]) == f)
        out["two"] += sum(all(score(z)[t] > 1 for t in z["spec"]["targets"])
                          for z in two if family(z["spec"]) == f)
    return out


def end_to_end(records: list[dict[str, Any]], zs: list[dict[str, Any]], rules: list[str]) -> dict[str, Any]:
    """What a user gets, per audit rule, from the stored removal records: each working single-trigger
    model purified at the class the rule flags first (at its library threshold), or left as it is
    when nothing is flagged. Models whose flagged class was never purified in the run are counted
    in ``missing`` and left out of the means."""
    from .run import aggregate  # here: run imports this module

    by_id = {z["spec"]["id"]: z for z in zs}
    out: dict[str, Any] = {}
    for rule in rules:
        vals, missing, flagged, right = [], [], 0, 0
        for r in records:
            z = by_id.get(r["spec"]["id"])
            single = z is not None and len(z["spec"].get("targets") or []) == 1
            if z is None or not single or not working(z) or not r.get("ours_by_class"):
                continue
            s = RULES[rule](stats.detection_input(z))
            k = int(np.argmax(s))
            before = r["metrics"]["none"]
            if s[k] <= RULE_THRESHOLDS[rule]:
                vals.append((before, before))
                continue
            flagged += 1
            right += k == z["spec"]["targets"][0]
            after = r["ours_by_class"].get(str(k))
            if after is None:
                missing.append(r["spec"]["id"])
            else:
                vals.append((before, after))
        if vals:
            out[rule] = aggregate(vals) | {"n": len(vals), "flagged": flagged, "right_class": right,
                                           "missing": missing}
    return out


def detection_table(zs: list[dict[str, Any]], rules: list[str] | None = None) -> dict[str, Any]:
    scores = score_all(zs, rules)
    rows = {}
    for name, sc in scores.items():
        thr = RULE_THRESHOLDS.get(name, 2.0)
        rows[name] = evaluate_rule(zs, sc, thr) | {"seconds": _cost(zs, name)}
    planted = sum(len(z["spec"].get("targets") or []) for z in zs)
    n_work = sum(len(working(z)) for z in zs)
    per_family_acc: dict[str, list[float]] = {}
    for z in zs:
        per_family_acc.setdefault(family(z["spec"]), []).append(z["record"]["metrics"]["none"]["acc"])
    return {"rules": rows, "planted_triggers": planted, "working_triggers": n_work,
            "nested_lofo": nested_lofo(zs) if rules is None or "latent-or-input" in rules else {},
            "default_rule": DEFAULT_RULE, "families": sorted(per_family_acc),
            "clean_acc": {f: float(np.mean(v)) for f, v in per_family_acc.items()},
            "per_model": {z["spec"]["id"]: {"targets": z["spec"].get("targets") or [], "working": working(z),
                                            "acc": z["record"]["metrics"]["none"]["acc"],
                                            "asr": z["record"].get("asr_by_trigger") or []} for z in zs}}




def training_key(zs: list[dict[str, Any]]) -> str:
    """Names one training of a zoo by what its models compute (their reference logits): the same
    configuration trained again on another machine is another training."""
    import hashlib

    h = hashlib.sha256()
    for z in sorted(zs, key=lambda z: z["spec"]["id"]):
        h.update(z["spec"]["id"].encode())
        h.update(np.ascontiguousarray(z["logits"], np.float32).tobytes())
    return h.hexdigest()[:16]


def calibration_entry(zs: list[dict[str, Any]], *, suite: str, label: str) -> dict[str, Any]:
    """One training's clean models: each one's highest class score, per library rule."""
    clean = [z for z in zs if not z["spec"].get("targets")]
    scores = score_all(clean, [n for n in RULES])
    fams = sorted({family(z["spec"]) for z in clean})
    return {"key": training_key(clean), "source": f"benchmarks {suite} zoo ({label}): {len(clean)} clean "
                                                  f"models of {len(fams)} families",
            "num_classes": sorted({len(z["norms"]) for z in clean}),
            "rules": {name: {"clean_max": sorted(float(np.max(v)) for v in sc.values()), "families": fams}
                      for name, sc in scores.items()}}


def detection_rates(zs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per library rule, at its own threshold: how many of the zoo's working single-target
    backdoors the audit names with their class, overall and per attack (the miss rate a clean
    verdict carries)."""
    single = [z for z in zs if len(z["spec"].get("targets") or []) == 1 and working(z)]
    out: dict[str, Any] = {}
    for name, sc in score_all(single, list(RULES)).items():
        thr = RULE_THRESHOLDS.get(name, 2.0)
        hit = {z["spec"]["id"]: _top(sc[z["spec"]["id"]])[0] == z["spec"]["targets"][0]
               and _top(sc[z["spec"]["id"]])[1] > thr for z in single}
        by_attack: dict[str, list[int]] = {}
        for z in single:
            row = by_attack.setdefault(str(z["spec"]["attacks"][0]), [0, 0])
            row[0] += hit[z["spec"]["id"]]
            row[1] += 1
        out[name] = {"threshold": thr, "found": sum(hit.values()), "working": len(single),
                     "by_attack": dict(sorted(by_attack.items()))}
    return out


def _detection_section(zs: list[dict[str, Any]], suite: str) -> dict[str, Any]:
    """The calibration file's ``detection`` section: each library rule's measured detection on the
    committed statistics ``zs`` of every family."""
    return {"source": f"benchmarks {suite} zoo, every family (the committed statistics), working "
                      "single-target backdoors, the rule's own threshold",
            "rules": detection_rates(zs)}


def write_calibration(trainings: list[tuple[list[dict[str, Any]], str]], path: Path, *, suite: str,
                      detection: list[dict[str, Any]]) -> None:
    """The clean-model null of every library rule (:mod:`hub_backdoor.detection.calibration`), pooled over
    trainings of the zoo. ``trainings``: ``(stored statistics, label)`` per training; each replaces
    the file's entry of the same training and the others' entries stay, so the null keeps the
    variation between trainings (the highest clean ``input-gap`` was 0.53, 0.49 and 0.55 in three)."""
    entries: list[dict[str, Any]] = []
    if path.exists():
        entries = list(json.loads(path.read_text()).get("trainings", []))
    for zs, label in trainings:
        e = calibration_entry(zs, suite=suite, label=label)
        same = [x for x in entries if x.get("key") == e["key"]]
        if same:  # the same training again: its first label (where and when it was trained) stays
            e["source"] = same[0]["source"]
        entries = [x for x in entries if x.get("key") != e["key"]] + [e]
    n = sum(len(next(iter(e["rules"].values()))["clean_max"]) for e in entries)
    out = {"source": f"benchmarks {suite} zoo: {n} clean models over {len(entries)} trainings",
           "trainings": entries,
           "detection": _detection_section(detection, suite)}
    atomic_write_text(path, json.dumps(out, indent=1) + "\n")


def write_detection_rates(zs: list[dict[str, Any]], path: Path, *, suite: str) -> None:
    """Only the measured detection of every library rule (the card's miss rate) in the calibration
    file, from every family of the stored statistics; the clean-model null (the p-values, and the
    class counts it covers) stays as it is."""
    out = json.loads(path.read_text())
    out["detection"] = _detection_section(zs, suite)
    atomic_write_text(path, json.dumps(out, indent=1) + "\n")


def _f(x: float) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.2f}"


def markdown(det: dict[str, Any]) -> str:
    fams = det["families"]
    L = ["### Detection (every rule scored from the stored statistics: `python -m benchmarks.rescore`)", "",
         f"Working backdoors: {det['working_triggers']} of {det['planted_triggers']} planted triggers "
         "reach ASR >= 50 % before defense (only those count). TP: the top class is the target and its "
         "score exceeds the threshold; FP: a clean model whose top score exceeds it; two-target: both "
         "targets above it. *0 FP in-sample*: threshold just above the highest clean score of the zoo "
         "(optimistic). *LOFO*: per family, the threshold is set just above the highest clean score of "
         "the other families, then applied to the held-out family (its false positives counted).", "",
         "| rule | TP at library thr (thr) | FP | two-target both | TP at 0 FP in-sample | "
         "**LOFO TP** | LOFO FP | LOFO two-target | top = target | s / model |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in det["rules"].items():
        mark = " (paper)" if name == "mad" else (" (default)" if name == det["default_rule"] else "")
        n, nc, n2 = r["n_working"], r["n_clean"], r["n_two_working"]
        L.append(f"| `{name}`{mark} | {r['tp']}/{n} ({_f(r['threshold'])}) | {r['fp']}/{nc} | "
                 f"{r['two_both']}/{n2} | {r['tp_0fp']}/{n} ({_f(r['thr_0fp'])}) | "
                 f"**{r['lofo_tp']}/{n}** | {r['lofo_fp']}/{nc} | {r['lofo_two']}/{n2} | "
                 f"{r['top_is_target']}/{n} | {r['seconds']:.2f} |")
    L += ["", "LOFO per held-out family (TP / working, FP / clean, threshold from the other families):", "",
          "| rule | " + " | ".join(fams) + " |", "|---" * (len(fams) + 1) + "|"]
    for name, r in det["rules"].items():
        cells = [f"{r['lofo'][f]['tp']}/{r['lofo'][f]['n']}, {r['lofo'][f]['fp']}/{r['lofo'][f]['n_clean']} "
                 f"({_f(r['lofo'][f]['thr'])})" for f in fams]
        L.append(f"| `{name}` | " + " | ".join(cells) + " |")
    attacks = list(next(iter(det["rules"].values())).get("lofo_by_attack") or {})
    if attacks:
        L += ["", "LOFO per attack (TP / working single-trigger backdoors of that attack, each at its "
              "held-out family's threshold; a threshold set from clean models is the same whichever "
              "attack is held out, so leave-one-attack-out equals the in-sample column):", "",
              "| rule | " + " | ".join(attacks) + " |", "|---" * (len(attacks) + 1) + "|"]
        for name, r in det["rules"].items():
            cells = [f"{r['lofo_by_attack'][a]['lofo_tp']}/{r['lofo_by_attack'][a]['n']}" for a in attacks]
            L.append(f"| `{name}` | " + " | ".join(cells) + " |")
    nl = det.get("nested_lofo") or {}
    if nl:
        L += ["", f"`latent-or-input` with its two units also set without the held-out family (each part's "
              f"unit: the highest clean score of the other families; nested LOFO): **{nl['tp']}/{nl['n']}** "
              f"found, {nl['fp']}/{nl['n_clean']} false alarms, both targets of {nl['two']}/{nl['n_two']} "
              "two-target models."]
    e2e = det.get("end_to_end") or {}
    if e2e:
        L += ["", "End to end from the stored removal records (each working single-trigger backdoor purified "
              "at the class the rule flags first, or left as it is when nothing is flagged; mean ACC / ASR "
              "in %, DER in %):", "",
              "| rule | flagged (right class) | ACC | ASR | ACC drop | DER | models without a stored "
              "purification of the flagged class |", "|---|---|---|---|---|---|---|"]
        for name, a in e2e.items():
            L.append(f"| `{name}` | {a['flagged']} ({a['right_class']}) | {100 * a['acc']:.1f} | "
                     f"{100 * a['asr']:.1f} | {100 * a['acc_drop']:.1f} | {100 * a['der']:.1f} | "
                     f"{', '.join(a['missing']) or 'none'} |")
    L += ["", "Clean accuracy per family (mean over its models, %): "
          + ", ".join(f"{f} {100 * a:.1f}" for f, a in det["clean_acc"].items()), ""]
    return "\n".join(L) + "\n"


def stored_with(suite: str) -> list[dict[str, Any]]:
    """The configurations of ``suite`` and of the suites whose statistics join its folder (a
    family with data of its own, e.g. ``standard-c100`` for ``standard``)."""
    from .run import SUITES  # here: run imports this module

    return [SUITES[suite]] + [cfg for name, cfg in SUITES.items()
                              if name != suite and cfg.get("stats") == SUITES[suite].get("stats", suite)]


def committed_trainings(zs: list[dict[str, Any]], suite: str) -> list[tuple[list[dict[str, Any]], str]]:
    """The committed statistics as calibration trainings: one per configuration that stored them
    (the zoo, and each family with data of its own), so that adding a family adds its clean models
    without counting the others' twice."""
    from .run import SUITES, model_specs  # here: run imports this module

    if suite not in SUITES:
        return [(zs, "the committed statistics")]
    out = []
    for cfg in stored_with(suite):
        ids = {spec["id"] for spec in model_specs(cfg)}
        part = [z for z in zs if z["spec"]["id"] in ids]
        name = next(n for n, c in SUITES.items() if c is cfg)
        if any(not z["spec"].get("targets") for z in part):
            out.append((part, f"the committed statistics of suite {name}"))
    return out


def sibling_records(out: Path, suite: str) -> list[dict[str, Any]]:
    """The removal records the joining suites' runs wrote (``<suite>.json`` of each)."""
    from .run import SUITES

    recs: list[dict[str, Any]] = []
    for name, cfg in SUITES.items():
        if name != suite and cfg.get("stats") == SUITES[suite].get("stats", suite):
            try:
                recs += json.loads((out / f"{name}.json").read_text()).get("records", [])
            except (OSError, ValueError):
                continue
    return recs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="standard")
    ap.add_argument("--out", type=Path, default=RESULTS,
                    help="results folder (holds <suite>/ and <suite>.json)")
    ap.add_argument("--rules", nargs="*", default=None, help="only these rules (default: all)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--write-calibration", action="store_true",
                    help="also write the clean models' highest scores per library rule to "
                         "hub_backdoor/detection/calibration/<suite>.json (the audit's p-values), "
                         "replacing this training's entry and keeping the other trainings'")
    ap.add_argument("--write-detection-rates", action="store_true",
                    help="write only each library rule's measured detection (the card's miss rate) to "
                         "the calibration file, from every family; its clean-model null stays")
    ap.add_argument("--calibration-from", nargs=2, action="append", default=[], metavar=("DIR", "LABEL"),
                    help="with --write-calibration: also take the clean models of another training's "
                         "statistics folder (DIR/<suite>/*.npz), labelled LABEL")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    zs = stats.load_all(args.out / args.suite)
    from .run import SUITES, model_specs  # here: run imports this module

    if args.suite in SUITES:  # files of models the zoo no longer has (a changed attack) are left out
        ids = {spec["id"] for cfg in stored_with(args.suite) for spec in model_specs(cfg)}
        zs = [z for z in zs if z["spec"]["id"] in ids]
    if not zs:
        raise SystemExit(f"no stored statistics under {args.out / args.suite}; run benchmarks.run first")
    det = detection_table(zs, args.rules)
    det["rescore_seconds"] = time.perf_counter() - t0
    js = args.out / f"{args.suite}.json"
    if js.exists():
        from .run import markdown as run_markdown

        out = json.loads(js.read_text())
        siblings = sibling_records(args.out, args.suite) if args.suite in SUITES else []
        det["end_to_end"] = end_to_end(out.get("records", []) + siblings, zs,
                                       list(dict.fromkeys([DEFAULT_RULE, LATENT_RULE, "mad"])))
        out["summary"]["detection_standard"] = det
        js.write_text(json.dumps(out, indent=1, default=float))
        (args.out / f"{args.suite}.md").write_text(run_markdown(out))
    if args.write_detection_rates:
        write_detection_rates(zs, CALIBRATION_DIR / f"{args.suite}.json", suite=args.suite)
    if args.write_calibration:
        others = [(stats.load_all(Path(d) / args.suite), label) for d, label in args.calibration_from]
        write_calibration(others + committed_trainings(zs, args.suite),
                          CALIBRATION_DIR / f"{args.suite}.json", suite=args.suite, detection=zs)
    if not args.quiet:
        print(markdown(det))
        print(f"rescored {len(zs)} models in {det['rescore_seconds']:.1f} s")
    return det


if __name__ == "__main__":
    main()
