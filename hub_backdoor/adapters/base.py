"""The common contract every adapter fulfils: a classifier split as ``logits = W h(x) + b``.

Also the helpers the library adapters share: head modules reduced to live affine maps
(:class:`AffineHeadsClassifier`), module paths, and the PIL mode conversion of the preprocessing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..errors import DatasetError, NonFiniteLogitsError, NonLinearHeadError

__all__ = [
    "EXACTNESS_RTOL",
    "SEQUENTIAL_WRAPPERS",
    "AffineHeadsClassifier",
    "Classifier",
    "Combine",
    "HookedLinearClassifier",
    "ToMode",
    "find_linear_heads",
    "head_module_affine",
    "module_path",
]

#: Largest accepted relative error between ``W h + b`` and the model's own logits.
EXACTNESS_RTOL = 1e-4


class Classifier:
    """An image classifier whose last layer is affine in a penultimate embedding.

    Subclasses implement :meth:`forward` and :meth:`head_affine`; everything else is shared.

    Attributes:
        model: the wrapped ``nn.Module`` (timm, transformers or plain torch).
        kind: ``"timm"``, ``"transformers"`` or ``"torch"``; purified models keep it.
        name: a human-readable name (architecture or Hub id) used in reports.
        num_classes: C.
        embed_dim: d, the size of h(x).
        input_channels: channels the model expects (``None`` when unknown).
        input_size: ``(H, W)`` the preprocessing produces (``None`` when unknown).
        preprocess: maps one PIL image to a ``(channels, H, W)`` float tensor, the model's own
            preprocessing (timm data config, transformers image processor).
        source: where the model came from (Hub id, revision, folder), for reports and cards.
    """

    kind: str = "torch"

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        num_classes: int,
        embed_dim: int,
        input_channels: int | None = None,
        input_size: tuple[int, int] | None = None,
        preprocess: Callable[[Any], torch.Tensor] | None = None,
        source: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.name = name
        self.num_classes = int(num_classes)
        self.embed_dim = int(embed_dim)
        self.input_channels = input_channels
        self.input_size = input_size
        self.preprocess = preprocess
        self.source = dict(source or {})

    # -- to implement -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model; return ``(logits (N, C), h (N, d))``, both differentiable."""
        raise NotImplementedError

    def head_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The head as live, differentiable ``(W (C, d), b (C,))`` built from the model's parameters."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """``W h + b`` for embeddings ``h (N, d)``, differentiable in the head's parameters."""
        W, b = self.head_affine()
        return h.to(W.dtype) @ W.T + b

    def head_numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """The head as float64 numpy arrays ``W (C, d)``, ``b (C,)`` for the QP."""
        with torch.no_grad():
            W, b = self.head_affine()
        return W.detach().double().cpu().numpy(), b.detach().double().cpu().numpy()

    @torch.no_grad()
    def verify(self, x: torch.Tensor) -> float:
        """Check on a calibration batch that ``W h + b`` reproduces the logits.

        Returns the relative error; raises :class:`NonLinearHeadError` when it exceeds
        :data:`EXACTNESS_RTOL`, and :class:`NonFiniteLogitsError` on NaN/inf logits.
        """
        was_training = self.model.training
        self.model.eval()
        try:
            logits, h = self.forward(x)
        finally:
            self.model.train(was_training)
        return self.check_outputs(logits, h)

    @torch.no_grad()
    def check_outputs(self, logits: torch.Tensor, h: torch.Tensor) -> float:
        """The checks of :meth:`verify` on outputs already computed: ``logits (N, C)``, ``h (N, d)``."""
        logits = logits.detach().double()
        h = h.detach()
        if not torch.isfinite(logits).all():
            raise NonFiniteLogitsError(
                f"{type(self.model).__name__} produced non-finite logits on the calibration batch"
            )
        if h.shape[-1] != self.embed_dim or logits.shape[-1] != self.num_classes:
            raise NonLinearHeadError(
                f"{type(self.model).__name__}: embedding/logit shapes {tuple(h.shape)}/"
                f"{tuple(logits.shape)} do not match d={self.embed_dim}, C={self.num_classes}"
            )
        W, b = self.head_affine()
        recon = h.double() @ W.double().T + b.double()
        err = float((recon - logits).abs().max() / logits.abs().max().clamp_min(1e-12))
        if not err < EXACTNESS_RTOL:
            raise NonLinearHeadError(
                f"{type(self.model).__name__}: W h + b differs from the logits by {err:.2e} "
                f"(relative; limit {EXACTNESS_RTOL:.0e}); the head is not a single linear layer "
                "on the penultimate embedding"
            )
        return err

    def copy(self) -> Classifier:
        """A deep copy whose model can be trained without touching this one."""
        return copy.deepcopy(self)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, C={self.num_classes}, d={self.embed_dim}, "
            f"channels={self.input_channels}, size={self.input_size})"
        )


class HookedLinearClassifier(Classifier):
    """A classifier whose embedding is the input of one ``nn.Linear`` head, read by a forward hook.

    ``logits_fn(model, x)`` returns the model's logits; the hook records what the head saw.
    """

    def __init__(
        self,
        model: nn.Module,
        head: nn.Linear,
        *,
        logits_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(model, num_classes=head.out_features, embed_dim=head.in_features, **kw)
        self._head_path = module_path(model, head)
        self._logits_fn = logits_fn or (lambda m, x: m(x))

    @property
    def head(self) -> nn.Linear:
        head = self.model.get_submodule(self._head_path)
        assert isinstance(head, nn.Linear)  # checked when the classifier was built
        return head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen: list[torch.Tensor] = []
        handle = self.head.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0]))
        try:
            logits = self._logits_fn(self.model, x)
        finally:
            handle.remove()
        if len(seen) != 1:
            raise NonLinearHeadError(
                f"{type(self.model).__name__}: the head {self._head_path!r} ran {len(seen)} times "
                "in one forward pass; expected exactly once"
            )
        h = seen[0]
        return logits, h.reshape(h.shape[0], -1) if h.dim() != 2 else h

    def head_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        head = self.head
        b = head.bias if head.bias is not None else torch.zeros_like(head.weight[:, 0])
        return head.weight, b


def module_path(root: nn.Module, target: nn.Module) -> str:
    """The dotted path of ``target`` inside ``root`` (for ``get_submodule``)."""
    for name, mod in root.named_modules():
        if mod is target:
            return name
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(root).__name__}")


def find_linear_heads(model: nn.Module, num_classes: int) -> list[tuple[str, nn.Linear]]:
    """All ``nn.Linear`` submodules with ``out_features == num_classes``, in registration order."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.out_features == num_classes
    ]


