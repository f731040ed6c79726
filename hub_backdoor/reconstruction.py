"""Stage 1: the minimal universal latent perturbation s_k for every class k (the TAC estimate).

For class k and clean reference embeddings h_i (labels y_i != k) the paper solves

    s_k = argmin 1/2 ||s||^2  s.t.  (w_k - w_j)^T (h_i + s) + (b_k - b_j) >= m   for all i, j != k.

Because s is shared by all samples, only the worst sample binds per j, so the n(C-1) constraints
collapse exactly to C-1 (method.md):

    V_k s >= t_k,   V_k = rows (w_k - w_j),   t_k[j] = m + max_{i: y_i != k} (z_ij - z_ik)

with z_i = W h_i + b the logits. The pass over the data therefore only keeps the (C, C) matrix
``worst[k, j] = max_{i: y_i != k} (z_ij - z_ik)`` (:class:`ConstraintState`), which merges across
shards with an element-wise max.

Solvers (registry :data:`SOLVERS`):
  * ``"daqp"`` (default, fast): DAQP dual active-set on the collapsed primal.
  * ``"cvxpy"``: the collapsed primal through cvxpy (Clarabel), the reference path.
  * :func:`solve_raw_cvxpy`: the uncollapsed n(C-1) problem, for tests only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import InfeasibleError, SolverError

# Relative tolerance on constraint violation after a solve (scaled by max |t|).
_FEAS_TOL = 1e-6


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
        y = labels.detach().to(z.device, torch.long)
        C = z.shape[1]
        # chunk over k so (B, kc, C) stays ~32 MB whatever C is
        kc = max(1, (1 << 22) // max(1, z.shape[0] * C))
        worst = torch.as_tensor(self.worst, device=z.device)
        for k0 in range(0, C, kc):
            ks = torch.arange(k0, min(C, k0 + kc), device=z.device)
            diff = z[:, None, :] - z[:, ks, None]  # (B, kc, C): z_ij - z_ik
            diff = diff.masked_fill((y[:, None] == ks[None, :])[:, :, None], -torch.inf)
            worst[ks] = torch.maximum(worst[ks], diff.amax(dim=0))
        self.worst = worst.cpu().numpy()
        self.counts += np.bincount(y.cpu().numpy(), minlength=C)[:C]

    def merge(self, other: ConstraintState) -> ConstraintState:
        """Combine two shards (element-wise max, summed counts)."""
        return ConstraintState(np.maximum(self.worst, other.worst), self.counts + other.counts)


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


def check_feasibility(W: np.ndarray, k: int | None = None) -> str | None:
    """Theorem 1: ``C - 1 < d`` and ``V_k`` of full row rank. Returns the reason it fails, or None."""
    C, d = W.shape
    if C - 1 >= d:
        return (
            f"C - 1 = {C - 1} >= d = {d}: a universal latent perturbation may not exist "
            "(Theorem 1); pass soft_margin= to solve the soft-margin problem instead"
        )
    ks = range(C) if k is None else [k]
    K = W @ W.T
    for kk in ks:
        G = _gram(K, kk)
        ev = np.linalg.eigvalsh(G)
        if ev[0] <= 1e-10 * max(ev[-1], 1e-300):
            return (
                f"V_{kk} is rank deficient (smallest eigenvalue of V V^T {ev[0]:.2e}); class {kk}'s "
                "weight differences are linearly dependent; pass soft_margin= to solve anyway"
            )
    return None


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
    status = "optimal" if flag == 1 else f"daqp exitflag {flag}"
    return np.asarray(s, dtype=np.float64), status, int(np.sum(np.abs(lam) > 1e-12))


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
    status = "optimal" if prob.status == cp.OPTIMAL else f"cvxpy {prob.status}"
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
) -> ClassSolution:
    """Solve class k's collapsed QP and check the answer (feasibility, finiteness).

    ``nonneg`` adds ``s >= 0``: a trigger mostly switches features on (method.md, detection leads).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")
    V, t = class_problem(W, b, worst, k, margin)
    t0 = time.perf_counter()
    finite = np.isfinite(t)  # -inf: no reference sample constrains j (cannot happen with >= 2 classes)
    if not finite.any() or np.all(t[finite] <= 0):
        # every reference sample already lands in class k with margin m
        s, status, active = np.zeros(W.shape[1]), "optimal", 0
    else:
        s, status, active = SOLVERS[solver](V[finite], t[finite], soft_margin, nonneg)
    secs = time.perf_counter() - t0
    if status != "optimal" or not np.all(np.isfinite(s)):
        raise SolverError(f"class {k}: {solver} returned {status}; try solver='cvxpy' or soft_margin=")
    viol = float(np.max(t[finite] - V[finite] @ s, initial=0.0))
    scale = max(1.0, float(np.max(np.abs(t[finite]), initial=0.0)))
    if soft_margin is None and viol > _FEAS_TOL * scale:
        raise SolverError(
            f"class {k}: {solver} solution violates a constraint by {viol:.2e} (tolerance "
            f"{_FEAS_TOL * scale:.1e}); try solver='cvxpy'"
        )
    return ClassSolution(k, s, float(np.linalg.norm(s)), status, solver, secs, max(viol, 0.0), active)


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
        soft_margin: ``None`` requires Theorem 1 to hold (else :class:`InfeasibleError`); a
            positive number solves the soft-margin problem with that penalty per violated unit.
    """
    W = np.asarray(W, dtype=np.float64)
    C, d = W.shape
    notes: list[str] = []
    reason = check_feasibility(W)
    if reason is not None:
        if soft_margin is None:
            raise InfeasibleError(reason)
        notes.append(f"soft margin {soft_margin} used: {reason.split(';')[0]}")
    ks = list(range(C)) if classes is None else list(classes)
    S = np.zeros((C, d))
    norms = np.full(C, np.nan)
    statuses = ["skipped"] * C
    per = [0.0] * C
    t0 = time.perf_counter()
    it = ks
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(ks, desc="QP per class", unit="class", leave=False)
    for k in it:
        sol = solve_class(
            W, b, state.worst, k, margin=margin, solver=solver, soft_margin=soft_margin, nonneg=nonneg
        )
        S[k], norms[k], statuses[k], per[k] = sol.s, sol.norm, sol.status, sol.seconds
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
