"""Adapters: pull the penultimate embedding h(x) and the linear head (W, b) out of a classifier.

``load_classifier`` accepts a timm model, a transformers model, a plain torch module (with
``head=`` and optionally ``features=``), a local folder written by timm (``save_for_hf``) or
transformers (``save_pretrained``), or a Hub id (``org/name`` or ``org/name@revision``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import UnsupportedModelError
from .base import Classifier, HookedLinearClassifier, find_linear_heads
from .torch import TorchClassifier

__all__ = [
    "Classifier",
    "HookedLinearClassifier",
    "TorchClassifier",
    "adapt",
    "find_linear_heads",
    "load_classifier",
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
        path = Path(source).expanduser()
        if path.is_dir():
            return load_folder(
                path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, **kw
            )
        from ..datasets_io import looks_like_path
        from ..hub import download_model

        if path.exists():
            raise UnsupportedModelError(f"{source} is a file; pass a model folder or a Hub id (org/name)")
        if looks_like_path(str(source)):
            raise UnsupportedModelError(f"model folder {source} does not exist")
        folder, info = download_model(
            str(source), revision=revision, allow_pickle=allow_pickle, token=token
        )
        clf = load_folder(
            folder, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, **kw
        )
        clf.source = {**clf.source, **info}
        clf.name = info.get("repo_id", clf.name)
        return clf
    raise UnsupportedModelError(
        f"cannot load a classifier from a {type(source).__name__}; pass a model, a folder or a Hub id"
    )


def load_folder(
    path: str | Path, *, allow_pickle: bool = False, trust_remote_code: bool = False, **kw: Any
) -> Classifier:
    """Load a timm (``save_for_hf``) or transformers (``save_pretrained``) folder."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UnsupportedModelError(f"{path} has no config.json; not a timm or transformers model folder")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise UnsupportedModelError(f"{cfg_file} is not valid JSON ({e.msg})") from None
    if "architecture" in cfg and "model_type" not in cfg:
        from .timm import load_timm_folder

        return load_timm_folder(path, allow_pickle=allow_pickle, **kw)
    if "model_type" in cfg or "architectures" in cfg:
        from .transformers import load_transformers_folder

        return load_transformers_folder(
            path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, **kw
        )
    raise UnsupportedModelError(
        f"{cfg_file} names neither a timm 'architecture' nor a transformers 'model_type'"
    )