# -- affine heads, shared by the timm and transformers adapters ----------------------------------
#: How several head modules combine into one affine map (see :class:`AffineHeadsClassifier`).
Combine = Literal["single", "shared", "concat"]

#: Layers that leave their input unchanged in eval mode.
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Flatten)

#: Non-``Sequential`` head wrappers that apply their children in registration order
#: (timm LeViT ``NormLinear``: BatchNorm1d, Dropout, Linear; transformers LeViT: BatchNorm1d, Linear).
SEQUENTIAL_WRAPPERS = frozenset({"NormLinear", "LevitClassificationLayer"})

# An affine map x -> W x + b under composition; diag=True stores W as its diagonal (d,) (BatchNorm).
_Map = tuple[torch.Tensor, torch.Tensor, bool]


def _layer_map(layer: nn.Module, where: str) -> _Map | None:
    """The live affine map of one layer (``None`` for pass-through layers)."""
    if isinstance(layer, _PASS_THROUGH):
        return None
    if isinstance(layer, nn.Linear):
        b: torch.Tensor = layer.bias if layer.bias is not None else layer.weight.new_zeros(layer.out_features)
        return layer.weight, b, False
    if isinstance(layer, nn.Conv2d):
        if (
            layer.kernel_size != (1, 1)
            or layer.stride != (1, 1)
            or layer.groups != 1
            or layer.padding not in ((0, 0), "valid")
        ):
            raise NonLinearHeadError(
                f"{where}: the head is a {layer.kernel_size} convolution (stride {layer.stride}, groups "
                f"{layer.groups}, padding {layer.padding}); only a 1x1 convolution is a linear head"
            )
        w = layer.weight.flatten(1)  # (C, d, 1, 1) -> (C, d)
        b = layer.bias if layer.bias is not None else w.new_zeros(w.shape[0])
        return w, b, False
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if layer.running_mean is None or layer.running_var is None:
            raise NonLinearHeadError(
                f"{where}: the head's {type(layer).__name__} keeps no running statistics, so it is not "
                "a fixed affine map"
            )
        # eval-mode BatchNorm: y = (x - mean) / sqrt(var + eps) * gamma + beta, folded live
        scale = torch.rsqrt(layer.running_var + layer.eps)
        if layer.weight is not None:
            scale = scale * layer.weight
        shift = -layer.running_mean * scale
        if layer.bias is not None:
            shift = shift + layer.bias
        return scale, shift, True
    if isinstance(layer, nn.Sequential) or type(layer).__name__ in SEQUENTIAL_WRAPPERS:
        return _sequence_map(layer.children(), where)
    raise NonLinearHeadError(
        f"{where}: the head contains a {type(layer).__name__}, which is not an affine layer; only heads "
        "made of Linear, 1x1 Conv, BatchNorm, Dropout and Flatten are supported"
    )


