"""Scale: the fast (Gram active-set) solver, the one-shot feasibility check, streaming references,
heads with C - 1 >= d, and a smoke run of the scale benchmark."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hub_backdoor import audit
from hub_backdoor.adapters import TorchClassifier
from hub_backdoor.detection.reconstruction import (
    SOLVERS,
    ConstraintState,
    check_feasibility,
    class_problem,
    reconstruct,
    solve_class,
)


def _problem(C, d, n, seed, common=0.0):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(C, d)) / np.sqrt(d) + common * rng.normal(size=d)
    b = rng.normal(size=C) * 0.1
    H = np.abs(rng.normal(size=(n, d)))
    y = rng.integers(0, C, n)
    st = ConstraintState.empty(C)
    st.update(torch.as_tensor(H @ W.T + b), torch.as_tensor(y))
    return W, b, st


def _primal_daqp_norm(W, b, st, k, margin=0.0):
    V, t = class_problem(W, b, st.worst, k, margin)
    f = np.isfinite(t)
    s, status, _ = SOLVERS["daqp"](V[f], t[f], None, False)
    assert status == "optimal"
    return np.linalg.norm(s), s


@pytest.mark.parametrize("common", [0.0, 20.0])  # 20: nearly parallel class weights (K cancels)
def test_fast_solver_equals_daqp_primal_on_every_class(common):
    W, b, st = _problem(120, 200, 150, 1, common)
    rec = reconstruct(W, b, st, margin=0.3)
    assert rec.notes == []  # no class needed the fallback
    for k in range(120):
        ref, s = _primal_daqp_norm(W, b, st, k, 0.3)
        assert rec.norms[k] == pytest.approx(ref, rel=1e-9, abs=1e-12)
        np.testing.assert_allclose(rec.perturbations[k], s, atol=1e-9 * max(1.0, ref))


def test_fast_solver_matches_cvxpy_to_1e6():
    W, b, st = _problem(60, 128, 100, 2)
    rec = reconstruct(W, b, st)
    ref = reconstruct(W, b, st, solver="cvxpy", classes=[0, 31])
    np.testing.assert_allclose(ref.norms[[0, 31]], rec.norms[[0, 31]], rtol=1e-6)


def test_single_class_without_gram_equals_full_reconstruction():
    W, b, st = _problem(40, 64, 80, 3)
    rec = reconstruct(W, b, st)
    for k in (0, 17, 39):
        sol = solve_class(W, b, st.worst, k)  # rows of W W^T computed on demand
        assert sol.solver == "daqp (gram active set)"
        assert sol.norm == pytest.approx(rec.norms[k], rel=1e-12)


def test_feasibility_verdict_is_the_same_for_every_class():
    W, _b, _st = _problem(12, 30, 10, 4)
    assert check_feasibility(W) is None
    assert all(check_feasibility(W, k) is None for k in range(12))
    W[5] = 0.5 * (W[1] + W[2])  # affinely dependent class weights: every V_k loses rank
    assert "rank deficient" in check_feasibility(W)
    assert all("rank deficient" in check_feasibility(W, k) for k in range(12))


def _wide_head_model(C: int, d: int) -> TorchClassifier:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, d), nn.ReLU(), nn.Linear(d, C))
    return TorchClassifier(net, head="3")


def test_audit_with_more_classes_than_dimensions():
    X, y = torch.rand(40, 3, 4, 4), torch.arange(40) % 20
    clf = _wide_head_model(20, 8)  # C - 1 = 19 >= d = 8
    exact = audit(clf, (X, y), rule="mad", progress=False, min_reference_accuracy=0.0)
    assert any("C - 1 = 19 >= d = 8" in n and "each class solved on its own" in n for n in exact.notes)
    assert not np.isnan(exact.norms).any()
    rep = audit(clf, (X, y), rule="mad", soft_margin=1.0, progress=False)
    assert any("C - 1 = 19 >= d = 8" in n and "soft margin" in n for n in rep.notes)
    assert np.all(np.isfinite(rep.norms))


def test_scale_benchmark_smoke(tmp_path):
    from benchmarks.scale import bench_memory, bench_qp

    sink: list = []
    bench_qp([30], d=40, n_ref=20, cvxpy_sample=1, sink=sink)
    assert sink[0]["cvxpy_max_rel_norm_diff"] < 1e-6 and sink[0]["measured"] == "all classes"
    bench_memory(sizes=[40, 200], res=8, batch_size=16, sink=sink)
    mem = [r for r in sink if r["part"] == "memory"]
    assert [r["n"] for r in mem] == [40, 200]
    assert sink[-1]["ratio_largest_to_smallest"] < 1.10
    from benchmarks.scale import bench_group

    for mode in ("finetune", "train"):
        bench_group(arch="preact18-w8", sizes=[3], steps=1, mode=mode, sink=sink)
    g = sink[-1]
    assert g["part"] == "group" and g["mode"] == "train" and g["G"] == 3 and g["batch_size"] == 256
    assert g["alone_ms_per_model_step"] > 0 and g["group_ms_per_model_step"] > 0 and g["speedup_wall"] > 0
