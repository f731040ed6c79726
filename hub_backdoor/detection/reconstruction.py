"""Stage 1: the minimal universal latent perturbation s_k for every class k (the TAC estimate).

For class k and clean reference embeddings h_i (labels y_i != k) the paper solves

    s_k = argmin 1/2 ||s||^2  s.t.  (w_k - w_j)^T (h_i + s) + (b_k - b_j) >= m   for all i, j != k.

Because s is shared by all samples, only the worst sample binds per j, so the n(C-1) constraints
collapse exactly to C-1 (docs/method.md):

    V_k s >= t_k,   V_k = rows (w_k - w_j),   t_k[j] = m + max_{i: y_i != k} (z_ij - z_ik)

with z_i = W h_i + b the logits. The pass over the data therefore only keeps the (C, C) matrix
``worst[k, j] = max_{i: y_i != k} (z_ij - z_ik)`` (:class:`ConstraintState`), which merges across
shards with an element-wise max.

Solvers (registry :data:`SOLVERS`):
  * ``"daqp"`` (default, fast). The hard-margin problem (no ``soft_margin``, no ``s >= 0``) is
    solved through its dual, the non-negative QP ``max_{l >= 0} t^T l - 1/2 l^T (V V^T) l`` with
    ``s = V^T l``, by an exact primal active-set method (Lawson-Hanson) whose Gram blocks come from
    the one ``(C, C)`` matrix ``K = W W^T`` (``(V_k V_k^T)[j, l] = K_kk - K_kj - K_kl + K_jl``).
    Only a handful of constraints are active at the optimum, so one class costs O(C |active|)
    instead of a d-dimensional factorisation: ~1 ms per class at d = 2048, C = 1000. The final
    active set is re-solved on ``V`` itself (no cancellation from ``K``) and checked against the
    KKT conditions; a class that fails the check (cycling, ill-conditioning) falls back to DAQP's
    dual active-set on the collapsed primal, which also solves the soft-margin and ``s >= 0``
    variants.
  * ``"cvxpy"``: the collapsed primal through cvxpy (Clarabel), the reference path (slow at large
    d and C: ~40 s per class at d = 2048, C = 1000).
  * :func:`solve_raw_cvxpy`: the uncollapsed n(C-1) problem, for tests only.

Feasibility (Theorem 1) is checked once per head: ``span{w_k - w_j : j != k}`` is the direction
space of the affine hull of the class weights, the same for every k, so ``V_k`` has full row rank
for one k exactly when it has for all k. Theorem 1 is sufficient, not necessary: where it fails
(``C - 1 >= d``, most ImageNet-1k heads), class k is still reachable whenever its weight vector is
a vertex of the hull of the class weights, which in high dimension almost every one is. The hard
problem is then solved class by class; a class the solver proves infeasible (no universal latent
change reaches it at all) gets norm ``inf`` and a zero perturbation, which the detection rules read
as no latent evidence; purifying such a class uses the soft-margin problem's direction (penalty
:data:`UNREACHABLE_PENALTY`, :func:`target_perturbation`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..distributed import Dist
from ..errors import SolverError

__all__ = [
    "SOLVERS",
    "UNREACHABLE_PENALTY",
    "ClassSolution",
    "ConstraintState",
    "Reconstruction",
    "check_feasibility",
    "class_problem",
    "dimension_reason",
    "fold_worst",
    "reconstruct",
    "reconstruct_distributed",
    "solve_class",
    "solve_raw_cvxpy",
    "target_perturbation",
]

# Relative tolerance on constraint violation after a solve (scaled by max |t|).
_FEAS_TOL = 1e-6

#: Soft-margin penalty of the perturbation used for a class no universal latent change reaches.
UNREACHABLE_PENALTY = 1.0


class _ClassInfeasible(SolverError):
    """The solver proved one class's hard problem infeasible."""


