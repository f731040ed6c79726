"""Adapter for plain ``torch.nn.Module`` classifiers: the caller names the head (and features)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import NonLinearHeadError, UnsupportedModelError
from .base import HookedLinearClassifier, ToMode

__all__ = ["TorchClassifier", "default_preprocess"]


class TorchClassifier(HookedLinearClassifier):
    """A plain torch classifier with a named ``nn.Linear`` head.

    ``h(x)`` is what the head receives (flattened to ``(N, d)``). When ``features`` names a
    module, its flattened output is checked to be that same tensor, so a mis-named feature module
    is caught instead of silently auditing the wrong space.
    """

    kind = "torch"

    def __init__(
        self,
        model: nn.Module,
        *,
        head: str | nn.Module,
        features: str | nn.Module | None = None,
        input_channels: int | None = None,
        input_size: tuple[int, int] | None = None,
        preprocess: Callable[[Any], torch.Tensor] | None = None,
        name: str | None = None,
        source: dict[str, Any] | None = None,
    ) -> None:
        head_mod = _resolve(model, head, "head")
        if not isinstance(head_mod, nn.Linear):
            raise NonLinearHeadError(
                f"{type(model).__name__}: head {head!r} is a {type(head_mod).__name__}, not nn.Linear; "
                "name the final linear layer"
            )
        self._features_path = None
        if features is not None:
            feat = _resolve(model, features, "features")
            self._features_path = next(n for n, m in model.named_modules() if m is feat)
        if input_channels is None:
            conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
            input_channels = conv.in_channels if conv is not None else None
        super().__init__(
            model,
            head_mod,
            name=name or type(model).__name__,
            input_channels=input_channels,
            input_size=input_size,
            preprocess=preprocess or default_preprocess(input_channels, input_size),
            source=source or {"type": "torch", "class": type(model).__name__},
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._features_path is None:
            return super().forward(x)
        out: list[torch.Tensor] = []
        mod = self.model.get_submodule(self._features_path)
        handle = mod.register_forward_hook(lambda _m, _i, o: out.append(o))
        try:
            logits, h = super().forward(x)
        finally:
            handle.remove()
        f = out[-1].reshape(out[-1].shape[0], -1)
        if f.shape != h.shape or not torch.allclose(f, h, rtol=1e-5, atol=1e-6):
            raise NonLinearHeadError(
                f"{type(self.model).__name__}: the output of features {self._features_path!r} "
                f"{tuple(f.shape)} is not what the head receives {tuple(h.shape)}"
            )
        return logits, f


def _resolve(model: nn.Module, ref: str | nn.Module, what: str) -> nn.Module:
    if isinstance(ref, nn.Module):
        if not any(m is ref for m in model.modules()):
            raise UnsupportedModelError(f"the {what} module is not part of {type(model).__name__}")
        return ref
    try:
        return model.get_submodule(ref)
    except AttributeError:
        names = [n for n, _ in model.named_children()]
        raise UnsupportedModelError(
            f"{type(model).__name__} has no submodule {ref!r} for {what}; top-level children: {names}"
        ) from None


def default_preprocess(
    channels: int | None, size: tuple[int, int] | None
) -> Callable[[Any], torch.Tensor]:
    """PIL image or uint8 array -> float tensor in [0, 1], resized to ``size`` when given."""
    from torchvision.transforms import v2

    steps: list[Any] = [v2.ToImage()]
    if channels in (1, 3):
        steps.insert(0, ToMode("L" if channels == 1 else "RGB"))
    if size is not None:
        steps.append(v2.Resize(list(size), antialias=True))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(steps)
