"""Stage 1: the collapsed QP equals the raw n(C-1) QP, and the solvers agree."""

import numpy as np
import pytest
import torch

from hub_backdoor.detection.reconstruction import (
    ConstraintState,
    check_feasibility,
    reconstruct,
    solve_class,
    solve_raw_cvxpy,
)


def _instance(C, d, n, seed, nonneg=True):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(C, d)) / np.sqrt(d)
    b = rng.normal(size=C) * 0.1
    H = rng.normal(size=(n, d))
    if nonneg:
        H = np.abs(H)  # post-ReLU embeddings
    y = rng.integers(0, C, n)
    return W, b, H, y


def _state(W, b, H, y, batch=37):
    st = ConstraintState.empty(W.shape[0])
    Z = torch.as_tensor(H @ W.T + b)
    for i in range(0, len(y), batch):
        st.update(Z[i : i + batch], torch.as_tensor(y[i : i + batch]))
    return st


def test_state_matches_bruteforce_max():
    W, b, H, y = _instance(6, 20, 90, 0)
    st = _state(W, b, H, y)
    Z = H @ W.T + b
    for k in range(6):
        ref = (Z[y != k] - Z[y != k][:, [k]]).max(0)
        ref[k] = 0.0
        np.testing.assert_allclose(st.worst[k], ref, rtol=0, atol=1e-12)
    assert st.counts.sum() == 90


def test_state_merge_equals_one_pass():
    W, b, H, y = _instance(5, 16, 80, 1)
    whole = _state(W, b, H, y)
    a, c = _state(W, b, H[:33], y[:33]), _state(W, b, H[33:], y[33:])
    merged = a.merge(c)
    np.testing.assert_array_equal(merged.worst, whole.worst)
    np.testing.assert_array_equal(merged.counts, whole.counts)


@pytest.mark.parametrize(
    "C,d,n,seed,margin",
    [(4, 8, 40, 0, 0.0), (10, 32, 120, 1, 0.0), (10, 64, 200, 2, 0.5), (100, 128, 150, 3, 0.0)],
)
def test_collapsed_equals_raw_and_solvers_agree(C, d, n, seed, margin):
    W, b, H, y = _instance(C, d, n, seed)
    st = _state(W, b, H, y)
    ks = range(C) if C <= 10 else [17]  # the raw problem takes ~10 s per class at C = 100
    for k in ks:
        fast = solve_class(W, b, st.worst, k, margin=margin, solver="daqp")
        ref = solve_class(W, b, st.worst, k, margin=margin, solver="cvxpy")
        raw = solve_raw_cvxpy(H, y, W, b, k, margin)
        n_raw = np.linalg.norm(raw)
        assert fast.norm == pytest.approx(n_raw, rel=1e-6)
        assert ref.norm == pytest.approx(n_raw, rel=1e-6)
        np.testing.assert_allclose(fast.s, raw, rtol=0, atol=1e-6 * max(1.0, n_raw))
        # the solution really moves every sample into k (up to the margin)
        Zs = (H[y != k] + fast.s) @ W.T + b
        others = np.r_[0:k, k + 1 : C]
        assert (Zs[:, [k]] - Zs[:, others]).min() >= margin - 1e-6


def test_reconstruct_all_classes_c100():
    W, b, H, y = _instance(100, 160, 500, 4)
    st = _state(W, b, H, y)
    rec = reconstruct(W, b, st, solver="daqp")
    assert rec.perturbations.shape == (100, 160)
    assert np.all(rec.norms > 0)
    np.testing.assert_allclose(np.linalg.norm(rec.perturbations, axis=1), rec.norms)
    ref = reconstruct(W, b, st, solver="cvxpy", classes=[3, 50])
    np.testing.assert_allclose(ref.norms[[3, 50]], rec.norms[[3, 50]], rtol=1e-6)