@dataclass
class ConstraintState:
    """The running reduction of the reference pass that stage 1 needs.

    Attributes:
        worst: ``(C, C)`` float64, ``worst[k, j] = max_{i: y_i != k} (z_ij - z_ik)``;
            ``-inf`` where no sample was seen; the diagonal is 0.
        counts: ``(C,)`` int64 number of reference samples per label.
    """

    worst: np.ndarray
    counts: np.ndarray

    @classmethod
    def empty(cls, num_classes: int) -> ConstraintState:
        worst = np.full((num_classes, num_classes), -np.inf)
        np.fill_diagonal(worst, 0.0)
        return cls(worst=worst, counts=np.zeros(num_classes, dtype=np.int64))

    @property
    def num_classes(self) -> int:
        return self.worst.shape[0]

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Fold a batch of logits ``(B, C)`` with labels ``(B,)`` into the state."""
        z = logits.detach().to(torch.float64)
        worst = torch.as_tensor(self.worst, device=z.device)
        fold_worst(worst, z, labels)
        self.worst = worst.cpu().numpy()
        y = labels.detach().cpu().to(torch.long).numpy()
        self.counts += np.bincount(y, minlength=self.num_classes)[: self.num_classes]

    def merge(self, other: ConstraintState) -> ConstraintState:
        """Combine two shards (element-wise max, summed counts)."""
        return ConstraintState(np.maximum(self.worst, other.worst), self.counts + other.counts)


def fold_worst(worst: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """In place: ``worst[k, j] = max(worst[k, j], max_{i: y_i != k} (z_ij - z_ik))`` over a batch.

    ``worst`` is a ``(C, C)`` float64 tensor on the logits' device (it stays there between batches,
    so a GPU pass never copies the state back per batch). This is a max-plus product, O(B C^2)
    per batch with no BLAS to lean on, so its memory traffic decides its speed: on a GPU one
    vectorised ``(B, kc, C)`` difference per chunk of k; on a CPU a loop over samples into a
    ``(kc, C)`` block that stays in cache (4-10x faster than the vectorised form at C = 1000, where
    it costs ~0.2 s per batch of 64 on one core).
    """
    z = logits.detach().to(worst.device, torch.float64)
    y = labels.detach().to(z.device, torch.long)
    B, C = z.shape
    if B == 0:
        return
    if z.device.type == "cpu":
        kc = max(8, (1 << 18) // (8 * C))  # a (kc, C) float64 block of ~256 KB
        ys = y.tolist()
        tmp = torch.empty(min(kc, C), C, dtype=torch.float64)
        for k0 in range(0, C, kc):
            k1 = min(C, k0 + kc)
            acc, t = worst[k0:k1], tmp[: k1 - k0]
            for i in range(B):
                torch.sub(z[i, None, :], z[i, k0:k1, None], out=t)  # z_ij - z_ik
                if k0 <= ys[i] < k1:
                    t[ys[i] - k0] = -torch.inf  # a sample does not constrain its own class
                torch.maximum(acc, t, out=acc)
        return
    # chunk over k so (B, kc, C) stays ~32 MB whatever C is
    kc = max(1, (1 << 22) // max(1, B * C))
    for k0 in range(0, C, kc):
        k1 = min(C, k0 + kc)
        diff = z[:, None, :] - z[:, k0:k1, None]  # (B, kc, C): z_ij - z_ik
        own = y[:, None] == torch.arange(k0, k1, device=z.device)[None, :]
        diff.masked_fill_(own[:, :, None], -torch.inf)
        torch.maximum(worst[k0:k1], diff.amax(dim=0), out=worst[k0:k1])


@dataclass
class ClassSolution:
    """Solution for one class: ``s`` ``(d,)``, its norm, and solver diagnostics."""

    k: int
    s: np.ndarray
    norm: float
    status: str
    solver: str
    seconds: float
    max_violation: float
    active: int


@dataclass
class Reconstruction:
    """All per-class perturbations: ``perturbations (C, d)``, ``norms (C,)``, and how they were solved."""

    perturbations: np.ndarray
    norms: np.ndarray
    margin: float
    solver: str
    soft_margin: float | None
    statuses: list[str]
    seconds: float
    nonneg: bool = False
    per_class_seconds: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def class_problem(
    W: np.ndarray, b: np.ndarray, worst: np.ndarray, k: int, margin: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """The collapsed constraints for class k: ``V (C-1, d)`` and ``t (C-1,)`` with ``V s >= t``."""
    del b  # the bias is already inside the logits that built `worst`
    others = np.r_[0:k, k + 1 : W.shape[0]]
    return W[k] - W[others], margin + worst[k, others]


def check_feasibility(W: np.ndarray, k: int | None = None, *, gram: np.ndarray | None = None) -> str | None:
    """Theorem 1: ``C - 1 < d`` and ``V_k`` of full row rank. Returns the reason it fails, or None.

    The row space of ``V_k`` is the direction space of the affine hull of the class weights,
    the same for every k, so one eigen-decomposition (of ``V_k V_k^T`` for ``k`` or 0) decides
    for all classes. ``gram``: ``W W^T`` when the caller already has it.
    """
    C, d = W.shape
    if C - 1 >= d:
        return dimension_reason(C, d)
    kk = 0 if k is None else int(k)
    if gram is not None:
        G = _gram(gram, kk)
    else:
        V = W[kk] - W[np.r_[0:kk, kk + 1 : C]]
        G = V @ V.T
    ev = _extreme_eigenvalues(G)
    if ev[0] <= 1e-10 * max(ev[-1], 1e-300):
        which = f"V_{kk}" if k is not None else "V_k (every k)"
        return (
            f"{which} is rank deficient (smallest eigenvalue of V V^T {ev[0]:.2e}); the class weight "
            "vectors are affinely dependent"
        )
    return None


def dimension_reason(C: int, d: int) -> str:
    """Why Theorem 1 fails when ``C - 1 >= d``."""
    return (f"C - 1 = {C - 1} >= d = {d}: a universal latent perturbation may not exist for every "
            "class (Theorem 1)")


def _extreme_eigenvalues(G: np.ndarray) -> tuple[float, float]:
    """Smallest and largest eigenvalue of a symmetric PSD matrix, or a stand-in with the same verdict.

    A Cholesky factorisation with LAPACK's condition estimate (O(n^3 / 3), BLAS-3; an exact
    eigen-decomposition of a 999 x 999 matrix is ~10x slower) settles the common well-conditioned
    case: the true ``rcond_1 <= lambda_min / lambda_max``, and LAPACK's estimate of it is rarely off
    by more than a factor of 3 (Higham), so an estimate above 1e-9 leaves a 10x margin to the 1e-10
    threshold; ``(rcond * ||G||_1, ||G||_1)`` is then returned. A failed factorisation or a smaller
    estimate gets the exact extreme eigenvalues. (A near-singular case that slipped through would
    still be caught by the per-class feasibility check of the solution.)
    """
    import scipy.linalg as sla

    anorm = float(np.max(np.abs(G).sum(axis=0), initial=0.0))
    try:
        U = sla.cholesky(G, lower=False, check_finite=False)
        rcond, info = sla.lapack.dpocon(U, anorm)
        if info == 0 and rcond > 1e-9:
            return float(rcond * anorm), anorm
    except (np.linalg.LinAlgError, sla.LinAlgError):
        pass
    if G.shape[0] <= 1500:
        ev = np.linalg.eigvalsh(G)
        return float(ev[0]), float(ev[-1])
    from scipy.sparse.linalg import eigsh

    lo = sla.eigvalsh(G, subset_by_index=[0, 0], driver="evr", check_finite=False)
    hi = eigsh(G, k=1, which="LA", return_eigenvectors=False, tol=1e-6)  # Lanczos: O(n^2) per step
    return float(lo[0]), float(hi[0])


def _gram(K: np.ndarray, k: int) -> np.ndarray:
    """``V_k V_k^T`` from the Gram matrix ``K = W W^T``: ``K_kk - K_kj - K_kl + K_jl``."""
    others = np.r_[0 : k, k + 1 : K.shape[0]]
    Kko = K[k, others]
    return K[k, k] - Kko[:, None] - Kko[None, :] + K[np.ix_(others, others)]


def _solve_daqp(
    V: np.ndarray, t: np.ndarray, soft: float | None, nonneg: bool = False
) -> tuple[np.ndarray, str, int]:
    import daqp

    m, d = V.shape
    if soft is None:
        if nonneg:  # d simple bounds s >= 0 come first, then the m rows of V
            hi, lo = np.full(d + m, 1e30), np.r_[np.zeros(d), t]
        else:
            hi, lo = np.full(m, 1e30), t
        s, _f, flag, info = daqp.solve(np.eye(d), np.zeros(d), V, hi, lo)
        lam = np.asarray(info.get("lam", np.zeros(m)))[-m:]
    else:
        # soft margin: variables (s, xi); min 1/2||s||^2 + soft*sum(xi), V s + xi >= t, xi >= 0
        H = np.eye(d + m)
        H[d:, d:] *= 1e-9  # DAQP needs a positive definite H; xi enters the objective linearly
        f = np.r_[np.zeros(d), np.full(m, soft)]
        # the first d + m bounds are simple bounds on (s, xi); the last m bound V s + xi
        lo = np.r_[np.full(d, -1e30), np.zeros(m), t]
        hi = np.full(d + 2 * m, 1e30)
        if nonneg:
            lo[:d] = 0.0
        x, _f, flag, info = daqp.solve(H, f, np.hstack([V, np.eye(m)]), hi, lo)
        s, lam = x[:d], np.asarray(info.get("lam", np.zeros(2 * m + d)))[-m:]
    status = "optimal" if flag == 1 else "infeasible" if flag == -1 else f"daqp exitflag {flag}"
    return np.asarray(s, dtype=np.float64), status, int(np.sum(np.abs(lam) > 1e-12))


class _ActiveSetFailed(Exception):
    """The Gram active-set method did not certify an optimum; the caller falls back to DAQP."""


def _solve_gram_active_set(
    W: np.ndarray, K: np.ndarray | None, t_full: np.ndarray, k: int, *, max_iter: int | None = None
) -> tuple[np.ndarray, int, np.ndarray]:
    """Hard-margin class-k problem through its dual NNQP, Lawson-Hanson active set.

    ``min_{l >= 0} 1/2 l^T G l - t^T l`` with ``G = V_k V_k^T``; ``t_full`` is indexed by class
    (``-inf`` at k and wherever no constraint exists, those never enter). ``K = W W^T`` drives the
    iterations (rows computed from W on demand when None); the final active set is re-solved on
    ``V_P = w_k - W[P]`` directly and accepted only if the KKT conditions hold on exact quantities:
    ``l_P > 0``, ``V s >= t`` to 1e-9 relative. Returns ``(s, number of active constraints, W s)``.
    """
    C = W.shape[0]
    scale = max(1.0, float(np.max(np.abs(t_full[np.isfinite(t_full)]), initial=0.0)))
    tol = 1e-11 * scale
    max_iter = max_iter or 3 * C + 10
    cache: dict[int, np.ndarray] = {}

    def rows(idx: list[int]) -> np.ndarray:
        if K is not None:
            return K[idx]
        for j in idx:
            if j not in cache:
                cache[j] = W @ W[j]
        return np.stack([cache[j] for j in idx])

    Kk = rows([k])[0]
    base = Kk[k] - Kk  # K_kk - K_kj: (V V^T)[j, l] = base_j + base_l - K_kk + K_jl
    P: list[int] = []
    lam = np.zeros(0)
    w = t_full.copy()  # gradient of the dual objective, t - G l
    it = 0
    while True:
        cand = w.copy()
        cand[P] = -np.inf
        j = int(np.argmax(cand))
        if not cand[j] > tol:
            break
        P.append(j)
        lam = np.r_[lam, 0.0]
        while True:
            it += 1
            if it > max_iter:
                raise _ActiveSetFailed(f"no convergence in {max_iter} iterations")
            Pa = np.asarray(P)
            KP = rows(P)
            G = base[Pa][:, None] + base[Pa][None, :] - Kk[k] + KP[:, Pa]
            try:
                z = np.linalg.solve(G, t_full[Pa])
            except np.linalg.LinAlgError:
                raise _ActiveSetFailed("singular active Gram block") from None
            if np.all(z > 0):
                lam = z
                break
            neg = z <= 0
            ratios = lam[neg] / (lam[neg] - z[neg])
            alpha = float(np.min(ratios))
            lam = lam + alpha * (z - lam)
            drop = lam <= 1e-15 * max(1.0, float(lam.max(initial=0.0)))
            drop[np.flatnonzero(neg)[int(np.argmin(ratios))]] = True  # the blocking index leaves
            P = [p for p, dr in zip(P, drop) if not dr]
            lam = lam[~drop]
            if not P:
                break
        if not P:
            w = t_full.copy()
            continue
        Pa = np.asarray(P)
        KP = rows(P)
        w = t_full - (lam.sum() * base - Kk[Pa] @ lam + lam @ KP)
    s, Ws = _polish(W, t_full, k, P, scale)
    return s, len(P), Ws


def _polish(W: np.ndarray, t_full: np.ndarray, k: int, P: list[int], scale: float
            ) -> tuple[np.ndarray, np.ndarray]:
    """``(s (d,), W s (C,))``: the final active set ``P`` re-solved on ``V_P = w_k - W[P]`` itself,
    accepted only where the KKT conditions hold exactly (else :class:`_ActiveSetFailed`)."""
    if not P:
        s = np.zeros(W.shape[1])
    else:
        Pa = np.asarray(P)
        VP = W[k] - W[Pa]
        try:
            lamP = np.linalg.solve(VP @ VP.T, t_full[Pa])
        except np.linalg.LinAlgError:
            raise _ActiveSetFailed("singular active Gram block") from None
        if not np.all(lamP > 0):
            raise _ActiveSetFailed("polished multipliers not positive")
        s = lamP @ VP
    Ws = W @ s
    finite = np.isfinite(t_full)
    viol = float(np.max(t_full[finite] - (Ws[k] - Ws[finite]), initial=0.0))
    if viol > 1e-9 * scale:
        raise _ActiveSetFailed(f"polished solution violates a constraint by {viol:.1e}")
    return s, Ws


_MAX_ENTERING = 32


def _solve_nonneg_dual(V: np.ndarray, t: np.ndarray, *, max_iter: int = 200) -> tuple[np.ndarray, int]:
    """``min 1/2 ||s||^2  s.t.  V s >= t, s >= 0`` through its dual, by projected Newton.

    The dual is ``max_{l >= 0} t^T l - 1/2 ||(V^T l)_+||^2`` with ``s = (V^T l)_+``: m = C - 1
    variables instead of d bounds plus m rows (DAQP on the primal takes ~1 s per class at
    d = 2048). Each step solves the generalised Newton system on the free multipliers and the
    features switched on, then a projected backtracking line search (a projected gradient step
    where the projection spoils the Newton step). The answer is accepted only
    when the KKT conditions hold on exact quantities (``s >= 0`` and stationarity hold by
    construction; feasibility and complementary slackness to 1e-9 relative); otherwise
    :class:`_ActiveSetFailed` sends the caller to DAQP (also what an infeasible problem, whose
    dual is unbounded, does). Returns ``(s, number of active constraints)``.
    """
    m, _d = V.shape
    scale = max(1.0, float(np.max(np.abs(t), initial=0.0)))
    tol = 1e-10 * scale
    lam = np.zeros(m)

    def dual(lv: np.ndarray) -> tuple[float, np.ndarray]:
        nz = lv > 0  # few multipliers are positive: V^T l over those rows only
        sv = np.maximum(lv[nz] @ V[nz], 0.0)
        return float(t @ lv - 0.5 * sv @ sv), sv

    f, s = dual(lam)
    for _ in range(max_iter):
        g = t - V @ s  # the dual's gradient (ascent)
        free = (lam > 0) | (g > tol)
        entering = np.flatnonzero(free & (lam == 0))
        if len(entering) > _MAX_ENTERING:  # the most violated rows only: the Newton system stays small
            free[entering[np.argsort(-g[entering])[_MAX_ENTERING:]]] = False
        kkt = np.max(np.abs(g[lam > 0]), initial=0.0)
        kkt = max(kkt, float(np.max(g[lam == 0], initial=0.0)))
        if kkt <= tol:
            break
        on = s > 0
        if not on.any():
            on = V[free].sum(0) > 0  # from l = 0: the features the violated rows would switch on
        VF = V[np.ix_(free, on)]
        H = VF @ VF.T
        H[np.diag_indices_from(H)] += 1e-12 * max(1.0, float(np.trace(H)) / max(1, len(H)))
        try:
            step = np.linalg.solve(H, g[free])
        except np.linalg.LinAlgError:
            raise _ActiveSetFailed("singular Newton system") from None
        newton = np.zeros(m)
        newton[free] = step
        grad = np.where(free, g, 0.0)
        gHg = float(np.sum((grad[free] @ VF) ** 2))
        # Newton first; where projection spoils it (a multiplier at 0 pushed negative), the
        # projected gradient with the step that is exact on the current quadratic piece
        for direction, a in ((newton, 1.0), (grad, float(grad @ grad) / max(gHg, 1e-300))):
            for _ls in range(30):
                cand = np.maximum(lam + a * direction, 0.0)
                fc, sc = dual(cand)
                if fc >= f + 1e-4 * float(g @ (cand - lam)) and fc > f:
                    break
                a *= 0.5
            else:
                continue
            break
        else:
            raise _ActiveSetFailed("no ascent along the Newton or the gradient direction")
        if fc > 1e12 * scale * scale:
            raise _ActiveSetFailed("dual unbounded: s >= 0 is likely infeasible")
        lam, f, s = cand, fc, sc
    else:
        raise _ActiveSetFailed(f"no convergence in {max_iter} iterations")
    slack = V @ s - t
    if float(np.max(-slack, initial=0.0)) > 1e-9 * scale:
        raise _ActiveSetFailed("dual solution violates a constraint")
    if float(np.max(np.abs(lam * slack), initial=0.0)) > 1e-9 * scale * max(1.0, float(lam.max(initial=0.0))):
        raise _ActiveSetFailed("complementary slackness does not hold")
    return s, int(np.sum(lam > 0))


def _solve_cvxpy(
    V: np.ndarray, t: np.ndarray, soft: float | None, nonneg: bool = False
) -> tuple[np.ndarray, str, int]:
    import cvxpy as cp

    m, d = V.shape
    s = cp.Variable(d, nonneg=nonneg)
    if soft is None:
        cons = [V @ s >= t]
        prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(s)), cons)
    else:
        xi = cp.Variable(m, nonneg=True)
        cons = [V @ s + xi >= t]
        prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(s) + soft * cp.sum(xi)), cons)
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    lam = cons[0].dual_value if cons[0].dual_value is not None else np.zeros(m)
    status = ("optimal" if prob.status == cp.OPTIMAL else "infeasible" if prob.status == cp.INFEASIBLE
              else f"cvxpy {prob.status}")
    val = s.value if s.value is not None else np.full(d, np.nan)
    return np.asarray(val, dtype=np.float64), status, int(np.sum(np.abs(lam) > 1e-9))


#: Solvers for the collapsed per-class problem:
#: name -> fn(V, t, soft_margin, nonneg) -> (s, status, number of active constraints).
SOLVERS: dict[str, Callable[..., tuple[np.ndarray, str, int]]] = {
    "daqp": _solve_daqp,
    "cvxpy": _solve_cvxpy,
}


def solve_class(
    W: np.ndarray,
    b: np.ndarray,
    worst: np.ndarray,
    k: int,
    *,
    margin: float = 0.0,
    solver: str = "daqp",
    soft_margin: float | None = None,
    nonneg: bool = False,
    gram: np.ndarray | None = None,
) -> ClassSolution:
    """Solve class k's collapsed QP and check the answer (feasibility, finiteness).

    ``nonneg`` adds ``s >= 0``: a trigger mostly switches features on (docs/method.md).
    ``gram``: ``W W^T`` when solving many classes (see :func:`reconstruct`); optional.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")
    W = np.asarray(W, dtype=np.float64)
    C = W.shape[0]
    t0 = time.perf_counter()
    others = np.r_[0:k, k + 1 : C]
    t = margin + worst[k, others]
    finite = np.isfinite(t)  # -inf: no reference sample constrains j (cannot happen with >= 2 classes)
    used = solver
    Ws: np.ndarray | None = None
    s: np.ndarray | None
    if not finite.any() or np.all(t[finite] <= 0):
        # every reference sample already lands in class k with margin m
        s, status, active, used = np.zeros(W.shape[1]), "optimal", 0, "none (trivial)"
    else:
        s = None
        if solver == "daqp" and soft_margin is None and not nonneg:
            t_full = np.full(C, -np.inf)
            t_full[others[finite]] = t[finite]
            try:
                s, active, Ws = _solve_gram_active_set(W, gram, t_full, k)
                status, used = "optimal", "daqp (gram active set)"
            except _ActiveSetFailed:
                s = None
        if solver == "daqp" and soft_margin is None and nonneg:
            V = W[k] - W[others]
            try:
                s, active = _solve_nonneg_dual(V[finite], t[finite])
                status, used = "optimal", "daqp (dual projected Newton, s >= 0)"
            except _ActiveSetFailed:
                s = None
        if s is None:
            V = W[k] - W[others]
            s, status, active = SOLVERS[solver](V[finite], t[finite], soft_margin, nonneg)
    secs = time.perf_counter() - t0
    if status == "infeasible":
        raise _ClassInfeasible(f"class {k}: no universal latent change reaches it ({solver}: infeasible)")
    if status != "optimal" or not np.all(np.isfinite(s)):
        raise SolverError(f"class {k}: {solver} returned {status}; try solver='cvxpy' or soft_margin=")
    if Ws is None:
        Ws = W @ s
    viol = float(np.max(t[finite] - (Ws[k] - Ws[others][finite]), initial=0.0))
    scale = max(1.0, float(np.max(np.abs(t[finite]), initial=0.0)))
    if soft_margin is None and viol > _FEAS_TOL * scale:
        raise SolverError(
            f"class {k}: {solver} solution violates a constraint by {viol:.2e} (tolerance "
            f"{_FEAS_TOL * scale:.1e}); try solver='cvxpy'"
        )
    return ClassSolution(k, s, float(np.linalg.norm(s)), status, used, secs, max(viol, 0.0), active)


