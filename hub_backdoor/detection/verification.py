"""Stage 1c: verify the latent screen in input space: how small a universal input change sends
the clean reference images to each class.

Why: the latent QP reconstructs the *direction* of a trigger's latent change well, but when that
change is long (a full-image blend, a warp) ``||s_t||`` is ordinary and no rule on the norms can
single the target out. A planted trigger is a shortcut in *input* space too: one small additive
pattern sends almost every image to the target, while reaching a natural class needs a change
about as large as for any other class. So per class k we grow a bound ``eps`` geometrically and
follow one projected-gradient trajectory of a universal perturbation ``delta_k`` (``||delta_k||_2
<= eps``, in the model's normalised input space, shared by every reference image), and record the
smallest bound at which a share ``flip`` of the non-k reference images goes to k. All classes are
optimised together in one batch: ``K x n`` images per step.

The statistic compared across classes is scale-free (the bound of k against the median bound of
the other classes), so it does not depend on the input's normalisation or size.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..adapters.base import Classifier
from ..sources.reference import ReferenceData
from .embeddings import channels_last

__all__ = [
    "InputVerification", "MaskVerification", "first_crossing", "reference_inputs",
    "verify_input_space", "verify_mask",
]


@dataclass
class InputVerification:
    """Per-class input-space bounds.

    Attributes:
        classes: the K classes verified (indices into the model's classes).
        bounds: ``(K,)`` L2 bound at which ``flip`` of the non-k images reach k (log-interpolated
            between schedule points; ``2 * eps[-1]`` when not reached within ``eps[-1]``, a
            censored value: "more than the largest bound tried").
        reached: ``(K,)`` whether the share was reached within ``eps[-1]``.
        eps: ``(T,)`` the bound schedule.
        flip_curve: ``(K, T)`` share of non-k reference images sent to k at each bound.
        flip: the share that defines ``bounds``.
        n_images: reference images used (per class, those not of that class count).
        seconds: wall time.
    """

    classes: list[int]
    bounds: np.ndarray
    reached: np.ndarray
    eps: np.ndarray
    flip_curve: np.ndarray
    flip: float
    n_images: int
    seconds: float

    def full_bounds(self, num_classes: int) -> np.ndarray:
        """``(C,)`` bounds with ``nan`` for classes that were not verified."""
        out = np.full(num_classes, np.nan)
        out[self.classes] = self.bounds
        return out


@contextlib.contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode with no parameter gradients (only the input is optimised), restored after."""
    was_training = model.training
    grads = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
        model.train(was_training)


@contextlib.contextmanager
def _bar(progress: bool, total: int, desc: str, unit: str) -> Iterator[Any]:
    """A tqdm bar when ``progress``, else None; closed on the way out."""
    if not progress:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, leave=False)
    try:
        yield bar
    finally:
        bar.close()