def _compose(first: _Map | None, then: _Map | None) -> _Map | None:
    """The map ``then(first(x))``."""
    if first is None or then is None:
        return then if first is None else first
    W1, b1, d1 = first
    W2, b2, d2 = then
    if d2:  # diagonal after anything: scale rows
        return (W2 * W1 if d1 else W2[:, None] * W1), W2 * b1 + b2, d1
    if d1:  # dense after diagonal: scale columns
        return W2 * W1[None, :], W2 @ b1 + b2, False
    return W2 @ W1, W2 @ b1 + b2, False


def _sequence_map(layers: Any, where: str) -> _Map | None:
    acc: _Map | None = None
    for layer in layers:
        acc = _compose(acc, _layer_map(layer, where))
    return acc


def head_module_affine(head: nn.Module, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A head module as live ``(W (C, d), b (C,))``; BatchNorm uses its running statistics (eval mode).

    Raises :class:`NonLinearHeadError` when the module is not affine or has no dense layer.
    """
    m = _layer_map(head, where)
    if m is None or m[2]:
        raise NonLinearHeadError(f"{where}: the head {type(head).__name__} has no linear layer")
    return m[0], m[1]


def _record(store: list[torch.Tensor], _module: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
    if args:
        store.append(args[0])


class AffineHeadsClassifier(Classifier):
    """A classifier whose logits are affine in the input(s) of one or more head modules.

    h(x) is read by forward hooks on the head modules (flattened to ``(N, d_i)``); ``combine`` says how
    the heads make the logits:

    - ``"single"``: one head, ``logits = W h + b``.
    - ``"shared"``: every head reads the same h and the logits are their mean, so
      ``W = mean_i W_i``, ``b = mean_i b_i`` (LeViT, SwiftFormer, EfficientFormer distilled heads).
    - ``"concat"``: head i reads its own ``h_i`` and the logits are their mean, so
      ``h = [h_1 | ... | h_n]``, ``W = [W_1 | ... | W_n] / n``, ``b = mean_i b_i`` (DeiT distilled:
      class and distillation token).

    Heads with BatchNorm are folded with the running statistics, i.e. they match eval-mode logits.

    Args:
        model: the wrapped module.
        heads: paths of the head modules inside ``model``.
        combine: see above.
        logits_fn: ``(model, x (N, C_in, H, W)) -> logits (N, C)``, the model's own forward.
        **kw: the remaining :class:`Classifier` fields (name, input_channels, ...).
    """

    def __init__(
        self,
        model: nn.Module,
        heads: Sequence[str],
        *,
        combine: Combine,
        logits_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
        **kw: Any,
    ) -> None:
        if not heads or (combine == "single") != (len(heads) == 1):
            raise ValueError(f"combine={combine!r} does not fit {len(heads)} head(s)")
        self._head_paths = tuple(heads)
        self._combine: Combine = combine
        self._logits_fn = logits_fn
        with torch.no_grad():
            parts = self._parts(model)
        classes = {W.shape[0] for W, _ in parts}
        dims = [W.shape[1] for W, _ in parts]
        if len(classes) != 1 or (combine == "shared" and len(set(dims)) != 1):
            raise NonLinearHeadError(
                f"{type(model).__name__}: heads {list(self._head_paths)} have shapes "
                f"{[tuple(W.shape) for W, _ in parts]}, which cannot be averaged"
            )
        embed_dim = sum(dims) if combine == "concat" else dims[0]
        super().__init__(model, num_classes=classes.pop(), embed_dim=embed_dim, **kw)

    @property
    def head_paths(self) -> tuple[str, ...]:
        """Paths of the head modules inside :attr:`model`."""
        return self._head_paths

    def _parts(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        where = type(model).__name__
        return [head_module_affine(model.get_submodule(p), f"{where}.{p}") for p in self._head_paths]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (N, C_in, H, W)`` -> ``(logits (N, C), h (N, d))``, both differentiable."""
        seen: list[list[torch.Tensor]] = [[] for _ in self._head_paths]
        handles = [
            self.model.get_submodule(p).register_forward_hook(partial(_record, store))
            for p, store in zip(self._head_paths, seen)
        ]
        try:
            logits = self._logits_fn(self.model, x)
        finally:
            for handle in handles:
                handle.remove()
        name = type(self.model).__name__
        for p, store in zip(self._head_paths, seen):
            if len(store) != 1:
                raise NonLinearHeadError(
                    f"{name}: the head {p!r} ran {len(store)} times in one forward pass; expected once"
                )
        inputs = [store[0] for store in seen]
        hs = [t.flatten(1) if t.dim() != 2 else t for t in inputs]
        if self._combine == "concat":
            return logits, torch.cat(hs, dim=1)
        if self._combine == "shared":
            for p, t in zip(self._head_paths[1:], inputs[1:]):
                if t is not inputs[0] and not torch.equal(t, inputs[0]):
                    raise NonLinearHeadError(
                        f"{name}: the head {p!r} reads other features than {self._head_paths[0]!r}; "
                        "the heads cannot share one embedding"
                    )
        return logits, hs[0]

    def head_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Live ``(W (C, d), b (C,))`` from the head parameters (and BatchNorm running statistics)."""
        parts = self._parts(self.model)
        if self._combine == "single":
            return parts[0]
        b = torch.stack([b for _, b in parts]).mean(0)
        if self._combine == "shared":
            return torch.stack([W for W, _ in parts]).mean(0), b
        return torch.cat([W for W, _ in parts], dim=1) / len(parts), b


# -- preprocessing --------------------------------------------------------------------------------
def to_8bit(img: Any) -> Any:
    """A PIL image of a 16-bit or 32-bit integer or float mode as the 8-bit grey image it shows.

    PIL's own ``convert`` clips such values to 0..255, which turns a 16-bit image into black and
    white. Here ``I;16*`` maps 0..65535 onto 0..255; ``I`` does the same when its values exceed
    255 (a 16-bit image) and keeps them otherwise; ``F`` is read as 0..1 or 0..255 by its range.
    Values outside those ranges are refused (:class:`~hub_backdoor.errors.DatasetError`). Other
    modes are returned as they are.
    """
    from PIL import Image

    mode = getattr(img, "mode", "")
    if not (mode.startswith("I") or mode == "F"):
        return img
    a = np.asarray(img, dtype=np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0:
        scale = None
    elif mode.startswith("I;16"):
        scale = 255.0 / 65535.0
    elif mode == "I":
        scale = 1.0 if hi <= 255 else 255.0 / 65535.0 if hi <= 65535 else None
    else:  # F
        scale = 255.0 if hi <= 1.0 else 1.0 if hi <= 255.0 else None
    if scale is None:
        raise DatasetError(
            f"a {mode} image with values in [{lo:g}, {hi:g}] has no faithful 8-bit reading; "
            "convert the reference images to 8-bit (or 16-bit unsigned) first"
        )
    return Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8), "L")


class ToMode:
    """Convert PIL images to a mode (grayscale/RGB), 16-bit and float images by their range
    (:func:`to_8bit`); leave tensors and arrays alone."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img: Any) -> Any:
        convert = getattr(img, "convert", None)
        if convert is None or img.mode == self.mode:
            return img
        img = to_8bit(img)
        return img.convert(self.mode) if img.mode != self.mode else img

    def __repr__(self) -> str:
        return f"ToMode({self.mode})"
