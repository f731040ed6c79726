"""The common contract every adapter fulfils: a classifier split as ``logits = W h(x) + b``."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import NonFiniteLogitsError, NonLinearHeadError

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
        self._head_path = _module_path(model, head)
        self._logits_fn = logits_fn or (lambda m, x: m(x))

    @property
    def head(self) -> nn.Linear:
        return self.model.get_submodule(self._head_path)

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


def _module_path(root: nn.Module, target: nn.Module) -> str:
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
