"""Benchmark harness: ``python -m benchmarks.run --suite quick|full [--device cuda|cpu]``.

Builds the zoo (attacks x poison rates x architectures, plus as many clean models per architecture
as backdoored ones), audits every model (this project's stage 1 with all candidate detection rules
from one reconstruction, Neural Cleanse's detection), removes the backdoor with
:func:`hub_backdoor.purify` itself and the baselines (FT as purify settings, NC, FST, CLP), runs the
purification study (each variant a set of purify options), and writes
``benchmarks/results/<suite>.json`` and ``<suite>.md``. Resumable: trained models and per-model
evaluations are cached under ``benchmarks/results/cache/<suite>/`` (git-ignored) and reused when
their configuration is unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import hashlib
import itertools
import json
import os
import platform
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hub_backdoor.defaults import PURIFY, VERIFY
from hub_backdoor.detection.audit import screened_classes
from hub_backdoor.detection.report import AuditReport, ClassRow, atomic_write_text
from hub_backdoor.detection.rules import (
    DEFAULT_RULE,
    LATENT_RULE,
    REGISTRY,
    RULE_THRESHOLDS,
    RULES,
    DetectionInput,
)
from hub_backdoor.detection.validation import head_fingerprint
from hub_backdoor.detection.verification import verify_input_space, verify_mask
from hub_backdoor.purification.purify import purify

from . import baselines, core, group, stats
from ._machine import cpu_name
from .attacks import ATTACKS, apply, poison_arrays
from .datasets import LOADERS
from .models import ARCHS, audit_view, build

RESULTS = Path(__file__).resolve().parent / "results"
ALL_ATTACKS = list(ATTACKS)

#: The main configuration of this project's purification: the library's purify defaults.
OURS: dict[str, Any] = {**{k: v for k, v in PURIFY.items() if k not in ("min_steps", "threads")},
                        "epochs": None, "resolve_every": None, "freeze_norm": False, "augment": False,
                        "sam_rho": 0.0, "sam_adaptive": False}
#: the keys of OURS that are :func:`hub_backdoor.purify` keywords as they stand (``epochs`` is
#: resolved per suite first)
PURIFY_OPTIONS = tuple(k for k in OURS if k != "epochs")
#: plain fine-tuning (FT) as purify settings: no latent term, no KL terms, every layer trained
FT: dict[str, Any] = {**OURS, "beta": 0.0, "distill": 0.0, "keep": 0.0, "warmup": 0.0, "target_weight": 1.0,
                      "train": "all"}

#: Purification study: variants of OURS, run with the true target (stage 2 alone).
STUDY: dict[str, dict[str, Any]] = {
    "library default": {},
    "head trained too": {"train": "all"},
    "earlier default (beta 3, head trained, 10 epochs)": {"beta": 3.0, "train": "all", "epochs": 10,
                                                          "keep": 0.0},
    "paper loss (scale 1, distill 0)": {"scale": 1.0, "distill": 0.0, "keep": 0.0},
    "paper loss, frozen BN, lr 0.01": {"scale": 1.0, "distill": 0.0, "keep": 0.0, "lr": 0.01,
                                       "freeze_norm": True},
    "beta 1": {"beta": 1.0},
    "beta 3": {"beta": 3.0},
    "scale 1": {"scale": 1.0},
    "scale 4": {"scale": 4.0},
    "distill 0": {"distill": 0.0},
    "lr 0.01": {"lr": 0.01},
    "20 epochs": {"epochs": 20},
    "10 epochs (no minimum of steps)": {"epochs": 10},
    "lr 0.01, 20 epochs": {"lr": 0.01, "epochs": 20},
    "re-solve s_t every 2 epochs": {"resolve_every": 2},
    "last stage + head only": {"train": "last"},
    # from a side study on the quick suite's models (DER 87.1 and 87.5 vs 85.7 there)
    "scale 3, distill 6": {"scale": 3.0, "distill": 6.0},
    "beta 20, distill 6": {"beta": 20.0, "distill": 6.0},
    # for small clean sets: augmentation, sharpness-aware steps (FT-SAM)
    "augment (shift + flip)": {"augment": True},
    "SAM (rho 0.05)": {"sam_rho": 0.05},
    # FT-SAM's own sharpness step: adaptive SAM at its published rho (its loss, learning rate,
    # schedule and label smoothing are not purify's)
    "adaptive SAM (rho 2, FT-SAM's)": {"sam_rho": 2.0, "sam_adaptive": True},
    # at full size from the first step the latent term costs tens of nats and wrecks the features
    # at once (a standard-zoo ConvNeXt fell from 83 % to 39 % accuracy in 8 steps): let the shift
    # grow, or train only the last stage
    "warm-up (s_t grows over half the epochs)": {"warmup": 0.5},
    "paper loss, warm-up": {"scale": 1.0, "distill": 0.0, "keep": 0.0, "warmup": 0.5},
    "last stage only": {"train": "last-stage"},
    "last stage only, warm-up": {"train": "last-stage", "warmup": 0.5},
    # the latent term pulls every sample the same way, away from the target, and with the plain KL
    # alone dragged clean images of every class into the class opposite it (docs/purification.md):
    # a KL over the non-target classes holds their order (the default since the study picked it);
    # beta 5 breaks the backdoor with less
    "no non-target KL (keep 0)": {"keep": 0.0},
    "beta 5": {"beta": 5.0},
    # augmentation removed more of the backdoor on the quick suite (ASR 0.8 % against 10.2 %): does
    # it let a weaker latent term do the job?
    "augment, beta 5": {"augment": True, "beta": 5.0},
}
#: variants for the guarded model (standard suite only): the purified model loses most on the
#: target class itself (about 40 points), whose clean images lie along s_t too; weigh their clean
#: CE up
_GUARD_STUDY: dict[str, dict[str, Any]] = {
    "target weight 3": {"target_weight": 3.0},
    "target weight 10": {"target_weight": 10.0},
    "target weight 30": {"target_weight": 30.0},
    "target weight 10, beta 20": {"target_weight": 10.0, "beta": 20.0},
    "target weight 10, beta 5": {"target_weight": 10.0, "beta": 5.0},
    "target weight 10, scale 1": {"target_weight": 10.0, "scale": 1.0},
    "target weight 10, head trained too": {"target_weight": 10.0, "train": "all"},
    # through the guard the head trained too keeps accuracy (0.9 points on twelve models) but not
    # the backdoor out (6.4 % ASR): a stronger latent term
    "head trained too, beta 30": {"train": "all", "beta": 30.0},
    "head trained too, scale 4": {"train": "all", "scale": 4.0},
    "target weight 10, keep 0": {"target_weight": 10.0, "keep": 0.0},
    "target weight 10, 20 epochs": {"target_weight": 10.0, "epochs": 20},
}
STUDY |= _GUARD_STUDY

#: variants run on the standard suite only (CI's quick suite runs the rest: with these it took
#: 8 min instead of 5.5)
STANDARD_ONLY = ("warm-up (s_t grows over half the epochs)", "paper loss, warm-up", "last stage only",
                 "last stage only, warm-up", "no non-target KL (keep 0)", "beta 5",
                 "augment, beta 5", "adaptive SAM (rho 2, FT-SAM's)", *_GUARD_STUDY)

STANDARD_ARCHS = ("preact18-w8", "vit-e64d4", "mnv3-050", "hf-convnext")
#: the standard suite's purification study (on its 10 % models): the paper's loss, the head
#: trained too, the variants that keep the first steps from wrecking the features, and the
#: target's own clean samples weighed up
STANDARD_STUDY = ["library default", "paper loss (scale 1, distill 0)", "head trained too",
                  "warm-up (s_t grows over half the epochs)", "paper loss, warm-up", "last stage only",
                  "last stage only, warm-up", "no non-target KL (keep 0)", "beta 5", "target weight 10",
                  "SAM (rho 0.05)", "adaptive SAM (rho 2, FT-SAM's)"]

SUITES: dict[str, dict[str, Any]] = {
    # the test's micro suite: 2 models, 1-2 epochs
    "micro": {
        "data": ("digits", {"size": 16}), "zoo": {"preact18-w8": (["badnets"], [0.1])},
        "epochs": 2, "lr": 0.05, "bs": 64, "ft_epochs": 2, "nc_steps": 4, "nc_bs": 4,
        "study": ["library default"], "clean_fraction": 0.05, "group": 2,
        "verify": {"n_images": 20, "steps": 4}, "verify_mask": {"steps": 3, "batch": 4}, "stats": "micro",
    },
    # CPU quick suite (MNIST-5k at 16x16, tiny networks, 10 % poison)
    "quick": {
        "data": ("mnist5k", {"size": 16}),
        "zoo": {"preact18-w8": (ALL_ATTACKS, [0.1])},
        "epochs": 4, "lr": 0.05, "bs": 128, "ft_epochs": 10, "nc_steps": 30, "nc_bs": 12,
        "study": [n for n in STUDY if n not in STANDARD_ONLY], "clean_fraction": 0.05, "group": 12,
    },
    # the full suite's architectures and data on a sliver (its code paths on a CPU in minutes)
    "full-smoke": {
        "data": ("fashion-mnist", {"size": 32, "train_limit": 1200, "test_limit": 300}),
        "zoo": {a: (["badnets"], [0.1]) for a in ("preact18", "vit", "mobilenet")},
        "epochs": 1, "lr": 0.05, "bs": 128, "ft_epochs": 1, "nc_steps": 2, "nc_bs": 4, "ours_epochs": 2,
        # one study variant per code path: stacked, frozen BatchNorm, re-solving s_t, "last" prefixes
        "study": ["library default", "head trained too", "paper loss, frozen BN, lr 0.01",
                  "re-solve s_t every 2 epochs", "last stage + head only"],
        "clean_fraction": 0.05, "group": 2,
    },
    # CPU standard suite: Fashion-MNIST 32x32 RGB, four families (plain torch, timm ViT, timm
    # MobileNetV3, transformers ConvNeXt fine-tuned from a shared backbone), six attacks at two
    # rates + one two-target model and 12 clean models per family; stored statistics committed
    "standard": {
        "data": ("fashion-mnist", {"size": 32, "train_limit": 6000, "test_limit": 2000, "rgb": True,
                                   "other_limit": 6000}),
        "zoo": {a: (ALL_ATTACKS, [0.05, 0.1]) for a in STANDARD_ARCHS},
        # WaNet as the paper sets it (strength 0.5, noise mode) is not learnt in 3-6 epochs
        # (ASR 1-7 %); a stronger warp without noise mode at 10 and 20 % is
        "attack_kw": {"wanet": {"s": 3.0, "cross": 0.0}}, "attack_rates": {"wanet": [0.1, 0.2]},
        "two_target": ("badnets", "blend", 0.1), "n_clean": 12,
        "epochs": 4, "lr": 0.05, "bs": 128, "ft_epochs": 10, "nc_steps": 60, "nc_bs": 16,
        "verify": {"n_images": 40, "steps": 20}, "verify_mask": {"steps": 60, "batch": 16},
        "study": STANDARD_STUDY, "study_rates": [0.1],
        "clean_fraction": 0.05, "group": 1, "stacked": False, "stats": "standard", "channels_last": True,
    },
    # the standard zoo's many-class family: 100 classes of Fashion-MNIST garment pairs (32x32
    # RGB, class 10 * left + right) on timm's test_resnet (d = 96 < C - 1); its own data, so a
    # suite of its own, whose statistics join the standard suite's (rescore counts it as one more
    # family). Above 32 classes the input-space searches cover the latent screen's top VERIFY["top"]
    # classes, as the library's audit does
    "standard-c100": {
        "data": ("fashion-pairs", {"size": 32, "n_train": 10000, "n_test": 2000, "rgb": True}),
        "num_classes": 100,
        "zoo": {"c100-test-resnet": (["badnets", "blend", "wanet", "trojan", "sig", "inputaware"], [0.1])},
        # SIG is clean-label: only the target's own images (1 % at 100 classes) carry the signal,
        # which at the 10-class amplitude (30) reached 24 % ASR
        "attack_kw": {"wanet": {"s": 3.0, "cross": 0.0}, "sig": {"delta": 60.0}}, "n_clean": 6,
        "epochs": 4, "lr": 0.05, "bs": 128, "ft_epochs": 10, "nc_steps": 60, "nc_bs": 4,
        "verify": {"n_images": 40, "steps": 20}, "verify_mask": {"steps": 60, "batch": 16},
        "study": ["library default"], "study_rates": [0.1],
        "clean_fraction": 0.1, "group": 1, "stacked": False, "stats": "standard", "channels_last": True,
    },
    # the standard suite's code paths on a sliver (tests and a CPU dry run in minutes)
    "standard-smoke": {
        "data": ("fashion-mnist", {"size": 32, "train_limit": 1200, "test_limit": 300, "rgb": True,
                                   "other_limit": 600}),
        "zoo": {a: (["badnets"], [0.1]) for a in STANDARD_ARCHS},
        "two_target": ("badnets", "blend", 0.1), "n_clean": 1,
        "epochs": 1, "lr": 0.05, "bs": 128, "ft_epochs": 1, "nc_steps": 2, "nc_bs": 4, "ours_epochs": 2,
        "verify": {"n_images": 20, "steps": 6}, "verify_mask": {"steps": 3, "batch": 4},
        "study": ["library default", "paper loss (scale 1, distill 0)", "augment (shift + flip)",
                  "SAM (rho 0.05)"], "study_rates": [0.1],
        "clean_fraction": 0.05, "group": 1, "stacked": False, "stats": "standard-smoke",
        "channels_last": True,
    },
    # GPU full suite (Fashion-MNIST padded to 32x32; 20k-sample training subset to fit the budget)
    "full": {
        "data": ("fashion-mnist", {"size": 32, "train_limit": 20000}),
        "zoo": {a: (ALL_ATTACKS, [0.01, 0.1]) for a in ("preact18", "vit", "mobilenet")},
        "epochs": 6, "lr": 0.05, "bs": 256, "ft_epochs": 10, "nc_steps": 100, "nc_bs": 24,
        # the study on two attacks only: with it on every 10 % model the zoo needed ~20 GPU-minutes
        "study": list(STUDY), "study_rates": [0.1], "study_models": ["*-badnets-10pct", "*-blend-10pct"],
        "clean_fraction": 0.05,
        # models trained together (benchmarks/group.py): 12 at batch 256 is ~3,000 images a step
        "group": 12,
    },
}

EVAL_VERSION = 7  # 4: detection and removal cached apart; several triggers per model; 5: the guarded
# model; 6: the guarded model of every study variant; 7: ours, FT and the study through purify()
FT_BS = 64  # batch size of every fine-tune (the clean sets are small)
WORKING_ASR = 0.5  # a backdoor "works" when its ASR before defense reaches this


def model_specs(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Every model of the zoo, architectures interleaved (so every worker's share, and whatever a
    deadline leaves finished, mixes architectures, attacks and clean models).

    A spec's ``attacks`` / ``targets`` list every planted trigger (two for a two-target model,
    ``cfg["two_target"] = (attack, attack, rate)``); ``attack`` / ``target`` name the first."""
    per_arch = []
    C = cfg.get("num_classes", 10)  # the suite's data's classes (targets are drawn among them)
    for arch, (attacks, rates) in cfg["zoo"].items():
        specs: list[dict[str, Any]] = []
        n = 0
        for atk in attacks:
            for rate in cfg.get("attack_rates", {}).get(atk, rates):
                mid = f"{arch}-{atk}-{int(round(rate * 100))}pct"
                t = zlib.crc32(mid.encode()) % C
                specs.append({"id": mid, "arch": arch, "attack": atk, "rate": rate, "seed": n,
                              "target": t, "attacks": [atk], "targets": [t]})
                n += 1
        if cfg.get("two_target"):
            a1, a2, rate = cfg["two_target"]
            mid = f"{arch}-two-{a1}-{a2}-{int(round(rate * 100))}pct"
            t1 = zlib.crc32(mid.encode()) % C
            t2 = (t1 + 1 + zlib.crc32(mid[::-1].encode()) % (C - 1)) % C
            specs.append({"id": mid, "arch": arch, "attack": f"{a1}+{a2}", "rate": rate, "seed": n,
                          "target": t1, "attacks": [a1, a2], "targets": [t1, t2]})
            n += 1
        n_clean = cfg.get("n_clean", n)  # default: as many clean as backdoored
        clean = [{"id": f"{arch}-clean-s{s}", "arch": arch, "attack": None, "rate": 0.0,
                  "seed": 100 + s, "target": None, "attacks": [], "targets": []} for s in range(n_clean)]
        mixed = [m for pair in itertools.zip_longest(specs, clean) for m in pair if m is not None]
        per_arch.append(mixed)
    return [m for group in itertools.zip_longest(*per_arch) for m in group if m is not None]


