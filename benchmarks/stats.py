"""Per-model statistics of a suite's audit, stored small and committed, so that any detection
statistic built on the audit can be scored on the whole zoo without a model
(``python -m benchmarks.rescore``).

One compressed ``.npz`` per model (``benchmarks/results/<suite>/<model id>.npz``):

* ``spec``, ``record`` (JSON strings): the zoo entry (attacks, targets, poison rate, seed) and the
  model's detection record (accuracy, ASR per trigger, timings, Neural Cleanse's result);
* ``logits (n, C)``, ``labels (n,)``: the reference (defender's clean) set through the model;
* ``head_W (C, d)``, ``head_b (C,)``;
* ``class_means (C, d)``, ``pcs (P, d)`` (top principal directions of the reference embeddings,
  centred), ``pc_var (P,)``, ``h_mean (d,)``, ``h_std (d,)``;
* ``emb (m, d)`` float16 and ``emb_labels (m,)``: a stratified sample of reference embeddings;
* ``perturbations (C, d)``, ``norms``, ``nonneg_norms``, ``quantile_norms`` (C,): the latent QPs;
* ``input_bounds (C,)``, ``flip_curve (K, T)``, ``eps (T,)``: the input-space verification (when run;
  ``nan`` bounds for classes not searched); ``input_classes (K,)``: the classes searched (absent:
  all C; above 32 classes the latent screen's top ``VERIFY["top"]``, as the library's audit);
* ``mask_l1 (C,)``, ``mask_flip (K,)``, ``mask_classes (K,)``: the mask verification (when run);
* ``tac (T_k, d)``: for backdoored models, the true latent TAC ``mean h(x') - h(x)`` per trigger
  on test images (not of its target); ``nc_l1 (C,)``: Neural Cleanse's mask norms.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hub_backdoor.detection.rules import DetectionInput

N_EMB = 128  # stored reference embeddings per model
N_PCS = 8  # stored principal directions
N_TAC = 256  # test images per trigger for the true TAC


@torch.no_grad()
def _embed(clf: Any, X: torch.Tensor, bs: int = 256) -> np.ndarray:
    return np.concatenate([clf.forward(X[i : i + bs])[1].double().cpu().numpy()
                           for i in range(0, len(X), bs)])


def save(path: Path, *, spec: dict[str, Any], rec: dict[str, Any], clf: Any, X: torch.Tensor, Y: torch.Tensor,
         audit: Any, verification: Any, mask: Any,
         tac_pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write one model's statistics (atomically: a half-written file never replaces a good one).

    ``tac_pairs``: per planted trigger ``(clean images, the same images triggered)``."""
    H = _embed(clf, X)
    y = Y.cpu().numpy()
    C = clf.num_classes
    W, b = clf.head_numpy()
    means = np.stack([H[y == k].mean(0) if (y == k).any() else np.zeros(H.shape[1]) for k in range(C)])
    centred = H - H.mean(0)
    _, sv, vt = np.linalg.svd(centred, full_matrices=False)
    rng = np.random.default_rng(0)
    pick = np.sort(rng.permutation(len(H))[:N_EMB])
    tac = [(_embed(clf, xt[:N_TAC]) - _embed(clf, xc[:N_TAC])).mean(0) for xc, xt in tac_pairs]
    arrays: dict[str, Any] = {
        "spec": json.dumps(spec), "record": json.dumps(rec, default=float),
        "logits": audit.logits.astype(np.float32), "labels": y.astype(np.int16),
        "head_W": W.astype(np.float32), "head_b": b.astype(np.float32),
        "class_means": means.astype(np.float32), "pcs": vt[:N_PCS].astype(np.float32),
        "pc_var": (sv[:N_PCS] ** 2 / max(1, len(H) - 1)).astype(np.float32),
        "h_mean": H.mean(0).astype(np.float32), "h_std": H.std(0).astype(np.float32),
        "emb": H[pick].astype(np.float16), "emb_labels": y[pick].astype(np.int16),
        "perturbations": audit.perturbations.astype(np.float32),
        "norms": audit.inp.norms, "nonneg_norms": audit.inp.nonneg_norms,
        "quantile_norms": audit.inp.quantile_norms,
        "tac": np.stack(tac).astype(np.float32) if tac else np.zeros((0, H.shape[1]), np.float32),
        "nc_l1": np.asarray(rec["nc"]["l1"], dtype=np.float64),
    }
    if verification is not None:
        arrays |= {"input_bounds": verification.full_bounds(C), "eps": verification.eps,
                   "flip_curve": verification.flip_curve.astype(np.float16)}
        if len(verification.classes) < C:  # absent: every class searched (older files too)
            arrays["input_classes"] = np.asarray(verification.classes, np.int16)
    if mask is not None:
        arrays |= {"mask_l1": mask.full_l1(C), "mask_flip": mask.flip.astype(np.float32)}
        if len(mask.classes) < C:
            arrays["mask_classes"] = np.asarray(mask.classes, np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    os.close(fd)
    try:
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(path: Path) -> dict[str, Any]:
    """One model's statistics as a dict (``spec`` and ``record`` parsed)."""
    with np.load(path) as z:
        out: dict[str, Any] = {k: z[k] for k in z.files}
    out["spec"] = json.loads(str(out["spec"]))
    out["record"] = json.loads(str(out["record"]))
    return out


def load_all(folder: Path) -> list[dict[str, Any]]:
    return [load(p) for p in sorted(folder.glob("*.npz"))]


def detection_input(z: dict[str, Any]) -> DetectionInput:
    """What the library's rules see, rebuilt from stored statistics."""
    return DetectionInput(
        norms=np.asarray(z["norms"], dtype=np.float64),
        perturbations=np.asarray(z["perturbations"], np.float64),
        h_std=np.asarray(z["h_std"], np.float64), nonneg_norms=np.asarray(z["nonneg_norms"], np.float64),
        quantile_norms=np.asarray(z["quantile_norms"], np.float64),
        input_bounds=None if "input_bounds" not in z else np.asarray(z["input_bounds"], np.float64),
        mask_l1=None if "mask_l1" not in z else np.asarray(z["mask_l1"], np.float64))
