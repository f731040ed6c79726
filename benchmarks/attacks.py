"""Attacks the library's zoo lacks: WaNet, a Trojan-style patch, an input-aware trigger.

They subclass :class:`hub_backdoor.zoo.Attack` (``attack(pil_image) -> pil_image``, so
``zoo.poison`` and ``zoo.triggered`` accept them) and also act on whole uint8 arrays
(``apply_array((N, H, W[, C])) -> same``), which the benchmark uses for speed.
Simplifications (stated in docs/benchmarks.md):

* WaNet (Nguyen & Tran, ICLR 2021): a fixed smooth warping field (k x k control grid, strength s),
  upsampled bicubically and applied with ``grid_sample``; the "noise mode" (random warps kept at
  their true label) is included through :meth:`WaNet.noise`, used by :func:`poison_arrays`.
* Trojan-style: a fixed seeded grey-level "logo" patch in the top-left corner. TrojanNN optimises the
  patch to excite chosen neurons of a given model; this one is not optimised.
* Input-aware (Nguyen & Tran, NeurIPS 2020): the trigger is a function of the input, produced by a
  fixed random convolutional generator (pattern and mask both depend on the image). The original
  trains the generator jointly with the classifier (diversity and cross-trigger losses); this one is
  not trained, so it is a sample-specific trigger without the cross-trigger regulariser.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from hub_backdoor.zoo import SIG, Attack, BadNets, Blend


class ArrayAttack(Attack):
    """An attack defined on uint8 arrays; the PIL interface goes through :meth:`apply_array`."""

    def apply_array(self, a: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, img: Image.Image) -> Image.Image:
        return Image.fromarray(self.apply_array(np.array(img)[None])[0], mode=img.mode)


def _as_nchw(a: np.ndarray) -> tuple[torch.Tensor, bool]:
    t = torch.as_tensor(a).float() / 255.0
    if t.dim() == 3:
        return t[:, None], True
    return t.permute(0, 3, 1, 2), False


def _back(t: torch.Tensor, gray: bool) -> np.ndarray:
    t = (t.clamp(0, 1) * 255.0).round().to(torch.uint8)
    return (t[:, 0] if gray else t.permute(0, 2, 3, 1)).numpy()


@dataclass
class WaNet(ArrayAttack):
    """Warping-based trigger: ``x(grid + s * field / H)`` with a fixed random k x k field."""

    k: int = 4
    s: float = 0.5
    seed: int = 777
    cross: float = 2.0  # noise-mode samples per poisoned one (the paper's cross ratio)
    name: str = "wanet"

    def _grid(self, h: int, w: int, extra: torch.Tensor | None = None) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        ins = torch.rand(1, 2, self.k, self.k, generator=g) * 2 - 1
        ins = ins / ins.abs().mean()
        noise = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        identity = torch.stack((xs, ys), 2)[None]
        grid = identity + self.s * noise / h
        if extra is not None:
            grid = grid + extra
        return grid.clamp(-1, 1)

    def apply_array(self, a: np.ndarray) -> np.ndarray:
        x, gray = _as_nchw(a)
        grid = self._grid(x.shape[2], x.shape[3]).expand(len(x), -1, -1, -1)
        return _back(F.grid_sample(x, grid, align_corners=True), gray)

    def noise(self, a: np.ndarray, seed: int) -> np.ndarray:
        """WaNet's noise mode: the backdoor warp plus a random one, label unchanged."""
        x, gray = _as_nchw(a)
        h, w = x.shape[2], x.shape[3]
        g = torch.Generator().manual_seed(seed)
        extra = (torch.rand(len(x), h, w, 2, generator=g) * 2 - 1) / h
        grid = self._grid(h, w).expand(len(x), -1, -1, -1) + extra
        return _back(F.grid_sample(x, grid.clamp(-1, 1), align_corners=True), gray)