def share(specs: list[dict[str, Any]], i: int, n: int) -> list[dict[str, Any]]:
    """The ``i``-th of ``n`` workers' share of ``specs``, in ``specs``' order: each family's
    backdoored models, then its clean ones, dealt out in turn, so every worker gets an even share
    of every family (their costs differ several-fold) and of the fine-tunes (backdoored models
    only). Dealing the interleaved list itself gave one worker every second family."""
    dealt = [m for arch in dict.fromkeys(s["arch"] for s in specs)
             for clean in (False, True) for m in specs if m["arch"] == arch and (not m["attack"]) == clean]
    mine = {m["id"] for m in dealt[i::n]}
    return [m for m in specs if m["id"] in mine]


def zoo_report(clf: Any, perturbations: np.ndarray, norms: np.ndarray) -> AuditReport:
    """The harness's audit of ``clf`` (:func:`benchmarks.core.audit`: per class the latent change
    ``perturbations (C, d)`` and its norm) as the report :func:`hub_backdoor.purify` takes; it
    carries nothing the purification does not read (no verdict of a rule: the target is given)."""
    W, b = clf.head_numpy()
    rows = [ClassRow(index=k, name=str(k), norm=float(n), anomaly_index=0.0, flagged=False, n_reference=0)
            for k, n in enumerate(np.asarray(norms, dtype=np.float64))]
    return AuditReport(
        verdict="clean", target=None, flagged=[], classes=rows,
        model={"name": clf.name, "num_classes": clf.num_classes, "embed_dim": clf.embed_dim,
               "head_sha256": head_fingerprint(W, b)},
        params={"margin": 0.0}, data={}, timings={}, versions={}, seed=0, created="",
        perturbations=np.asarray(perturbations))


