"""Load a classifier folder written by timm (``save_for_hf``) or transformers (``save_pretrained``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UnsupportedModelError
from .base import Classifier

__all__ = ["load_folder"]


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