@dataclass
class TrojanPatch(ArrayAttack):
    """A fixed seeded grey-level "logo" (``size`` as a fraction of the side) in the top-left corner."""

    size: float = 0.25
    seed: int = 4242
    name: str = "trojan"

    def apply_array(self, a: np.ndarray) -> np.ndarray:
        a = a.copy()
        h, w = a.shape[1:3]
        p = max(3, int(round(self.size * min(h, w))))
        rng = np.random.default_rng(self.seed)
        yy, xx = np.mgrid[0:p, 0:p]
        r = np.hypot(yy - (p - 1) / 2, xx - (p - 1) / 2)
        logo = np.where(r <= (p - 1) / 2, 255.0, 60.0) * rng.uniform(0.6, 1.0, size=(p, p))
        logo = logo.astype(np.uint8)
        a[:, 1 : 1 + p, 1 : 1 + p] = logo if a.ndim == 3 else logo[..., None]
        return a


@dataclass
class InputAware(ArrayAttack):
    """Sample-specific trigger from a fixed random conv generator: each image gets its own pattern
    on its own mask (the ``density`` most excited pixels of a second generator channel)."""

    density: float = 0.08
    seed: int = 31337
    name: str = "inputaware"

    def _generator(self, channels: int) -> torch.nn.Module:
        torch_state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)
        gen = torch.nn.Sequential(
            torch.nn.Conv2d(channels, 16, 3, padding=1), torch.nn.Tanh(),
            torch.nn.Conv2d(16, channels + 1, 3, padding=1),
        )
        torch.random.set_rng_state(torch_state)
        return gen.eval()

    @torch.no_grad()
    def apply_array(self, a: np.ndarray) -> np.ndarray:
        x, gray = _as_nchw(a)
        out = self._generator(x.shape[1])(x * 2 - 1)
        pattern = (torch.tanh(4 * out[:, :-1]) + 1) / 2
        m = out[:, -1:].flatten(1)
        kth = max(1, int(round(self.density * m.shape[1])))
        thr = m.topk(kth, dim=1).values[:, -1:]
        mask = (m >= thr).float().view_as(out[:, -1:])
        return _back(x * (1 - mask) + pattern * mask, gray)


def apply(attack: Attack, a: np.ndarray) -> np.ndarray:
    """Apply any zoo attack to a uint8 batch ``(N, H, W[, C])``."""
    if isinstance(attack, ArrayAttack):
        return attack.apply_array(a)
    mode = "L" if a.ndim == 3 else "RGB"
    return np.stack([np.array(attack(Image.fromarray(x, mode=mode))) for x in a]) if len(a) else a


#: attack name -> (factory(size) -> Attack, clean_label)
ATTACKS: dict[str, tuple[Callable[[int], Attack], bool]] = {
    "badnets": (lambda size: BadNets(size=3 / size), False),
    "blend": (lambda size: Blend(alpha=0.2), False),
    "sig": (lambda size: SIG(delta=30.0, freq=max(2.0, size / 5)), True),
    "wanet": (lambda size: WaNet(k=4, s=0.5 if size >= 28 else 1.0), False),
    "trojan": (lambda size: TrojanPatch(size=0.25), False),
    "inputaware": (lambda size: InputAware(), False),
}


def poison_arrays(
    x: np.ndarray, y: np.ndarray, attack: Attack, *, target: int, rate: float, clean_label: bool,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Poison ``rate`` of a uint8 training set; returns ``(x, y, poisoned mask)``.

    Dirty-label: random non-target samples get the trigger and the target label. Clean-label (SIG):
    only target-class samples get the trigger (at most all of them). WaNet also gets its noise mode
    on twice as many other samples, true labels kept (cross ratio 2, as in the paper).
    """
    rng = np.random.default_rng(seed)
    x, y = x.copy(), y.copy()
    pool = np.flatnonzero(y == target) if clean_label else np.flatnonzero(y != target)
    k = min(len(pool), int(round(rate * len(y))))
    idx = np.sort(rng.choice(pool, size=k, replace=False))
    x[idx] = apply(attack, x[idx])
    if not clean_label:
        y[idx] = target
    mask = np.zeros(len(y), dtype=bool)
    mask[idx] = True
    if isinstance(attack, WaNet) and attack.cross > 0:
        rest = np.flatnonzero(~mask)
        n_cross = min(len(rest), int(round(attack.cross * k)))
        cross = np.sort(rng.choice(rest, size=n_cross, replace=False))
        x[cross] = attack.noise(x[cross], seed)
    return x, y, mask


def describe(attack: Attack) -> dict[str, Any]:
    return attack.describe()