def purify_variant(clf: Any, X: torch.Tensor, Y: torch.Tensor, p: dict[str, Any], report: AuditReport,
                   target: int, *, epochs: int | None = None, last: list[str] | None = None) -> Any:
    """``clf`` purified by :func:`hub_backdoor.purify` with the settings ``p`` (OURS with a study
    variant over it) against ``target``, on the clean set ``X``, ``Y`` (model inputs, so the
    models' preprocessing is the identity) and all of it (no held-out part: the harness measures
    on its own test set); ``epochs``: None, the library's default; ``last``: the prefixes
    ``train="last"`` stands for. Returns the purified classifier; ``clf`` is left as it was."""
    kw = {k: p[k] for k in PURIFY_OPTIONS}
    if kw["train"] == "last":
        kw["train"] = last
    res = purify(clf, (X.cpu(), Y.cpu()), report=report, target=target, epochs=epochs, holdout=0.0,
                 batch_size=FT_BS, seed=0, progress=False, device=clf.device, **kw)
    return res.classifier


def planted(spec: dict[str, Any]) -> list[tuple[str, int]]:
    """``(attack, target)`` of every trigger planted in ``spec``'s model (older records: one)."""
    if spec.get("attacks") is not None:
        return list(zip(spec["attacks"], spec["targets"]))
    return [] if spec["attack"] is None else [(spec["attack"], spec["target"])]


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA), {platform.processor() or platform.machine()}"
    return f"CPU only: {cpu_name()}, torch threads {torch.get_num_threads()}"