def test_classes_above_dimension_are_solved_one_by_one():
    # Theorem 1 fails, yet every class whose weight vector is a vertex of the hull is reachable:
    # the exact answer where one exists (as cvxpy's), norm inf where the solver proves none does
    W, b, H, y = _instance(12, 8, 60, 5)
    st = _state(W, b, H, y)
    assert "C - 1 = 11 >= d = 8" in check_feasibility(W)
    rec = reconstruct(W, b, st)
    ref = reconstruct(W, b, st, solver="cvxpy")
    assert any("Theorem 1" in n for n in rec.notes)
    assert rec.statuses == ref.statuses
    reach = np.isfinite(rec.norms)
    assert reach.sum() >= 1 and np.array_equal(reach, np.isfinite(ref.norms))
    np.testing.assert_allclose(rec.norms[reach], ref.norms[reach], rtol=1e-5)
    for k in np.flatnonzero(~reach):
        assert rec.statuses[k] == "unreachable" and not rec.perturbations[k].any()


def test_rank_deficient_head_is_solved_and_said():
    W, b, H, y = _instance(4, 10, 40, 6)
    W[3] = 2 * W[1] - W[0]  # w_0 - w_3 = 2 (w_0 - w_1): V_0 loses rank
    assert "rank deficient" in check_feasibility(W)
    rec = reconstruct(W, b, _state(W, b, H, y))
    assert any("rank deficient" in n for n in rec.notes)
    assert not np.isnan(rec.norms).any()


def test_soft_margin_solves_infeasible_and_matches_cvxpy():
    W, b, H, y = _instance(12, 8, 60, 5)
    st = _state(W, b, H, y)
    rec = reconstruct(W, b, st, soft_margin=10.0)
    ref = reconstruct(W, b, st, soft_margin=10.0, solver="cvxpy")
    assert rec.notes and "soft margin" in rec.notes[0]
    np.testing.assert_allclose(rec.norms, ref.norms, rtol=1e-4)


def test_zero_perturbation_when_all_samples_already_in_class():
    W, b, H, y = _instance(3, 6, 30, 7)
    st = ConstraintState.empty(3)
    st.update(torch.tensor([[5.0, 0.0, 0.0]] * 4, dtype=torch.float64), torch.tensor([1, 1, 2, 2]))
    sol = solve_class(W, b, st.worst, 0)
    assert sol.norm == 0.0


def test_nonneg_infeasible_class_gets_infinite_norm():
    # class 1 has the zero weight vector: reaching it means lowering the others' logits, which
    # no s >= 0 can do (V_1 s = (-s_0, -s_1) <= 0 < t)
    W = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    b = np.zeros(3)
    H = np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 0.5, 0.0]])
    y = np.array([0, 2, 0])
    st = _state(W, b, H, y)
    free = reconstruct(W, b, st)
    pos = reconstruct(W, b, st, nonneg=True)
    assert np.isfinite(free.norms).all()
    assert pos.norms[1] == np.inf and pos.statuses[1] == "infeasible (s >= 0)"
    assert np.isfinite(pos.norms[[0, 2]]).all()


@pytest.mark.parametrize("C,d,seed", [(10, 32, 4), (100, 128, 5)])
def test_nonneg_dual_newton_agrees_with_daqp_primal(C, d, seed):
    # the s >= 0 problem (the default rule needs it) is solved on its dual; DAQP on the primal
    # (d bounds + C - 1 rows) is the reference (cvxpy's Clarabel fails at tight tolerances here)
    from hub_backdoor.detection.reconstruction import _solve_daqp

    W, b, H, y = _instance(C, d, 4 * C, seed)
    st = _state(W, b, H, y)
    ks = list(range(min(C, 20)))
    fast = [solve_class(W, b, st.worst, k, nonneg=True) for k in ks]
    assert sum(s.solver.startswith("daqp (dual") for s in fast) >= len(ks) - 1  # the fast path ran
    for k, sol in zip(ks, fast):
        others = np.r_[0:k, k + 1 : C]
        ref, status, _ = _solve_daqp(W[k] - W[others], st.worst[k, others], None, nonneg=True)
        assert status == "optimal" and (sol.s >= 0).all()
        np.testing.assert_allclose(sol.norm, np.linalg.norm(ref), rtol=1e-6)
