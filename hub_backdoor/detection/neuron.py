"""Neuron-space evidence: where small adversarial noise on the network's own neurons sends clean
images (after ANP, Wu & Wang, NeurIPS 2021, and BAN, Xu et al., NeurIPS 2024).

A backdoor is a small set of neurons that, once excited, override the rest of the network and
name one class. Scaling every output channel of every layer by ``(1 + delta)``, ``|delta| <= eps``,
with ``delta`` ascending the clean loss, excites them without the trigger. Two statistics:

* **onset share** (the score :func:`neuron_scores` returns): along a geometric schedule of
  ``eps``, while the reference accuracy is still within ``drop`` (20 %) of its clean value, the
  share of the misclassified images that land on each class. Where the noise is large every
  network collapses onto some class, and a natural "sink" class of a clean network takes it as
  readily as a planted target (issue 32's probe at one ``eps``); the *first* errors, made while
  the network still works, go where the cheapest path through the neurons leads, and a backdoor
  is such a path. A share is scale-free: the noise level each family tolerates cancels out.
* **targeted bound** (``targeted=True``, :func:`bound_scores`): per class k, the smallest ``eps``
  at which a signed-gradient search sends most non-k images to k, scored by the log-ratio of the
  other classes' median bound to k's (as :func:`hub_backdoor.detection.verification.bound_ratio_scores`).

Where the noise goes: the output of every convolution, linear layer (attention projections
included), ``nn.MultiheadAttention`` and normalisation layer (BatchNorm, GroupNorm, LayerNorm in
either layout: a LayerNorm right after a layer would otherwise undo a per-channel scaling of it),
except the classifier's head. The targeted search runs all classes at once: the batch holds ``n``
images per class, each class with its own noise.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.base import Classifier
from .rules import bound_ratio_scores
from .verification import _bar, _frozen, _stratified, first_crossing

__all__ = ["NeuronScores", "bound_scores", "neuron_layers", "neuron_scores", "onset_shares"]

#: the shares of non-k images whose bounds the score averages (one share alone is noisier)
FLIPS = (0.5, 0.6, 0.7, 0.8, 0.9)
#: numbers of model input one chunk of the search holds (whole classes; as the input-space search)
SEARCH_ELEMENTS = 1 << 23


@dataclass
class NeuronScores:
    """Per-class neuron-noise bounds and scores.

    Attributes:
        scores: ``(C,)`` the onset share (:func:`onset_shares`): of the reference images the
            untargeted noise misclassifies first, the share that lands on k.
        bounds: ``(C,)`` the targeted search's noise level at which ``0.9`` of the non-k images
            reach k (log-interpolated, ``2 * eps[-1]`` when never reached; ``nan`` when not run).
        eps: ``(T,)`` the noise schedule (``|delta| <= eps``, multiplicative).
        flip_curve: ``(C, T)`` targeted search: share of non-k reference images classified k at
            each level (``nan`` when not run).
        untargeted_acc: ``(T,)`` accuracy of the reference images under noise that ascends their
            own loss (the untargeted ANP probe), per level.
        untargeted_share: ``(C, T)`` share of the non-k reference images the untargeted noise
            sends to k, per level.
        acc_clean: accuracy of the probe's reference images without noise.
        counts: ``(C, T)`` how many non-k reference images the untargeted noise sends to k.
        layers: how many modules carried noise.
        n_images: reference images used.
        seconds: wall time of the whole search.
    """

    scores: np.ndarray
    bounds: np.ndarray
    eps: np.ndarray
    flip_curve: np.ndarray
    untargeted_acc: np.ndarray
    untargeted_share: np.ndarray
    acc_clean: float
    counts: np.ndarray
    layers: int
    n_images: int
    seconds: float

    def bounds_at(self, flip: float) -> np.ndarray:
        """``(C,)`` bounds at another share (from the stored curves)."""
        return np.array([first_crossing(self.eps, c, flip) if np.isfinite(c).all() else np.nan
                         for c in self.flip_curve])


_CHANNEL_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                  nn.modules.instancenorm._InstanceNorm)


def _site(m: nn.Module) -> tuple[int, int, int] | None:
    """``(channel dim, channels, batch dim)`` of the output the noise scales, or None."""
    if isinstance(m, nn.modules.conv._ConvNd):
        return 1, m.out_channels, 0
    if isinstance(m, nn.Linear):
        return -1, m.out_features, 0
    if isinstance(m, nn.MultiheadAttention):
        return -1, m.embed_dim, 0 if m.batch_first else 1
    if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        return 1, m.num_features, 0
    if isinstance(m, nn.GroupNorm):
        return 1, m.num_channels, 0
    w = getattr(m, "weight", None)
    if "norm" in type(m).__name__.lower() and isinstance(w, torch.Tensor) and w.dim() == 1:
        # nn.LayerNorm and its variants (timm LayerNorm2d, transformers' channels-first one)
        first = getattr(m, "data_format", None) == "channels_first" or type(m).__name__.endswith("2d")
        return (1 if first else -1), int(w.numel()), 0
    return None


def _head_modules(clf: Classifier) -> set[nn.Module]:
    paths: tuple[str, ...] = tuple(getattr(clf, "head_paths", ()) or ())
    if not paths and getattr(clf, "_head_path", None):
        paths = (clf._head_path,)  # type: ignore[attr-defined]
    out: set[nn.Module] = set()
    for p in paths:
        out |= set(clf.model.get_submodule(p).modules())
    return out


def neuron_layers(clf: Classifier) -> list[tuple[str, nn.Module, tuple[int, int, int]]]:
    """The modules that carry noise: ``(path, module, (channel dim, channels, batch dim))``,
    every convolution, linear, attention and normalisation layer but the head."""
    head = _head_modules(clf)
    out = []
    for name, m in clf.model.named_modules():
        site = _site(m)
        if site is not None and m not in head and not any(m is h for h in head):
            out.append((name, m, site))
    return out


class _Noise:
    """Forward hooks that scale each layer's channels by ``1 + delta[group]``; the batch is laid out
    group-major (``groups`` blocks of equal size), each block with its own noise."""

    def __init__(self, layers: list[tuple[str, nn.Module, tuple[int, int, int]]], K: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.layers = layers
        self.delta = [torch.zeros((K, ch), device=device, dtype=dtype) for _, _, (_, ch, _) in layers]
        self.groups: torch.Tensor | None = None
        self.live: list[torch.Tensor] = []
        self.fired: set[int] = set()

    def _hook(self, i: int, _m: nn.Module, _inp: Any, out: Any) -> Any:
        if self.groups is None:
            return None
        rest = None
        if isinstance(out, tuple):  # nn.MultiheadAttention: (output, weights)
            out, rest = out[0], out[1:]
        if not isinstance(out, torch.Tensor):
            return None
        cdim, ch, bdim = self.layers[i][2]
        cdim = cdim % out.dim()
        G = len(self.groups)
        if out.shape[cdim] != ch or out.shape[bdim] % G or cdim == bdim:
            return None
        self.fired.add(i)
        d = self.live[i]
        shape = [1] * (out.dim() + 1)
        shape[bdim] = G
        shape[cdim + 1 if cdim > bdim else cdim] = ch
        y = (out.unflatten(bdim, (G, out.shape[bdim] // G)) * (1 + d).to(out.dtype).view(shape)).flatten(
            bdim, bdim + 1)
        return (y, *rest) if rest is not None else y

    @contextmanager
    def attached(self) -> Iterator[None]:
        handles = [m.register_forward_hook(lambda m, a, o, i=i: self._hook(i, m, a, o))
                   for i, (_, m, _) in enumerate(self.layers)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def use(self, groups: torch.Tensor, grad: bool) -> list[torch.Tensor]:
        """Select the noise of ``groups`` for the next forward; returns the leaf tensors."""
        self.groups = groups
        self.live = [d[groups].detach().requires_grad_(grad) for d in self.delta]
        return self.live


def _search(clf: Classifier, x: torch.Tensor, y: torch.Tensor | np.ndarray, *, ks: list[int],
            untargeted: bool, n_images: int, steps: int, eps_min: float, eps_max: float, inner: int,
            seed: int, progress: bool) -> dict[str, Any]:
    """The targeted searches of classes ``ks`` and (``untargeted``) the untargeted probe, batched."""
    y_np = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    C = clf.num_classes
    idx = _stratified(y_np, n_images, seed)
    dev = x.device
    pool = x[torch.as_tensor(idx, device=dev)].detach()
    yp = torch.as_tensor(y_np[idx], device=dev).long()
    n = len(idx)
    # groups: one per searched class, then the untargeted one (target = the image's own label)
    K = len(ks) + int(untargeted)
    kt = torch.as_tensor(ks, device=dev)
    valid = torch.ones((K, n), device=dev)
    valid[: len(ks)] = (yp[None, :] != kt[:, None]).float()
    n_valid = valid.sum(1).clamp_min(1)
    eps = np.exp(np.linspace(math.log(eps_min), math.log(eps_max), steps))
    layers = neuron_layers(clf)
    dtype = next((p.dtype for p in clf.model.parameters() if p.is_floating_point()), torch.float32)
    noise = _Noise(layers, K, dev, torch.float32)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for d in noise.delta:
        d.copy_((torch.rand(d.shape, generator=gen) * 2 - 1) * eps[0])
    curve = np.zeros((len(ks), steps))
    acc = np.zeros(steps)
    share = np.zeros((C, steps))
    counts = np.zeros((C, steps))
    n_not = np.array([float((yp != c).sum()) for c in range(C)])
    with torch.no_grad(), _frozen(clf.model):
        acc_clean = float((clf.forward(pool.to(next(iter(clf.model.parameters())).dtype))[0].argmax(1) == yp)
                          .float().mean())
    per_image = max(1, pool[0].numel())
    kc = max(1, SEARCH_ELEMENTS // (per_image * n))
    groups_all = torch.arange(K, device=dev)
    live = np.arange(K)  # a class's search stops at its first crossing of the largest flip
    top = max(FLIPS)
    with _frozen(clf.model), noise.attached(), _bar(progress, steps, "neuron-noise search", "level") as bar:
        for i, e in enumerate(eps):
            for j in range(inner + 1):
                grad = j < inner
                g = [torch.zeros_like(d) for d in noise.delta] if grad else None
                for a in range(0, len(live), kc):
                    gi = groups_all[torch.as_tensor(live[a : a + kc], device=dev)]
                    leaves = noise.use(gi, grad)
                    batch = pool.repeat(len(gi), *[1] * (pool.dim() - 1))
                    with torch.set_grad_enabled(grad):
                        logits = clf.forward(batch.to(dtype))[0].float()
                    lab = _group_labels(gi, ks, kt, yp)
                    if not grad:
                        _record(logits, lab, gi, i, ks=ks, yp=yp, valid=valid, n_valid=n_valid, n_not=n_not,
                                curve=curve, acc=acc, counts=counts, share=share)
                        continue
                    assert g is not None
                    _add_grads(g, logits, lab, gi, leaves, noise, len(ks), valid, n_valid)
                noise.groups = None
                if g is not None:
                    _sign_step(noise, g, live, e)
            # searched classes that reached the largest share stop; their curve stays at its value
            done = [int(k) for k in live if k < len(ks) and curve[k, i] >= top]
            for k in done:
                curve[k, i + 1 :] = curve[k, i]
            live = np.array([k for k in live if k not in done], dtype=np.int64)
            if bar is not None:
                bar.update(1)
            # the untargeted probe alone stops once the accuracy is past the onset (below half)
            if len(live) == 0 or (not ks and acc[i] < 0.5 * acc_clean):
                acc[i + 1 :] = acc[i]
                counts[:, i + 1 :] = counts[:, i : i + 1]
                share[:, i + 1 :] = share[:, i : i + 1]
                break
    full_curve = np.full((C, steps), np.nan)
    full_curve[ks] = curve
    return {"eps": eps, "curve": full_curve, "acc": acc, "acc_clean": acc_clean, "share": share,
            "counts": counts, "layers": len(noise.fired), "n": n}


def _group_labels(gi: torch.Tensor, ks: list[int], kt: torch.Tensor, yp: torch.Tensor) -> torch.Tensor:
    """``(G, n)`` labels of the groups ``gi (G,)``: a searched class's target for each of the ``n``
    pool images, the image's own label ``yp (n,)`` for the untargeted group."""
    G, n = len(gi), len(yp)
    is_cls = gi < len(ks)
    lab = (torch.where(is_cls, kt[gi.clamp_max(len(ks) - 1)], torch.full_like(gi, -1)) if ks
           else torch.full_like(gi, -1))
    lab = lab.repeat_interleave(n).view(G, n)
    return torch.where(lab < 0, yp[None, :].expand(G, n), lab)