class Runner:
    def __init__(self, suite: str, device: torch.device, out: Path, log: bool = True,
                 cached_only: bool = False, stacked: bool = True) -> None:
        self.suite, self.cfg, self.dev, self.out = suite, SUITES[suite], device, out
        # the zoo's models and the NC / FST fine-tunes stacked (benchmarks/group.py) or one by one
        # (purify() always runs one model at a time); a CPU suite sets
        # "stacked": False (on a CPU stacking measured 0.7-1.0x at real batch sizes)
        self.stacked = stacked and self.cfg.get("stacked", True)
        self.channels_last = not self.stacked and self.cfg.get("channels_last", False)
        self.cache = out / "cache" / suite
        self.log_on = log
        name, kw = self.cfg["data"]
        self.data = LOADERS[name](**kw)
        d = self.data
        # cached_only: the device only names the cache entries (a GPU run's tables rebuilt on a CPU)
        device = torch.device("cpu") if cached_only else device
        self.Xte, self.Yte = core.to_tensor(d.x_test, device), torch.as_tensor(d.y_test, device=device)
        rng = np.random.default_rng(12345)
        n_clean = max(10, int(round(self.cfg["clean_fraction"] * len(d.y_train))))
        self.clean_idx = np.sort(rng.choice(len(d.y_train), n_clean, replace=False))
        self.Xc = core.to_tensor(d.x_train[self.clean_idx], device)
        self.Yc = torch.as_tensor(d.y_train[self.clean_idx], device=device)
        self.counters = {"trained": 0, "train_cached": 0, "evaluated": 0, "eval_cached": 0}

    def log(self, *a: Any) -> None:
        if self.log_on:
            print(*a, file=sys.stderr, flush=True)

    # -- training (cached) ----------------------------------------------------------------------
    def attack(self, name: str) -> Any:
        """Attack ``name`` at the suite's image size, with the suite's own parameters if it sets
        any (``cfg["attack_kw"]``)."""
        attack = ATTACKS[name][0](self.data.size)
        kw = self.cfg.get("attack_kw", {}).get(name)
        return dataclasses.replace(attack, **kw) if kw else attack

    def train_hash(self, spec: dict[str, Any]) -> str:
        cfg = self.cfg
        a = ARCHS[spec["arch"]]
        extra = {k: a[k] for k in ("pretrain", "train") if k in a}  # absent keys keep older hashes
        kw = {atk: cfg["attack_kw"][atk] for atk, _ in planted(spec) if atk in cfg.get("attack_kw", {})}
        if kw:
            extra["attack_kw"] = kw
        if cfg.get("channels_last"):  # absent: older hashes stay valid
            extra["channels_last"] = True
        return _hash({"spec": spec, "data": cfg["data"], "epochs": cfg["epochs"], "lr": cfg["lr"],
                      "bs": cfg["bs"], "arch": a["kw"], **extra})

    def trained(self, spec: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """The model of ``spec`` and its training record, trained now if not cached."""
        loaded = self._load(spec)
        if loaded is None:
            self.train_group([spec])
            loaded = self._load(spec)
            assert loaded is not None
        return loaded

    def _train_meta(self, spec: dict[str, Any]) -> dict[str, Any] | None:
        """The training record of ``spec`` if its weights are cached and current, else None."""
        folder = self.cache / spec["id"]
        try:
            meta = json.loads((folder / "train.json").read_text())
        except (OSError, ValueError):
            return None
        if meta.get("hash") != self.train_hash(spec) or not (folder / "model.pt").exists():
            return None
        return meta

    def _load(self, spec: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
        d, folder = self.data, self.cache / spec["id"]
        meta = self._train_meta(spec)
        if meta is None:
            return None
        clf = build(spec["arch"], d.num_classes, d.channels, d.size, spec["seed"],
                    channels_last=self.channels_last)
        clf.model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
        clf.model.to(self.dev).eval()
        self.counters["train_cached"] += 1
        return clf, meta

    def train_group(self, specs: list[dict[str, Any]]) -> None:
        """Train models of one architecture together (:mod:`benchmarks.group`), each on its own
        poisoned copy of the training set with its own seed, and cache each."""
        d, cfg = self.data, self.cfg
        over = ARCHS[specs[0]["arch"]].get("train", {})
        epochs, lr = over.get("epochs", cfg["epochs"]), over.get("lr", cfg["lr"])
        backbone = self.backbone(specs[0]["arch"])
        members, n_poison = [], []
        for spec in specs:
            x, y, n = d.x_train, d.y_train, 0
            for j, (atk, target) in enumerate(planted(spec)):
                x, y, mask = poison_arrays(x, y, self.attack(atk), target=target, rate=spec["rate"],
                                           clean_label=ATTACKS[atk][1], seed=spec["seed"] + 1000 * j)
                n += int(mask.sum())
            clf = build(spec["arch"], d.num_classes, d.channels, d.size, spec["seed"],
                        channels_last=self.channels_last)
            if backbone is not None:  # a fine-tune: every weight but the new head from the backbone
                own = clf.model.state_dict()
                clf.model.load_state_dict({k: v for k, v in backbone.items()
                                           if k in own and own[k].shape == v.shape}, strict=False)
            clf.model.to(self.dev)
            members.append(group.Member(clf=clf, lr=lr, seed=spec["seed"], optimizer=over.get("opt", "sgd"),
                                        X=core.to_tensor(x, self.dev), Y=torch.as_tensor(y, device=self.dev)))
            n_poison.append(n)
        t0 = time.perf_counter()
        losses = group.fit(members, None, None, epochs=epochs, bs=cfg["bs"], nesterov=True,
                           stacked=self.stacked)
        seconds = time.perf_counter() - t0
        for spec, m, n, ls in zip(specs, members, n_poison, losses):
            folder = self.cache / spec["id"]
            folder.mkdir(parents=True, exist_ok=True)
            meta = {"hash": self.train_hash(spec), "seconds": seconds / len(specs), "group_seconds": seconds,
                    "group": len(specs), "losses": ls, "n_poison": n}
            torch.save(m.clf.model.state_dict(), folder / "model.pt")
            (folder / "train.json").write_text(json.dumps(meta))
            self.counters["trained"] += 1
        self.log(f"  trained {', '.join(s['id'] for s in specs)} together in {seconds:.1f}s")

    def backbone(self, arch: str) -> dict[str, torch.Tensor] | None:
        """The shared backbone of a fine-tuned family (``ARCHS[arch]["pretrain"]``): one model
        trained, once, on images outside the zoo's data with a coarser labelling (label // 2,
        5 classes), so the backdoor enters during fine-tuning as on most Hub models. Cached."""
        pre = ARCHS[arch].get("pretrain")
        if pre is None:
            return None
        d = self.data
        if d.x_other is None:
            raise ValueError(f"{arch} is fine-tuned from a backbone but the suite's data has no other images")
        path = self.cache / "_backbones" / f"{arch}.pt"
        key = _hash({"arch": ARCHS[arch]["kw"], "pre": pre, "data": self.cfg["data"]})
        if path.exists():
            saved = torch.load(path, map_location=self.dev, weights_only=True)
            if saved.get("hash") == key:
                return saved["state"]
        n_coarse = (d.num_classes + 1) // 2
        clf = build(arch, n_coarse, d.channels, d.size, seed=9999, channels_last=self.channels_last)
        clf.model.to(self.dev)
        t0 = time.perf_counter()
        core.train_model(clf, core.to_tensor(d.x_other, self.dev),
                         torch.as_tensor(d.y_other // 2, device=self.dev), epochs=pre["epochs"], lr=pre["lr"],
                         bs=self.cfg["bs"], seed=9999, optimizer=pre.get("opt", "sgd"))
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().clone() for k, v in clf.model.state_dict().items()}
        torch.save({"hash": key, "state": state, "seconds": time.perf_counter() - t0}, path)
        self.log(f"  pretrained the {arch} backbone in {time.perf_counter() - t0:.1f}s")
        return state

    def train_pending(self, specs: list[dict[str, Any]], deadline: float | None, t0: float) -> None:
        """Train every not yet trained model of ``specs``, ``group`` at a time per architecture."""
        todo = [s for s in specs if self.cached(s) is None and self._train_meta(s) is None]
        for part in self._groups(todo, deadline, t0):
            self.train_group(part)

    def _groups(self, todo: list[dict[str, Any]], deadline: float | None, t0: float
                ) -> Iterator[list[dict[str, Any]]]:
        """``todo`` in groups of one architecture, at most ``group`` models each, until the deadline."""
        size = self.cfg.get("group", 1)
        for arch in dict.fromkeys(s["arch"] for s in todo):
            of_arch = [s for s in todo if s["arch"] == arch]
            for i in range(0, len(of_arch), size):
                if deadline is not None and time.perf_counter() - t0 > deadline:
                    return
                yield of_arch[i : i + size]

    # -- Neural Cleanse's reverse engineering (cached, stacked per architecture) -------------------
    def nc_hash(self, spec: dict[str, Any]) -> str:
        return _hash({"train": self.train_hash(spec), "nc": [self.cfg["nc_steps"], self.cfg["nc_bs"]],
                      "clean": self.clean_idx.tolist()[:50]})

    def _load_nc(self, spec: dict[str, Any]) -> dict[str, Any] | None:
        try:
            rev = torch.load(self.cache / spec["id"] / "nc.pt", map_location=self.dev, weights_only=True)
        except (OSError, RuntimeError):
            return None
        return rev if rev.get("hash") == self.nc_hash(spec) else None

    def reverse_group(self, specs: list[dict[str, Any]], clfs: dict[str, Any]) -> None:
        """NC's trigger reverse engineering for models of one architecture, stacked; each result
        is cached (``nc.pt``) for :meth:`evaluate`."""
        t0 = time.perf_counter()
        revs = baselines.nc_reverse_many([clfs[s["id"]] for s in specs], self.Xc,
                                         steps=self.cfg["nc_steps"], bs=self.cfg["nc_bs"],
                                         seeds=[s["seed"] for s in specs], stacked=self.stacked)
        core.sync(self.dev)
        seconds = (time.perf_counter() - t0) / len(specs)
        for spec, rev in zip(specs, revs):
            torch.save({**rev, "hash": self.nc_hash(spec), "seconds": seconds},
                       self.cache / spec["id"] / "nc.pt")

    def reverse_pending(self, specs: list[dict[str, Any]], deadline: float | None, t0: float) -> None:
        """Reverse-engineer every model of ``specs`` still to evaluate, ``group`` at a time."""
        todo = [s for s in specs if self.cached(s) is None and self._load_nc(s) is None
                and self._train_meta(s) is not None]
        for part in self._groups(todo, deadline, t0):
            self.reverse_group(part, {s["id"]: self._load(s)[0] for s in part})

    # -- evaluation (cached) --------------------------------------------------------------------
    def evaluate(self, spec: dict[str, Any], phase: str = "all") -> dict[str, Any]:
        """A model's record: the detection part (every model; ``detect.json``), then for a
        single-trigger backdoored model the removal part (``eval.json``) unless ``phase`` is
        ``"detect"``. Both are cached and reused while their configuration is unchanged."""
        clf, meta = self.trained(spec)
        folder = self.cache / spec["id"]
        rec = self._read(folder / "detect.json", self.detect_hash(meta["hash"]))
        if rec is None:
            rec = self.detect_part(spec, clf, meta)
        else:
            self.counters["eval_cached"] += 1
        if phase == "detect" or not self.removable(spec):
            return rec
        done = self._read(folder / "eval.json", self.eval_hash(meta["hash"]))
        if done is not None:
            return done
        t_model = time.perf_counter()
        rec = json.loads(json.dumps(rec))
        rec["hash"] = self.eval_hash(meta["hash"])
        z = np.load(folder / "audit.npz")
        rev = self._load_nc(spec)
        assert rev is not None  # written by detect_part
        trig = self.triggered(spec)[0]
        if "acc_target" not in rec["metrics"]["none"]:  # a detection record from before that field
            rec["metrics"]["none"] = core.evaluate(clf.model, self.Xte, self.Yte, *trig, spec["target"])
        self.remove(spec, clf, zoo_report(clf, z["perturbations"], z["norms"]), rev, rec["detection"], rec,
                    trig)
        rec["eval_seconds"] = rec.get("eval_seconds", 0.0) + time.perf_counter() - t_model
        _write_json(folder / "eval.json", rec)
        self.counters["evaluated"] += 1
        self.log(f"  removal on {spec['id']} in {time.perf_counter() - t_model:.1f}s")
        return rec

    @staticmethod
    def removable(spec: dict[str, Any]) -> bool:
        """Removal is measured on single-trigger backdoored models (the purification takes one target)."""
        return len(planted(spec)) == 1

    @staticmethod
    def _read(path: Path, want: str) -> dict[str, Any] | None:
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return rec if rec.get("hash") == want else None

    def triggered(self, spec: dict[str, Any]) -> list[tuple[Any, Any]]:
        """Per planted trigger: the triggered test images not of its target, and their labels."""
        d, out = self.data, []
        for atk, target in planted(spec):
            keep = d.y_test != target
            x = apply(self.attack(atk), d.x_test[keep])
            out.append((core.to_tensor(x, self.dev), torch.as_tensor(d.y_test[keep], device=self.dev)))
        return out

    def detect_part(self, spec: dict[str, Any], clf: Any, meta: dict[str, Any]) -> dict[str, Any]:
        """Metrics before defense, the audit (every rule from one reconstruction), the input-space
        verification (when the suite has one), Neural Cleanse's detection; the stored statistics."""
        t_model = time.perf_counter()
        folder = self.cache / spec["id"]
        trig = self.triggered(spec)
        rec: dict[str, Any] = {"hash": self.detect_hash(meta["hash"]), "spec": spec,
                               "train_seconds": meta["seconds"], "n_poison": meta["n_poison"], "metrics": {},
                               "ours_by_class": {}, "guarded_by_class": {}, "study": {}, "study_guarded": {},
                               "phases": {}}
        with self.timed(rec, "evaluations"):
            ev = [core.evaluate(clf.model, self.Xte, self.Yte, x, y, t)
                  for (x, y), (_, t) in zip(trig, planted(spec))] or [
                core.evaluate(clf.model, self.Xte, self.Yte, None, None, None)]
        rec["metrics"]["none"] = ev[0]
        rec["asr_by_trigger"] = [e.get("asr") for e in ev] if trig else []
        view = audit_view(clf)
        with self.timed(rec, "audit"):
            au = core.audit(view, self.Xc, self.Yc)
        rec["audit_timings"] = au.timings
        rec["audit_stats"] = core.audit_stats(au.inp)
        ver = None
        # the classes the library's audit searches in input space: all up to 32 classes, else
        # the latent screen's top VERIFY["top"]
        classes = screened_classes(au.inp.norms, au.inp.perturbations, au.inp.h_std)
        if self.cfg.get("verify"):
            with self.timed(rec, "input-space verification"):
                ver = verify_input_space(view, self.Xc, self.Yc, seed=0, classes=classes,
                                         **self.cfg["verify"])
            au.inp.input_bounds = ver.full_bounds(view.num_classes)
            rec["verification"] = {"bounds": ver.bounds.tolist(), "seconds": ver.seconds}
        mask = None
        if self.cfg.get("verify_mask"):
            with self.timed(rec, "mask verification"):
                mask = verify_mask(view, self.Xc, self.Yc, seed=0, classes=classes, **self.cfg["verify_mask"])
            au.inp.mask_l1 = mask.full_l1(view.num_classes)
            rec["mask_verification"] = {"l1": mask.mask_l1.tolist(), "flip": mask.flip.tolist(),
                                        "seconds": mask.seconds}
        W, b = view.head_numpy()
        # per-sample logits, the head and the input-space results too: rules that need them can be
        # studied without a rerun
        np.savez(folder / "audit.npz", perturbations=au.perturbations, h_std=au.inp.h_std,
                 norms=au.inp.norms, nonneg_norms=au.inp.nonneg_norms, quantile_norms=au.inp.quantile_norms,
                 logits=au.logits.astype(np.float32), labels=self.Yc.cpu().numpy(), head_W=W, head_b=b,
                 **({"input_bounds": au.inp.input_bounds} if ver is not None else {}),
                 **({"mask_l1": au.inp.mask_l1} if mask is not None else {}))
        rec["detection"] = detections(au.inp)
        rev = self._load_nc(spec)
        if rev is None:  # not reversed with its group beforehand (reverse_pending)
            self.reverse_group([spec], {spec["id"]: clf})
            rev = self._load_nc(spec)
        rec["nc"] = {"l1": rev["l1"], "scores": rev["scores"], "flagged": rev["flagged"],
                     "seconds": rev["seconds"]}
        rec["phases"]["nc reverse engineering"] = rev["seconds"]
        if self.cfg.get("stats"):
            pairs = [(self.Xte[torch.as_tensor(self.data.y_test != t, device=self.dev)], x)
                     for (x, _), (_, t) in zip(trig, planted(spec))]
            stats.save(self.out / self.cfg["stats"] / f"{spec['id']}.npz", spec=spec, rec=rec, clf=view,
                       X=self.Xc, Y=self.Yc, audit=au, verification=ver, mask=mask, tac_pairs=pairs)
        rec["eval_seconds"] = time.perf_counter() - t_model
        _write_json(folder / "detect.json", rec)
        self.counters["evaluated"] += 1
        m = rec["metrics"]["none"]
        self.log(f"  audited {spec['id']} in {rec['eval_seconds']:.1f}s: acc {m['acc']:.3f}"
                 + (f" asr {m['asr']:.3f}" if "asr" in m else ""))
        return rec

    @contextlib.contextmanager
    def timed(self, rec: dict[str, Any], phase: str) -> Iterator[None]:
        """Add the wall time of the block (device synchronised) to ``rec["phases"][phase]``."""
        core.sync(self.dev)
        t0 = time.perf_counter()
        yield
        core.sync(self.dev)
        rec["phases"][phase] = rec["phases"].get(phase, 0.0) + time.perf_counter() - t0

    def purified(self, spec: dict[str, Any], clf: Any, report: AuditReport, p: dict[str, Any], k: int,
                 epochs: int | None = None) -> Any:
        """``spec``'s model ``clf`` purified by :func:`hub_backdoor.purify` with settings ``p``
        against class ``k`` on the defender's clean set (what :meth:`remove` measures; ``epochs``:
        ``p``'s, else the suite's ``ours_epochs``, else the library's default)."""
        return purify_variant(clf, self.Xc, self.Yc, p, report, k,
                              epochs=epochs or p["epochs"] or self.cfg.get("ours_epochs"),
                              last=ARCHS[spec["arch"]]["last"])

    def remove(self, spec: dict[str, Any], clf: Any, report: AuditReport, rev: dict[str, Any],
               flagged: dict[str, list[int]], rec: dict[str, Any], trig: tuple[Any, Any]) -> None:
        """Every removal of one backdoored model: ours through :func:`hub_backdoor.purify` (for
        each class some rule flags first, and for the true target), FT (purify's loop with no
        latent or KL term, every layer trained) and the purification study's variants, one by
        one; NC unlearning and FST (baselines with their own losses) as fine-tunes of one group;
        CLP."""
        cfg, target = self.cfg, spec["target"]
        perturbations = np.asarray(report.perturbations)

        def ev_model(c: Any) -> dict[str, float]:
            return core.evaluate(c.model, self.Xte, self.Yte, *trig, target)

        def guarded(c: Any, k: int) -> dict[str, float]:  # the original unless it says k
            fn = core.guarded_predict(clf.model, c.model, k)
            return core.metrics(fn, self.Xte, self.Yte, *trig, target)

        for k in sorted({target} | {f[0] for f in flagged.values() if f}):
            with self.timed(rec, "purification (purify())"):
                c = self.purified(spec, clf, report, OURS, k)
            with self.timed(rec, "evaluations"):
                rec["ours_by_class"][str(k)] = ev_model(c)
                rec["guarded_by_class"][str(k)] = guarded(c, k)
        with self.timed(rec, "purification (purify())"):
            ft = self.purified(spec, clf, report, FT, target, epochs=cfg["ft_epochs"])
        with self.timed(rec, "evaluations"):
            rec["metrics"]["ft"] = ev_model(ft)

        # the baselines with losses of their own, stacked where the suite stacks
        jobs: list[tuple[str, group.Member]] = []
        nc = baselines.nc_unlearn(clf.copy(), rev, lr=OURS["lr"])
        if nc is not None:
            jobs.append(("nc", nc))
        else:
            rec["metrics"]["nc"] = rec["metrics"]["none"]  # nothing flagged: the model is left as it is
        jobs.append(("fst", baselines.fst_member(clf.copy(), lr=0.01)))  # FST's own learning rate
        with self.timed(rec, "fine-tunes (stacked)" if self.stacked else "fine-tunes"):
            group.fit([m for _, m in jobs], self.Xc, self.Yc, epochs=cfg["ft_epochs"], bs=FT_BS,
                      stacked=self.stacked)
        with self.timed(rec, "evaluations"):
            for (name, _), ev in zip(jobs, group.evaluate([m.clf for _, m in jobs], self.Xte, self.Yte, *trig,
                                                          target, stacked=self.stacked)):
                rec["metrics"][name] = ev

        in_study = spec["rate"] in cfg.get("study_rates", [spec["rate"]]) and any(
            fnmatch.fnmatch(spec["id"], pat) for pat in cfg.get("study_models", ["*"]))
        for name in cfg["study"] if in_study else []:
            if not STUDY[name]:  # the library default: ours on the true target
                rec["study"][name] = rec["ours_by_class"][str(target)]
                rec["study_guarded"][name] = rec["guarded_by_class"][str(target)]
                continue
            with self.timed(rec, "purification (purify())"):
                c = self.purified(spec, clf, report, {**OURS, **STUDY[name]}, target)
            with self.timed(rec, "evaluations"):
                rec["study"][name] = ev_model(c)
                rec["study_guarded"][name] = guarded(c, target)
        with self.timed(rec, "evaluations"):
            rec["metrics"]["head blind to s_t (reference)"] = ev_model(
                baselines.erase_direction(clf.copy(), perturbations[target], self.Xc))
        pruned, n = baselines.clp(clf.copy())
        rec["clp_pruned"] = n
        rec["metrics"]["clp"] = ev_model(pruned) if n >= 0 else None

    def cached(self, spec: dict[str, Any], phase: str = "all") -> dict[str, Any] | None:
        """A model's finished record, read without its weights (None when missing or stale)."""
        folder = self.cache / spec["id"]
        try:
            meta = json.loads((folder / "train.json").read_text())
        except (OSError, ValueError):
            return None
        # a record of weights trained under another configuration (their hash) is stale too
        if meta.get("hash") != self.train_hash(spec) or not (folder / "audit.npz").exists():
            return None
        if phase == "detect" or not self.removable(spec):
            return self._read(folder / "detect.json", self.detect_hash(meta["hash"]))
        return self._read(folder / "eval.json", self.eval_hash(meta["hash"]))

    def detect_hash(self, train_hash: str) -> str:
        cfg = self.cfg
        return _hash({"base": self.base_hash(train_hash), "verify": cfg.get("verify"),
                      "mask": cfg.get("verify_mask"), "stats": cfg.get("stats"),
                      # which classes the searches cover above VERIFY["all_up_to"] classes
                      **({"screen": VERIFY} if cfg.get("num_classes", 10) > VERIFY["all_up_to"] else {})})

    def base_hash(self, train_hash: str) -> str:
        """What the removal part depends on: the model, the clean set, NC's reverse engineering
        (not the input-space verifications: re-running those keeps every finished removal)."""
        cfg = self.cfg
        return _hash({"v": EVAL_VERSION, "train": train_hash, "nc": [cfg["nc_steps"], cfg["nc_bs"]],
                      "clean": self.clean_idx.tolist()[:50], "dev": self.dev.type})

    def eval_hash(self, train_hash: str) -> str:
        cfg = self.cfg
        study = {name: STUDY[name] for name in cfg["study"]} | {"rates": cfg.get("study_rates"),
                                                                "models": cfg.get("study_models")}
        return _hash({"v": EVAL_VERSION, "detect": self.base_hash(train_hash), "ours": OURS, "study": study,
                      "ft": cfg["ft_epochs"], "nc": [cfg["nc_steps"], cfg["nc_bs"]],
                      "clean": self.clean_idx.tolist()[:50], "dev": self.dev.type})

    def run(self, *, shard: tuple[int, int] | None = None, deadline: float | None = None,
            cached_only: bool = False, phase: str = "all") -> dict[str, Any]:
        """Evaluate every model (``shard = (i, n)``: every n-th from the i-th): the detection part
        of all of them first, then (``phase="all"``) the removal part. ``deadline``: seconds after
        which no new model is started. ``cached_only``: report what is cached."""
        specs = model_specs(self.cfg)
        if shard is not None:
            # the parent listed the models still to do, so the shares are even
            pending = set(json.loads((self.cache / "pending.json").read_text()))
            specs = [m for m in specs if m["id"] in pending]
            specs = share(specs, *shard)
        t0 = time.perf_counter()
        if not cached_only:
            self.train_pending(specs, deadline, t0)
            self.reverse_pending(specs, deadline, t0)
        missing: list[str] = []
        for part in ("detect", "all") if phase == "all" else ("detect",):
            records = []
            for i, spec in enumerate(specs):
                if spec["id"] in missing:
                    continue
                rec = self.cached(spec, part)  # a finished evaluation needs neither data nor weights
                if rec is not None:
                    if (part == "all") == (phase == "all" and self.removable(spec)):  # once per model
                        self.counters["eval_cached"] += 1
                    records.append(rec)
                    continue
                if cached_only or (deadline is not None and time.perf_counter() - t0 > deadline):
                    missing.append(spec["id"])
                    continue
                what = "detection" if part == "detect" else "removal"
                self.log(f"[{i + 1}/{len(specs)}] {spec['id']} ({what})")
                records.append(self.evaluate(spec, part))
        return {"suite": self.suite, "records": records, "seconds": time.perf_counter() - t0,
                "counters": self.counters, "missing": missing}


def detections(inp: DetectionInput, threshold: float | None = None) -> dict[str, list[int]]:
    """Every rule's flags (at its own threshold unless one is given); rules whose input was not
    computed (no verification run) are left out."""
    from hub_backdoor.detection.rules import detect

    out = {}
    for name in RULES:
        try:
            out[name] = detect(inp, rule=name, threshold=threshold).flagged
        except ValueError:
            continue
    return out


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, default=float))


