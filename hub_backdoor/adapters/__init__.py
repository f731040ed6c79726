"""Adapters: pull the penultimate embedding h(x) and the linear head (W, b) out of a classifier.

``load_classifier`` accepts a timm model, a transformers model, a plain torch module (with
``head=`` and optionally ``features=``), a local folder written by timm (``save_for_hf``) or
transformers (``save_pretrained``), or a Hub id (``org/name`` or ``org/name@revision``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..errors import UnsupportedModelError
from .base import Classifier, HookedLinearClassifier, find_linear_heads
from .folder import load_folder
from .loading import load_model
from .torch import TorchClassifier

__all__ = [
    "Classifier",
    "HookedLinearClassifier",
    "TorchClassifier",
    "adapt",
    "find_linear_heads",
    "load_classifier",
    "load_folder",
]


def adapt(model: nn.Module, **kw: Any) -> Classifier:
    """Wrap an in-memory model in the adapter for its library."""
    from .timm import TimmClassifier, is_timm_model
    from .transformers import TransformersClassifier, is_transformers_model

    if kw.get("head") is not None:
        return TorchClassifier(model, **kw)
    if is_transformers_model(model):
        return TransformersClassifier(model, **kw)
    if is_timm_model(model):
        return TimmClassifier(model, **kw)
    raise UnsupportedModelError(
        f"{type(model).__name__} is neither a timm nor a transformers model; pass head= (and "
        "optionally features=) naming its final nn.Linear"
    )


def load_classifier(
    source: Any,
    *,
    revision: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    token: str | bool | None = None,
    **kw: Any,
) -> Classifier:
    """Load or wrap a classifier from any supported source.

    Args:
        source: a :class:`Classifier` (returned as is), an ``nn.Module``, a local folder, or a
            Hub id ``org/name[@revision]``.
        revision: Hub revision (branch, tag or commit); overrides ``@revision`` in ``source``.
        allow_pickle: also load ``.bin``/``.pth`` weights (unsafe: runs pickle). Off by default.
        trust_remote_code: let transformers run code from the repo. Off by default.
        token: Hub token; ``None`` uses the usual huggingface_hub places (HF_TOKEN, login).
        **kw: adapter options (``head=``, ``features=``, ``processor=``, ...).
    """
    if isinstance(source, Classifier):
        return source
    if isinstance(source, nn.Module):
        return adapt(source, **kw)
    if isinstance(source, (str, Path)):
        return load_model(
            str(source),
            revision=revision,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
            token=token,
            **kw,
        ).clf
    raise UnsupportedModelError(
        f"cannot load a classifier from a {type(source).__name__}; pass a model, a folder or a Hub id"
    )