@torch.no_grad()
def _record(logits: torch.Tensor, lab: torch.Tensor, gi: torch.Tensor, i: int, *, ks: list[int],
            yp: torch.Tensor, valid: torch.Tensor, n_valid: torch.Tensor, n_not: np.ndarray,
            curve: np.ndarray, acc: np.ndarray, counts: np.ndarray, share: np.ndarray) -> None:
    """Record level ``i`` of the groups ``gi (G,)`` from their ``logits (G * n, C)``: a searched
    class's flip share in ``curve (K, steps)``; the untargeted probe's accuracy in ``acc (steps,)``
    and where its errors land in ``counts`` / ``share (C, steps)``."""
    G, n = len(gi), len(yp)
    pred = logits.argmax(1).view(G, n)
    for r, gk in enumerate(gi.tolist()):
        if gk < len(ks):
            curve[gk, i] = float(((pred[r] == lab[r]).float() * valid[gk]).sum() / n_valid[gk])
        else:
            acc[i] = float((pred[r] == yp).float().mean())
            for c in range(counts.shape[0]):
                counts[c, i] = float(((pred[r] == c) & (yp != c)).float().sum())
                share[c, i] = counts[c, i] / max(1.0, n_not[c])


def _add_grads(g: list[torch.Tensor], logits: torch.Tensor, lab: torch.Tensor, gi: torch.Tensor,
               leaves: list[torch.Tensor], noise: _Noise, n_ks: int, valid: torch.Tensor,
               n_valid: torch.Tensor) -> None:
    """Add the gradients of the groups ``gi (G,)``'s mean CE (``logits (G * n, C)``, ``lab (G, n)``)
    to their rows of ``g`` (one ``(K, ...)`` tensor per noised layer)."""
    G, n = lab.shape
    ce = F.cross_entropy(logits, lab.reshape(-1), reduction="none").view(G, n)
    per = (ce * valid[gi]).sum(1) / n_valid[gi]
    # targeted groups descend CE to k; the untargeted one ascends its own CE
    sign = torch.where(gi < n_ks, 1.0, -1.0).to(per.dtype)
    used = [t for t, lf in enumerate(leaves) if t in noise.fired]
    grads = torch.autograd.grad((per * sign).sum(), [leaves[t] for t in used], allow_unused=True)
    for t, gr in zip(used, grads):
        if gr is not None:
            g[t][gi] += gr