def rescore(folder: Path) -> dict[str, np.ndarray]:
    """All rules' scores from a model's stored audit (so new rules need no model re-run)."""
    z = np.load(folder / "audit.npz")
    inp = DetectionInput(norms=z["norms"], perturbations=z["perturbations"], h_std=z["h_std"],
                         nonneg_norms=z["nonneg_norms"], quantile_norms=z["quantile_norms"],
                         input_bounds=z["input_bounds"] if "input_bounds" in z.files else None,
                         mask_l1=z["mask_l1"] if "mask_l1" in z.files else None)
    out = {}
    for name, fn in RULES.items():
        try:
            out[name] = np.asarray(fn(inp))
        except ValueError:  # its input (the input-space verification) was not computed
            continue
    return out


# -- summary ------------------------------------------------------------------------------------
def der(before: dict[str, float], after: dict[str, float]) -> float:
    return (max(0.0, before["asr"] - after["asr"]) - max(0.0, before["acc"] - after["acc"]) + 1) / 2


def summarise(res: dict[str, Any], cache: Path, rule: str, working_only: bool = False) -> dict[str, Any]:
    recs = res["records"]
    bd = [r for r in recs if r["spec"]["attack"] is not None]
    cl = [r for r in recs if r["spec"]["attack"] is None]
    # detection: each rule at its own threshold, and its best TPR at zero false positives over the zoo
    det: dict[str, dict[str, Any]] = {}
    scores = {r["spec"]["id"]: rescore(cache / r["spec"]["id"]) for r in recs}
    for name in [n for n in RULES if scores and all(n in v for v in scores.values())]:
        def flag(r: dict[str, Any], thr: float, name: str = name) -> int | None:
            s = scores[r["spec"]["id"]][name]
            k = int(np.argmax(s))
            return k if s[k] > thr else None

        thr = RULE_THRESHOLDS[name]
        tp = sum(flag(r, thr) == r["spec"]["target"] for r in bd)
        wrong = sum(flag(r, thr) not in (None, r["spec"]["target"]) for r in bd)
        fp = sum(flag(r, thr) is not None for r in cl)
        clean_max = max([float(np.max(scores[r["spec"]["id"]][name])) for r in cl], default=-np.inf)
        tp0 = sum(flag(r, clean_max) == r["spec"]["target"] for r in bd)  # threshold just above clean
        argmin = sum(int(np.argmax(scores[r["spec"]["id"]][name])) == r["spec"]["target"] for r in bd)
        det[name] = {"tp": tp, "wrong": wrong, "fp": fp, "n_bd": len(bd), "n_clean": len(cl),
                     "tpr": tp / max(1, len(bd)), "fpr": fp / max(1, len(cl)),
                     "tp_at_0fp": tp0, "tpr_at_0fp": tp0 / max(1, len(bd)), "thr_0fp": clean_max,
                     "top_is_target": argmin}
    nc_tp = sum(r["nc"]["flagged"] == r["spec"]["target"] for r in bd)
    nc_wrong = sum(r["nc"]["flagged"] not in (None, r["spec"]["target"]) for r in bd)
    nc_fp = sum(r["nc"]["flagged"] is not None for r in cl)
    det["neural cleanse (mask L1, MAD > 2)"] = {
        "tp": nc_tp, "wrong": nc_wrong, "fp": nc_fp, "n_bd": len(bd), "n_clean": len(cl),
        "tpr": nc_tp / max(1, len(bd)), "fpr": nc_fp / max(1, len(cl)), "tp_at_0fp": None,
        "tpr_at_0fp": None, "thr_0fp": None, "top_is_target": sum(
            int(np.argmax(r["nc"]["scores"])) == r["spec"]["target"] for r in bd)}

    # removal: per model and defense
    def ours_for(r: dict[str, Any], rname: str, kind: str = "ours_by_class") -> dict[str, float] | None:
        s = scores[r["spec"]["id"]][rname]
        k = int(np.argmax(s))
        if s[k] <= RULE_THRESHOLDS[rname]:
            return r["metrics"]["none"]  # nothing flagged: the model is left as it is
        if kind not in r:
            return None  # a record of a run before the guarded model was measured
        return r[kind].get(str(k)) or r["metrics"]["none"]

    # removal: single-trigger backdoored models whose backdoor works (ASR >= 50 % before defense)
    bd = [r for r in bd if Runner.removable(r["spec"]) and "ft" in r["metrics"]
          and (not working_only or r["metrics"]["none"].get("asr", 0.0) >= WORKING_ASR)]
    study = {}
    for name in (res.get("study_names") or []):
        vals = [(r["metrics"]["none"], r["study"][name]) for r in bd if name in r["study"]]
        if vals:
            study[name] = aggregate(vals)
            gvals = [(r["metrics"]["none"], r["study_guarded"][name]) for r in bd
                     if name in r.get("study_guarded", {})]
            # the guarded model of the same fine-tune (records before it was measured: none)
            study[name]["guarded"] = aggregate(gvals) if len(gvals) == len(vals) else None

    def per_model_der(kind: str) -> dict[str, dict[str, float]]:  # kind: "study" or "study_guarded"
        return {name: {r["spec"]["id"]: der(r["metrics"]["none"], r[kind][name])
                       for r in bd if name in r.get(kind, {})} for name in study}

    best = pick(study, per_model_der("study"))
    best_guarded = None
    if study and all(a["guarded"] for a in study.values()):
        best_guarded = pick({n: a["guarded"] for n, a in study.items()}, per_model_der("study_guarded"))
        best = settle(study, best, best_guarded)
    rows = []
    extra = best if best and best != DEFAULT_VARIANT else None
    for r in bd:
        row = {"id": r["spec"]["id"], "target": r["spec"]["target"], "none": r["metrics"]["none"],
               f"ours ({rule})": ours_for(r, rule), "ours (mad)": ours_for(r, "mad"),
               "ours (true target)": r["ours_by_class"][str(r["spec"]["target"])],
               f"ours guarded ({rule})": ours_for(r, rule, "guarded_by_class"),
               "ours guarded (true target)": (r.get("guarded_by_class") or {}).get(str(r["spec"]["target"])),
               **({f"ours ({extra}, true target)": r["study"].get(extra)} if extra else {}),
               "ft": r["metrics"]["ft"], "nc": r["metrics"]["nc"], "fst": r["metrics"].get("fst"),
               "clp": r["metrics"]["clp"]}
        if "head blind to s_t (reference)" in r["metrics"]:
            row["head blind to s_t (reference)"] = r["metrics"]["head blind to s_t (reference)"]
        rows.append(row)
    defenses = [k for k in rows[0] if k not in ("id", "target", "none")] if rows else []
    agg = {}
    for dname in defenses:
        vals = [(r["none"], r[dname]) for r in rows if r[dname] is not None]
        if not vals:
            agg[dname] = None
            continue
        agg[dname] = aggregate(vals)
    agg = {"none": aggregate([(r["none"], r["none"]) for r in rows])} | agg if rows else agg
    timings = {k: float(np.mean([r["audit_timings"][k] for r in recs]))
               for k in recs[0]["audit_timings"]} if recs else {}
    if timings:
        timings["ratio_audit_to_inference"] = float(np.mean(
            [r["audit_timings"]["audit"] / max(r["audit_timings"]["plain_inference"], 1e-9) for r in recs]))
        timings["nc_reverse"] = float(np.mean([r["nc"]["seconds"] for r in recs]))
    clean_acc = {r["spec"]["id"]: r["metrics"]["none"]["acc"] for r in cl}
    spent: dict[str, float] = {"training": float(sum(r.get("train_seconds", 0.0) for r in recs))}
    for r in recs:
        for k, v in r.get("phases", {}).items():
            spent[k] = spent.get(k, 0.0) + v
    return {"detection": det, "rows": rows, "aggregate": agg, "study": study, "best_study": best,
            "best_guarded": best_guarded, "timings": timings, "spent": spent,
            "clean_models": clean_acc}