def target_perturbation(
    W: np.ndarray, b: np.ndarray, worst: np.ndarray, k: int, *, margin: float = 0.0
) -> np.ndarray:
    """``s_k (d,)`` for purification: the exact solution, or for a class no universal latent
    change reaches, the soft-margin one (penalty :data:`UNREACHABLE_PENALTY`), the change that
    comes closest."""
    try:
        return solve_class(W, b, worst, k, margin=margin).s
    except _ClassInfeasible:
        return solve_class(W, b, worst, k, margin=margin, soft_margin=UNREACHABLE_PENALTY).s


def _single_threaded_blas() -> Any:
    """One BLAS thread for the per-class loop: its matrix-vector products are too small to gain
    from threads, and on a busy or oversubscribed machine (several processes per host) threaded
    BLAS spins; measured 2.3 s vs 12.5 s for 1000 classes (d = 2048) on a loaded 2-core box."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def reconstruct(
    W: np.ndarray,
    b: np.ndarray,
    state: ConstraintState,
    *,
    margin: float = 0.0,
    solver: str = "daqp",
    soft_margin: float | None = None,
    classes: list[int] | None = None,
    nonneg: bool = False,
    progress: bool = False,
) -> Reconstruction:
    """Solve every class (or ``classes``) and return the stacked perturbations and norms.

    Args:
        W: ``(C, d)`` float64 head weights. b: ``(C,)`` bias (already folded into ``state``).
        state: the reduction of the reference pass.
        margin: m, the logit margin each sample must reach in class k (0 in the paper).
        soft_margin: ``None`` solves the hard problem; where Theorem 1 fails, a class no
            universal change reaches gets norm ``inf`` and status ``"unreachable"`` (module
            docstring). A positive number solves the soft-margin problem with that penalty per
            violated unit for every class instead.
        classes: solve only these classes (the others keep norm NaN, status ``"skipped"``);
            :func:`reconstruct_distributed` splits classes this way.
    """
    W = np.asarray(W, dtype=np.float64)
    C, d = W.shape
    notes: list[str] = []
    t0 = time.perf_counter()
    ks = list(range(C)) if classes is None else [int(k) for k in classes]
    # one (C, C) Gram matrix serves the feasibility check and every class's active-set solve;
    # for a few classes of a very large head, rows of it are computed on demand instead
    gram = W @ W.T if len(ks) * 32 >= C else None
    reason = check_feasibility(W, gram=gram)
    if reason is not None:
        notes.append(f"soft margin {soft_margin} used: {reason}" if soft_margin is not None else
                     f"{reason}: each class solved on its own; a class no universal latent change "
                     "reaches has norm inf and no latent evidence")
    S = np.zeros((C, d))
    norms = np.full(C, np.nan)
    statuses = ["skipped"] * C
    per = [0.0] * C
    fallbacks = 0
    it: Any = ks
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(ks, desc="QP per class", unit="class", leave=False)
    with _single_threaded_blas():
        for k in it:
            sol = _solve_or_status(W, b, state.worst, k, margin=margin, solver=solver,
                                   soft_margin=soft_margin, nonneg=nonneg, gram=gram, feasibility=reason)
            if isinstance(sol, str):  # no universal change reaches k: the opposite of suspicious
                norms[k], statuses[k] = np.inf, sol
                continue
            S[k], norms[k], statuses[k], per[k] = sol.s, sol.norm, sol.status, sol.seconds
            fallbacks += sol.solver == "daqp"
    if fallbacks and soft_margin is None and not nonneg:
        notes.append(f"the Gram active set fell back to DAQP on the primal for {fallbacks} classes")
    return Reconstruction(
        perturbations=S,
        norms=norms,
        margin=margin,
        solver=solver,
        soft_margin=soft_margin,
        statuses=statuses,
        nonneg=nonneg,
        seconds=time.perf_counter() - t0,
        per_class_seconds=per,
        notes=notes,
    )


def _solve_or_status(W: np.ndarray, b: np.ndarray, worst: np.ndarray, k: int, *, nonneg: bool,
                     feasibility: str | None, **kw: Any) -> Any:
    """:func:`solve_class` of class ``k``, or the status of a class no universal change reaches
    (``s >= 0`` can be infeasible where the free problem is not; without Theorem 1, where
    ``feasibility`` names why, the free one can be too); any other failure is raised."""
    try:
        return solve_class(W, b, worst, k, nonneg=nonneg, **kw)
    except _ClassInfeasible:
        if not nonneg and feasibility is None:
            raise
        return "infeasible (s >= 0)" if nonneg else "unreachable"
    except SolverError:
        if not nonneg:
            raise
        return "infeasible (s >= 0)"


def solve_raw_cvxpy(
    H: np.ndarray, labels: np.ndarray, W: np.ndarray, b: np.ndarray, k: int, margin: float = 0.0
) -> np.ndarray:
    """The uncollapsed problem with all n(C-1) constraints (slow; a test oracle).

    ``H (n, d)`` embeddings, ``labels (n,)``. Returns ``s (d,)``.
    """
    import cvxpy as cp

    Hk = H[labels != k]
    others = np.r_[0:k, k + 1 : W.shape[0]]
    V = W[k] - W[others]  # (C-1, d)
    s = cp.Variable(W.shape[1])
    # (w_k - w_j)^T (h_i + s) + (b_k - b_j) >= m, one row per sample i, one column per j
    fixed = Hk @ V.T + (b[k] - b[others])[None, :]
    shared = np.ones((Hk.shape[0], 1)) @ cp.reshape(V @ s, (1, V.shape[0]), order="C")
    cons = [shared + fixed >= margin]
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(s)), cons)
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    if prob.status != cp.OPTIMAL:
        raise SolverError(f"raw cvxpy problem for class {k}: {prob.status}")
    return np.asarray(s.value)


def reconstruct_distributed(
    W: np.ndarray, b: np.ndarray, state: Any, dist: Dist, *, classes: list[int] | None = None, **kw: Any
) -> Any:
    """:func:`reconstruct` with the classes split over processes.

    Class k goes to process ``k % world``; every process returns the full :class:`Reconstruction`.
    Results equal the single-process ones (each class's QP is solved by the same code on the same
    data); ``seconds`` is the slowest process's wall time, ``per_class_seconds`` each solve's own.
    """
    if not dist.active:
        return reconstruct(W, b, state, classes=classes, **kw)
    C = np.asarray(W).shape[0]
    ks = list(range(C)) if classes is None else [int(k) for k in classes]
    mine = ks[dist.rank :: dist.world]
    t0 = time.perf_counter()
    rec = dist.run(reconstruct, W, b, state, classes=mine, **kw)
    S = dist.all_reduce(torch.as_tensor(rec.perturbations), "sum").numpy()
    parts = dist.all_gather_object(
        {
            "ks": mine,
            "norms": rec.norms[mine],
            "statuses": [rec.statuses[k] for k in mine],
            "seconds": [rec.per_class_seconds[k] for k in mine],
            "notes": rec.notes,
            "wall": time.perf_counter() - t0,
        }
    )
    norms = np.full(C, np.nan)
    statuses = ["skipped"] * C
    per = [0.0] * C
    notes: list[str] = []
    for p in parts:
        for k, n, st, sec in zip(p["ks"], p["norms"], p["statuses"], p["seconds"]):
            norms[k], statuses[k], per[k] = n, st, sec
        notes.extend(n for n in p["notes"] if n not in notes)
    return Reconstruction(
        perturbations=S,
        norms=norms,
        margin=rec.margin,
        solver=rec.solver,
        soft_margin=rec.soft_margin,
        statuses=statuses,
        nonneg=rec.nonneg,
        seconds=max(p["wall"] for p in parts),
        per_class_seconds=per,
        notes=notes,
    )