def _stratified(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of about ``n`` samples, as many of each label as the data allow (seeded); with more
    labels than ``n``, one sample from each of ``n`` labels drawn at random, so that the cost of
    what runs on the sample does not grow with the number of classes."""
    rng = np.random.default_rng(seed)
    labels = np.unique(y)
    if len(labels) > n > 0:
        labels = np.sort(rng.choice(labels, size=n, replace=False))
    per = max(1, n // max(1, len(labels)))
    idx = [rng.permutation(np.flatnonzero(y == c))[:per] for c in labels]
    return np.sort(np.concatenate(idx)) if idx else np.zeros(0, dtype=np.int64)


def first_crossing(eps: np.ndarray, curve: np.ndarray, flip: float) -> float:
    """The bound where ``curve`` (flip rate per bound) first reaches ``flip``, log-interpolated."""
    hit = np.flatnonzero(curve >= flip)
    if len(hit) == 0:
        return 2.0 * float(eps[-1])  # censored
    i = int(hit[0])
    if i == 0:
        return float(eps[0])
    lo, hi = curve[i - 1], curve[i]
    frac = 1.0 if hi <= lo else (flip - lo) / (hi - lo)
    return float(math.exp(math.log(eps[i - 1]) + frac * (math.log(eps[i]) - math.log(eps[i - 1]))))


#: Numbers of model input one forward pass of the searches holds (a 32-px zoo model's whole
#: search is one chunk; at 224 px about 55 images).
SEARCH_ELEMENTS = 1 << 23


def verify_input_space(
    clf: Classifier,
    x: torch.Tensor,
    y: torch.Tensor | np.ndarray,
    *,
    classes: list[int] | None = None,
    n_images: int = 40,
    steps: int = 20,  # as the standard zoo the thresholds and p-values are calibrated on
    eps_min: float = 0.1,
    eps_max: float = 40.0,
    flip: float = 0.9,
    seed: int = 0,
    progress: bool = False,
) -> InputVerification:
    """Smallest universal L2 input change that sends ``flip`` of the reference images to each class.

    Args:
        clf: the classifier (its ``model`` is put in eval mode; parameters are not changed).
        x: ``(N, channels, H, W)`` model inputs (already preprocessed), on the model's device.
        y: ``(N,)`` their labels.
        classes: classes to verify (default: all).
        n_images: stratified reference images used (the cost is ``K * n_images`` images a step).
        steps: points of the geometric bound schedule from ``eps_min`` to ``eps_max``; one
            normalised-gradient step at each, projected onto the ball. A class's search stops
            at the first bound where it reaches ``flip`` (its bound is that first crossing).
        flip: share of the non-k images that must reach k.
        seed: seeds the image sample.

    Returns:
        An :class:`InputVerification`.
    """
    t0 = time.perf_counter()
    y_np = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    C = clf.num_classes
    ks = list(range(C)) if classes is None else [int(k) for k in classes]
    idx = _stratified(y_np, n_images, seed)
    pool = x[torch.as_tensor(idx, device=x.device)].detach()
    yp = torch.as_tensor(y_np[idx], device=x.device)
    K, n = len(ks), len(idx)
    kt = torch.as_tensor(ks, device=x.device)
    valid = (yp[None, :] != kt[:, None]).float()  # (K, n): images not already of class k
    n_valid = valid.sum(1).clamp_min(1)
    eps = np.exp(np.linspace(math.log(eps_min), math.log(eps_max), steps))
    delta = torch.zeros((K, *pool.shape[1:]), device=x.device, dtype=pool.dtype)
    curve = np.zeros((K, steps))
    model = clf.model
    # the K x n perturbed images go through the model in chunks of whole classes (of images too,
    # where one class's exceed it) that keep the input under SEARCH_ELEMENTS numbers: a 224-px
    # model would otherwise need tens of GB for one step
    per_image = max(1, pool[0].numel())
    span = max(1, SEARCH_ELEMENTS // per_image)
    kc, ic = max(1, span // n), min(n, span)
    # a class's bound is its first crossing: once there its search stops (the rest of its curve
    # repeats the value that crossed), which spares the classes reached early
    live = np.arange(K)
    layout = torch.channels_last if pool.dim() == 4 and pool.device.type == "cpu" else torch.contiguous_format
    with _frozen(model), channels_last(model, layout == torch.channels_last), \
            _bar(progress, steps, "input-space verification", "bound") as bar:
        for i in range(steps + 1):
            hits, g = _hits_and_grads(clf, pool, delta, live, kt, valid, n_valid, chunks=(kc, ic),
                                      layout=layout, grad=i < steps)
            if i > 0:
                # delta now has norm <= eps[i - 1]
                rate = ((hits * valid).sum(1) / n_valid).cpu().numpy()
                curve[live, i - 1] = rate[live]
                done = live[curve[live, i - 1] >= flip]
                curve[done, i:] = curve[done, i - 1 : i]
                live = live[curve[live, i - 1] < flip]
            if g is None or len(live) == 0:
                break
            delta = _ball_step(delta, g, float(eps[i]))
            if bar is not None:
                bar.update(1)
    bounds = np.array([first_crossing(eps, curve[j], flip) for j in range(K)])
    reached = np.asarray((curve >= flip).any(1))
    return InputVerification(classes=ks, bounds=bounds, reached=reached, eps=eps, flip_curve=curve, flip=flip,
                             n_images=n, seconds=time.perf_counter() - t0)


def _hits_and_grads(clf: Classifier, pool: torch.Tensor, delta: torch.Tensor, live: np.ndarray,
                    kt: torch.Tensor, valid: torch.Tensor, n_valid: torch.Tensor, *, chunks: tuple[int, int],
                    layout: Any, grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One pass of the ``live`` classes' changes ``delta (K, channels, H, W)`` over the ``pool (n,
    channels, H, W)``, in chunks of ``chunks = (classes, images)``: ``hits (K, n)`` (1 where the
    image went to the class) and, with ``grad``, the gradient ``(K, channels, H, W)`` of each
    class's mean CE over the images ``valid (K, n)`` marks (else None)."""
    K, n = len(kt), len(pool)
    kc, ic = chunks
    g = torch.zeros_like(delta) if grad else None
    hits = torch.zeros((K, n), device=pool.device)
    for a in range(0, len(live), kc):
        ki = torch.as_tensor(live[a : a + kc], device=pool.device)
        for i0 in range(0, n, ic):
            i1 = min(n, i0 + ic)
            d = delta[ki].detach().requires_grad_(grad)
            batch = (pool[None, i0:i1] + d[:, None]).reshape(-1, *pool.shape[1:])
            batch = batch.contiguous(memory_format=layout)
            logits = clf.forward(batch)[0].float()
            lab = kt[ki].repeat_interleave(i1 - i0)
            with torch.no_grad():
                hits[ki, i0:i1] = (logits.argmax(1) == lab).float().view(len(ki), i1 - i0)
            if g is not None:
                ce = F.cross_entropy(logits, lab, reduction="none").view(len(ki), i1 - i0)
                loss = ((ce * valid[ki, i0:i1]).sum(1) / n_valid[ki]).sum()
                g[ki] += torch.autograd.grad(loss, d)[0]
    return hits, g


@torch.no_grad()
def _ball_step(delta: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """One normalised-gradient step of each class's change ``delta (K, ...)`` (gradient ``g``, same
    shape), projected onto the L2 ball of radius ``eps``."""
    K = len(delta)
    gn = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(K, *[1] * (g.dim() - 1))
    delta = delta - 0.5 * eps * g / gn
    dn = delta.flatten(1).norm(dim=1).view_as(gn)
    return delta * torch.clamp(eps / dn.clamp_min(1e-12), max=1.0)


@dataclass
class MaskVerification:
    """Per-class smallest stamped mask (Neural Cleanse's objective, batched over classes).

    Attributes:
        classes: the K classes searched.
        mask_l1: ``(K,)`` L1 norm of the mask (pixels, 0..H*W) that sends the images to k.
        flip: ``(K,)`` share of the non-k images the final stamp sends to k.
        steps, batch: the search's size; seconds: wall time.
    """

    classes: list[int]
    mask_l1: np.ndarray
    flip: np.ndarray
    steps: int
    batch: int
    seconds: float
    pixels: int = 0  # H * W: the largest possible mask

    def full_l1(self, num_classes: int) -> np.ndarray:
        """``(C,)`` mask norms with ``nan`` for classes that were not searched."""
        out = np.full(num_classes, np.nan)
        out[self.classes] = self.mask_l1
        return out


def verify_mask(
    clf: Classifier,
    x: torch.Tensor,
    y: torch.Tensor | np.ndarray,
    *,
    classes: list[int] | None = None,
    steps: int = 60,  # as the standard zoo the thresholds and p-values are calibrated on
    batch: int = 16,
    lr: float = 0.1,
    l1_weight: float = 2.0,
    seed: int = 0,
    progress: bool = False,
) -> MaskVerification:
    """Per class, the smallest mask m and pattern p such that ``(1 - m) x + m p`` sends the
    reference images to k: ``min CE(f(stamp(x)), k) + l1_weight * |m|_1 / (H W)`` by Adam from
    an empty mask (Neural Cleanse's objective; all classes in one batch, ``K * batch`` images a
    step). A planted patch or blend needs a far smaller mask than any natural class.

    ``x (N, channels, H, W)`` model inputs and ``y (N,)`` labels; the pattern stays within the
    per-channel range of ``x``. Each step draws ``batch`` images (seeded) for every class.
    """
    t0 = time.perf_counter()
    y_t = torch.as_tensor(y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y))
    C = clf.num_classes
    ks = list(range(C)) if classes is None else [int(k) for k in classes]
    K, (ch, H, W) = len(ks), x.shape[1:]
    dev = x.device
    lo = x.detach().amin(dim=(0, 2, 3)).view(1, ch, 1, 1)
    hi = x.detach().amax(dim=(0, 2, 3)).view(1, ch, 1, 1)
    g = torch.Generator(device="cpu").manual_seed(seed)
    m_raw = torch.zeros(K, 1, H, W, device=dev, requires_grad=True)
    p_raw = (torch.randn(K, ch, H, W, generator=g) * 0.1).to(dev).requires_grad_(True)
    opt = torch.optim.Adam([m_raw, p_raw], lr=lr, betas=(0.5, 0.9))
    kt = torch.as_tensor(ks)
    # per class, the images not of that class (a stamp that "sends" k's own images proves nothing)
    pools = [torch.nonzero(y_t != k).flatten() for k in ks]
    model = clf.model
    labels = kt.to(dev).repeat_interleave(batch)

    def stamped(idx: torch.Tensor) -> torch.Tensor:
        m = torch.sigmoid(m_raw)[:, None]
        pat = (lo + (hi - lo) * (torch.tanh(p_raw) + 1) / 2)[:, None]
        xb = x[idx.to(dev)].view(K, batch, ch, H, W)
        return ((1 - m) * xb + m * pat).reshape(K * batch, ch, H, W)

    with _frozen(model), _bar(progress, steps, "mask verification", "step") as bar:
        for _ in range(steps):
            idx = torch.stack([pool[torch.randint(0, len(pool), (batch,), generator=g)] for pool in pools])
            logits = clf.forward(stamped(idx))[0].float()
            ce = F.cross_entropy(logits, labels, reduction="none").view(K, batch).mean(1)
            l1 = torch.sigmoid(m_raw).flatten(1).sum(1)
            loss = (ce + l1_weight / (H * W) * l1).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if bar is not None:
                bar.update(1)
        with torch.no_grad():  # the final stamp on a fixed draw: how much it flips
            idx = torch.stack([pool[torch.randint(0, len(pool), (batch,), generator=g)] for pool in pools])
            hits = (clf.forward(stamped(idx))[0].argmax(1) == labels).float().view(K, batch).mean(1)
            l1 = torch.sigmoid(m_raw).flatten(1).sum(1)
    return MaskVerification(classes=ks, mask_l1=l1.double().cpu().numpy(), flip=hits.cpu().numpy(),
                            steps=steps, batch=batch, seconds=time.perf_counter() - t0, pixels=int(H * W))


def reference_inputs(
    data: Any, transform: Any, *, n_images: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A stratified sample of about ``n_images`` reference examples as model inputs.

    ``data``: a :class:`hub_backdoor.sources.reference.ReferenceData` (sampled per label, seeded) or a
    :class:`hub_backdoor.sources.reference.StreamingReference` (its first examples, a stream has no index).
    ``transform``: raw image -> ``(channels, H, W)`` tensor (the reference pass's).
    Returns ``x (n, channels, H, W)`` on ``device`` and ``y (n,)``.
    """
    if isinstance(data, ReferenceData):
        labels = np.array([data[i][1] for i in range(len(data))])
        pick = _stratified(labels, n_images, seed)
        items = [data[int(i)] for i in pick]
    else:
        items = []
        for _, img, label in data.examples():
            items.append((img, label))
            if len(items) >= n_images:
                break
    xs = [transform(img) if transform is not None else torch.as_tensor(img) for img, _ in items]
    x = torch.stack([t.float() for t in xs]).to(device)
    return x, torch.as_tensor([int(lab) for _, lab in items], device=device)