DEFAULT_VARIANT = "library default"


def pick(study: dict[str, dict[str, Any]], ders: dict[str, dict[str, float]]) -> str | None:
    """The purification study's pick: the library default unless a variant meets the goal on at
    least as many models and beats its DER by more than two standard errors of the paired
    per-model difference (a mean over a handful of models moves by a point between seeds).
    Adds each variant's paired gain and its standard error to ``study``."""
    if not study:
        return None
    if DEFAULT_VARIANT not in study:
        return max(study, key=lambda n: (study[n]["goal_met"], study[n]["der"]))
    base = ders[DEFAULT_VARIANT]
    best = DEFAULT_VARIANT
    for name, a in study.items():
        diffs = np.array([v - base[m] for m, v in ders[name].items() if m in base])
        se = float(diffs.std(ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else float("inf")
        a["der_gain"], a["der_gain_se"] = (float(diffs.mean()) if len(diffs) else 0.0), se
        clear = name != DEFAULT_VARIANT and a["der_gain"] > 2 * se
        if clear and a["goal_met"] >= study[DEFAULT_VARIANT]["goal_met"] and (
                (a["goal_met"], a["der"]) > (study[best]["goal_met"], study[best]["der"])):
            best = name
    return best


def settle(study: dict[str, dict[str, Any]], best: str | None, best_guarded: str | None) -> str | None:
    """The library default's pick from the purified weights' pick ``best`` and the guarded
    model's ``best_guarded`` (:func:`pick` on each): the purified pick when it moves the default;
    else the guarded pick, when its purified weights' DER is no lower than the default's (the
    guard is what a user keeps within the accuracy budget; the weights alone must not lose)."""
    if best != DEFAULT_VARIANT or best_guarded in (None, DEFAULT_VARIANT) or DEFAULT_VARIANT not in study:
        return best
    return best_guarded if study[best_guarded].get("der_gain", -1.0) >= 0 else best


def aggregate(vals: list[tuple[dict[str, float], dict[str, float]]]) -> dict[str, float]:
    return {
        "acc": float(np.mean([a["acc"] for _, a in vals])),
        "asr": float(np.mean([a["asr"] for _, a in vals])),
        "ra": float(np.mean([a["ra"] for _, a in vals])),
        "acc_drop": float(np.mean([b["acc"] - a["acc"] for b, a in vals])),
        # accuracy lost on the target class's own images (None for records without it)
        "target_drop": float(np.mean([b["acc_target"] - a["acc_target"] for b, a in vals]))
        if all("acc_target" in a and "acc_target" in b for b, a in vals) else None,
        "der": float(np.mean([der(b, a) for b, a in vals])),
        "goal_met": int(sum(a["asr"] <= 0.02 and b["acc"] - a["acc"] <= 0.01 for b, a in vals)),
        "n": len(vals),
    }


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def markdown(out: dict[str, Any]) -> str:
    s = out["summary"]
    L = [f"## Suite `{out['suite']}`", "",
         f"- Command: `{out['command']}`", f"- Machine: {out['machine']}",
         f"- Data: {out['data']}; defender's clean set: {out['n_clean']} samples "
         f"({out['config']['clean_fraction']:.0%} of the training set)",
         f"- Models: {out['n_models']} ({out['n_backdoored']} backdoored, {out['n_clean_models']} clean); "
         f"wall time {out['seconds']:.0f} s with {out.get('workers', 1)} worker process(es) (this "
         f"invocation; cached models are not retrained)",
         f"- Library default detection rule at run time: `{out['default_rule']}`; purification: "
         + ", ".join(f"{k} {'auto' if v is None and k == 'epochs' else v}"
                     for k, v in out["ours"].items()), ""]
    if out.get("missing"):
        L[-1:-1] = [f"- **Not finished before the deadline** (left out of every table): "
                    f"{', '.join(out['missing'])}"]
    if s.get("detection_standard"):
        from .rescore import markdown as detection_markdown

        L += [detection_markdown(s["detection_standard"])]
    else:
        L += ["### Detection (one reconstruction per model; every rule scored from it)", "",
              "TP: the rule flags the true target first (at its library threshold). Wrong: a backdoored "
              "model flagged at another class. FP: a clean model with any flag. *At 0 FP*: threshold set "
              "just above the highest score any clean model reached (in-sample, optimistic). *Top*: the "
              "target has the highest score.", "",
              "| rule | TP (library thr) | wrong class | FP on clean | TPR | FPR | TPR at 0 FP (thr) "
              "| top = target |",
              "|---|---|---|---|---|---|---|---|"]
        for name, d in s["detection"].items():
            mark = " (paper)" if name == "mad" else ""
            at0 = "–" if d["tp_at_0fp"] is None else f"{d['tp_at_0fp']}/{d['n_bd']} ({d['thr_0fp']:.2f})"
            L.append(f"| `{name}`{mark} | {d['tp']}/{d['n_bd']} | {d['wrong']} | {d['fp']}/{d['n_clean']} | "
                     f"{pct(d['tpr'])} | {pct(d['fpr'])} | {at0} | {d['top_is_target']}/{d['n_bd']} |")
    L += ["", "### Removal, mean over the backdoored models (ACC / ASR / RA in %, DER in %)", "",
          "| defense | ACC | ASR | RA | ACC drop | target-class ACC drop | DER "
          "| ASR <= 2 % and drop <= 1 pt |",
          "|---|---|---|---|---|---|---|---|"]
    for name, a in s["aggregate"].items():
        if a is None:
            L.append(f"| {name} | n/a | | | | | | |")
            continue
        L.append(f"| {name} | {pct(a['acc'])} | {pct(a['asr'])} | {pct(a['ra'])} | {pct(a['acc_drop'])} | "
                 f"{pct(a.get('target_drop'))} | {pct(a['der'])} | {a['goal_met']}/{a['n']} |")
    L += ["", "### Per model (ACC / ASR after each defense, %)", ""]
    if s["rows"]:
        dn = [k for k in s["rows"][0] if k not in ("id", "target")]
        L += ["| model | target | " + " | ".join(dn) + " |", "|---" * (len(dn) + 2) + "|"]
        for r in s["rows"]:
            cells = ["n/a" if r[k] is None else f"{pct(r[k]['acc'])} / {pct(r[k]['asr'])}" for k in dn]
            L.append(f"| {r['id']} | {r['target']} | " + " | ".join(cells) + " |")
    if s["clean_models"]:
        L += ["", "Clean models, ACC %: " + ", ".join(f"{k} {pct(v)}" for k, v in s["clean_models"].items())]
    if s["study"]:
        rates = out["config"].get("study_rates")
        on = "" if not rates else " at poison rate " + ", ".join(f"{r:.0%}" for r in rates)
        if out["config"].get("study_models"):
            on += ", models " + ", ".join(f"`{m}`" for m in out["config"]["study_models"])
        L += ["", f"### Purification study (true target given; mean over backdoored models{on})", "",
              f"The table's pick: **{s['best_study']}**. A variant replaces the library default only when "
              "it meets the goal on at least as many models and its DER gain over the default, paired "
              "per model, exceeds two standard errors: on the purified weights, or on the guarded model "
              "(its own goal and DER) with the purified weights' DER no lower than the default's"
              + (f" (the guarded model's pick alone: {s['best_guarded']})" if s.get("best_guarded") else "")
              + ".", "",
              "| variant | ACC | ASR | RA | ACC drop | target-class ACC drop | DER "
              "| DER gain vs default (SE) | goal met | guarded: ACC drop / ASR / DER / goal met |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for name, a in s["study"].items():
            gain = "–" if "der_gain" not in a or name == DEFAULT_VARIANT else (
                f"{100 * a['der_gain']:+.1f} ({100 * a['der_gain_se']:.1f})")
            g = a.get("guarded")
            gcell = "–" if not g else (f"{pct(g['acc_drop'])} / {pct(g['asr'])} / {pct(g['der'])} / "
                                       f"{g['goal_met']}/{g['n']}")
            L.append(f"| {name} | {pct(a['acc'])} | {pct(a['asr'])} | {pct(a['ra'])} | "
                     f"{pct(a['acc_drop'])} | {pct(a.get('target_drop'))} | {pct(a['der'])} | {gain} | "
                     f"{a['goal_met']}/{a['n']} | {gcell} |")
    t = s["timings"]
    if t:
        L += ["", "### Audit wall time (mean per model, seconds)", "",
              "| reference pass | QP (C classes) | detection | audit total | one plain inference pass | "
              "audit / inference | extra QPs of the study (s>=0, quantile) | NC reverse engineering |",
              "|---|---|---|---|---|---|---|---|",
              f"| {t['reference_pass']:.3f} | {t['qp']:.3f} | {t['detection']:.4f} | {t['audit']:.3f} | "
              f"{t['plain_inference']:.3f} | {t['ratio_audit_to_inference']:.1f}x | "
              f"{t['qp_nonneg']:.3f} + {t['qp_quantile']:.3f} | {t['nc_reverse']:.2f} |"]
    spent = s.get("spent") or {}
    if len(spent) > 1:
        L += ["", f"### Where the time went (seconds summed over models; {out.get('workers', 1)} worker "
              "process(es) overlap)", "", "| " + " | ".join(spent) + " |", "|---" * len(spent) + "|",
              "| " + " | ".join(f"{v:.1f}" for v in spent.values()) + " |"]
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=sorted(SUITES), default="quick")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--rule", default=None, help="detection rule for 'ours' (default: library default)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--workers", type=int, default=1,
                    help="processes sharing the models (small models leave a GPU idle; default 1)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds after which no new model is started; the tables cover what finished")
    ap.add_argument("--cached-only", action="store_true",
                    help="write the tables from the cache (no training; weights not needed)")
    ap.add_argument("--models", default=None,
                    help="with --workers: evaluate only the models whose id matches this pattern "
                         "(e.g. '*-10pct'); the tables still cover every cached model")
    ap.add_argument("--one-by-one", action="store_true",
                    help="train each model and run each baseline fine-tune (NC, FST) alone instead of "
                         "stacked (same results to rounding)")
    ap.add_argument("--phase", choices=("detect", "all"), default="all",
                    help="detect: train, audit and score every detection rule only (no removal)")
    ap.add_argument("--shard", default=None, help=argparse.SUPPRESS)  # "i/n": one worker's share
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    argv_l = list(argv if argv is not None else sys.argv[1:])
    t_start = time.perf_counter()
    runner = Runner(args.suite, dev, args.out, log=not args.quiet, cached_only=args.cached_only,
                    stacked=not args.one_by_one)
    phase_wall: dict[str, float] = {}
    if args.workers > 1 and not args.shard and not args.cached_only:
        for arch in runner.cfg["zoo"]:  # shared backbones once, before the workers need them
            runner.backbone(arch)
        # the detection part of every model first, then the removal part: a wall time per phase
        for part in ("detect", "all") if args.phase == "all" else ("detect",):
            t_part = time.perf_counter()
            pending = [m["id"] for m in model_specs(runner.cfg) if runner.cached(m, part) is None
                       and (args.models is None or fnmatch.fnmatch(m["id"], args.models))]
            runner.cache.mkdir(parents=True, exist_ok=True)
            (runner.cache / "pending.json").write_text(json.dumps(pending))
            if pending:
                _spawn_workers([*_without(argv_l, "--phase"), "--phase", part],
                               min(args.workers, len(pending)))
            name = ("detection (training, audits, every detection statistic)" if part == "detect"
                    else "removal (every defense and the purification study)")
            phase_wall[name] = time.perf_counter() - t_part
    if args.shard:
        i, n = (int(v) for v in args.shard.split("/"))
        runner.run(shard=(i, n), deadline=args.deadline, phase=args.phase)
        return {}
    res = runner.run(deadline=args.deadline, cached_only=args.cached_only or args.workers > 1,
                     phase=args.phase)
    res["seconds"] = time.perf_counter() - t_start
    res["study_names"] = runner.cfg["study"]
    rule = args.rule or DEFAULT_RULE
    needs = REGISTRY[rule].needs
    if ("input" in needs and not runner.cfg.get("verify")) or (
            "mask" in needs and not runner.cfg.get("verify_mask")):
        rule = LATENT_RULE  # a suite without the input-space searches: "ours" with the default's latent part

    def prev(key: str) -> str:
        return _previous(args.out / f"{args.suite}.json", key)

    elsewhere = args.cached_only and not (dev.type == "cuda" and torch.cuda.is_available())
    out = {
        "suite": args.suite,
        "command": "python -m benchmarks.run " + " ".join(argv_l),
        # rebuilt elsewhere from a GPU run's cache: keep that run's machine; on the GPU itself: this one
        "machine": prev("machine") if elsewhere else machine(dev),
        "device": dev.type, "torch": prev("torch") if elsewhere else torch.__version__,
        "config": {k: v for k, v in runner.cfg.items() if k != "zoo"} | {"zoo": {
            a: {"attacks": at, "rates": rt} for a, (at, rt) in runner.cfg["zoo"].items()}},
        "ours": OURS, "default_rule": DEFAULT_RULE, "rule_for_ours": rule,
        "data": runner.data.name, "n_clean": len(runner.clean_idx),
        "n_models": len(res["records"]),
        "n_backdoored": sum(r["spec"]["attack"] is not None for r in res["records"]),
        "n_clean_models": sum(r["spec"]["attack"] is None for r in res["records"]),
        "seconds": res["seconds"], "counters": res["counters"], "workers": args.workers,
        "phase": args.phase, "phase_wall_seconds": phase_wall,
        "missing": res["missing"], "records": res["records"],
    }
    out["summary"] = summarise(res, runner.cache, rule, working_only=bool(runner.cfg.get("stats")))
    if runner.cfg.get("stats"):  # the detection tables from the stored statistics, as rescore makes them
        from . import rescore

        ids = {r["spec"]["id"] for r in res["records"]}
        zs = [z for z in stats.load_all(args.out / runner.cfg["stats"]) if z["spec"]["id"] in ids]
        out["summary"]["detection_standard"] = rescore.detection_table(zs)
        out["summary"]["detection_standard"]["end_to_end"] = rescore.end_to_end(
            res["records"], zs, list(dict.fromkeys([rule, LATENT_RULE, "mad"])))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.suite}.json").write_text(json.dumps(out, indent=1, default=float))
    (args.out / f"{args.suite}.md").write_text(markdown(out))
    if not args.quiet:
        print(markdown(out))
    return out


def _previous(path: Path, key: str) -> str:
    """What the run that filled the cache recorded (tables rebuilt elsewhere keep its machine)."""
    try:
        return str(json.loads(path.read_text())[key])
    except (OSError, ValueError, KeyError):
        return "as recorded by the run that filled the cache (unknown)"


def _without(argv: list[str], flag: str) -> list[str]:
    """``argv`` less ``flag`` and its value (``--flag V`` or ``--flag=V``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def _spawn_workers(argv: list[str], n: int) -> None:
    """Run ``n`` copies of this command on disjoint shards of the zoo and wait for all of them;
    each writes its models' cache, which the caller then reads."""
    import subprocess

    base = _without(argv, "--workers")
    if not any(a == "--threads" or a.startswith("--threads=") for a in base):
        # each worker its share of the cores: torch's default (all of them, in every worker) made
        # two workers on two cores train a model several times slower than one worker
        base += ["--threads", str(max(1, (os.cpu_count() or 1) // n))]
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.run", *base, "--shard", f"{i}/{n}"])
             for i in range(n)]
    codes = [p.wait() for p in procs]
    if any(codes):
        print(f"benchmark workers exited with {codes}; the tables cover the cached models", file=sys.stderr)


if __name__ == "__main__":
    main()