@torch.no_grad()
def _sign_step(noise: _Noise, g: list[torch.Tensor], live: np.ndarray, e: float) -> None:
    """One signed step of the ``live`` groups' noise, kept within ``[-e, e]``."""
    for d, gr in zip(noise.delta, g):
        li = torch.as_tensor(live, device=d.device)
        d[li] = (d[li] - 0.5 * e * gr[li].sign()).clamp(-e, e)


def onset_shares(acc_clean: float, acc: np.ndarray, counts: np.ndarray, drop: float = 0.2) -> np.ndarray:
    """``(C,)`` where the first errors go: summed over the noise levels at which the untargeted probe
    keeps at least ``1 - drop`` of the clean accuracy, the share of the misclassified reference
    images that land on k (when no such level has errors: the first level that has some)."""
    e = counts[:, acc >= (1 - drop) * acc_clean].sum(1)
    if e.sum() == 0:
        some = np.flatnonzero(counts.sum(0) > 0)
        e = counts[:, some[0]] if len(some) else e
    return e / e.sum() if e.sum() > 0 else np.zeros(len(e))


def neuron_scores(
    clf: Classifier,
    x: torch.Tensor,
    y: torch.Tensor | np.ndarray,
    *,
    n_images: int = 300,
    steps: int = 16,
    eps_min: float = 0.002,
    eps_max: float = 0.3,
    inner: int = 2,
    drop: float = 0.2,
    targeted: bool = False,
    n_targeted: int = 40,
    seed: int = 0,
    progress: bool = False,
) -> NeuronScores:
    """Where small adversarial neuron noise sends the reference images first, per class.

    The untargeted probe ascends the reference images' own loss with multiplicative noise on
    every layer's channels along a geometric schedule (warm-started); the score of class k is
    the share of the *first* errors (while accuracy stays within ``drop`` of its clean value)
    that land on k (:func:`onset_shares`). ``targeted`` also runs the per-class targeted bound
    search (its curves and bounds are returned; ``n_targeted`` images per class).

    Args:
        clf: the classifier (eval mode during the search; its parameters are not changed).
        x: ``(N, channels, H, W)`` model inputs (already preprocessed), on the model's device.
        y: ``(N,)`` their labels.
        n_images: stratified reference images of the untargeted probe.
        steps: points of the geometric noise schedule from ``eps_min`` to ``eps_max``.
        inner: signed-gradient steps at each point (step ``eps / 2``, warm-started from the last
            point's noise, clipped to ``[-eps, eps]``).
        seed: seeds the image sample and the random start.

    Returns:
        A :class:`NeuronScores` (``scores``: the onset shares).
    """
    t0 = time.perf_counter()
    kw: dict[str, Any] = {"steps": steps, "eps_min": eps_min, "eps_max": eps_max, "inner": inner,
                          "seed": seed, "progress": progress}
    u = _search(clf, x, y, ks=[], untargeted=True, n_images=n_images, **kw)
    C = clf.num_classes
    bounds = np.full(C, np.nan)
    curve = np.full((C, steps), np.nan)
    if targeted:
        t = _search(clf, x, y, ks=list(range(C)), untargeted=False, n_images=n_targeted, **kw)
        curve = t["curve"]
        bounds = np.array([first_crossing(t["eps"], c, max(FLIPS)) for c in curve])
    return NeuronScores(scores=onset_shares(u["acc_clean"], u["acc"], u["counts"], drop), bounds=bounds,
                        eps=u["eps"], flip_curve=curve, untargeted_acc=u["acc"], untargeted_share=u["share"],
                        acc_clean=u["acc_clean"], counts=u["counts"], layers=u["layers"], n_images=u["n"],
                        seconds=time.perf_counter() - t0)


def bound_scores(res: NeuronScores) -> np.ndarray:
    """The targeted search's score (when run): the mean over :data:`FLIPS` of
    ``log(median of the other classes' bounds / bound_k)``."""
    per_flip = [bound_ratio_scores(res.bounds_at(f)) for f in FLIPS]
    return np.asarray(np.mean(per_flip, axis=0))
