"""Adapter for timm classifiers.

A timm model names its classifier with ``get_classifier()``: one module, or a tuple of modules for
distilled models whose eval-mode logits are the mean of two heads. Each head module is reduced to a
live affine map (``nn.Linear``, a 1x1 ``nn.Conv2d``, BatchNorm folded into the following Linear, or an
``nn.Sequential`` of such layers) and a forward hook on it reads the embedding h(x).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CorruptWeightsError, UnsafeWeightsError, UnsupportedModelError
from .base import AffineHeadsClassifier, Combine, ToMode, module_path

__all__ = [
    "PICKLE_SUFFIXES",
    "TimmClassifier",
    "find_weights",
    "is_timm_model",
    "load_timm_folder",
    "reject_options",
    "timm_data_config",
    "timm_head_spec",
    "timm_preprocess",
    "unsafe_weights_error",
]

#: Largest input (height x width) a model may ask its preprocessing for: 4096 x 4096.
MAX_INPUT_PIXELS = 4096 * 4096

#: Pickle-based weight files; loading them runs arbitrary code unless ``weights_only`` holds.
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl")

#: timm classes whose heads read different tokens or branches (class and distillation token,
#: CrossViT branches): h is their concatenation. Other multi-head models share one pooled h.
_TOKEN_SPLIT_HEADS = frozenset({"VisionTransformerDistilled", "PoolingVisionTransformer", "CrossVit"})


# -- timm ----------------------------------------------------------------------------------------------
def is_timm_model(model: Any) -> bool:
    """True for a model built by timm (a timm class, or anything carrying timm's classifier API)."""
    if not isinstance(model, nn.Module) or not callable(getattr(model, "get_classifier", None)):
        return False
    return type(model).__module__.startswith("timm.") or hasattr(model, "pretrained_cfg")


def timm_head_spec(model: Any, prefix: str = "") -> tuple[list[str], Combine]:
    """The head module paths of a timm model (prefixed with ``prefix``) and how they combine."""
    cls = model.get_classifier()
    mods = list(cls) if isinstance(cls, (tuple, list, nn.ModuleList)) else [cls]
    # RepViT-style wrappers hold head and head_dist and average them on one pooled feature
    if len(mods) == 1 and hasattr(mods[0], "head") and hasattr(mods[0], "distillation"):
        wrapper = mods[0]
        mods = [wrapper.head, wrapper.head_dist] if wrapper.distillation else [wrapper.head]
    if any(isinstance(m, nn.Identity) for m in mods):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no classifier (num_classes=0); audit a model with its head"
        )
    paths = [prefix + module_path(model, m) for m in mods]
    if len(paths) == 1:
        return paths, "single"
    return paths, "concat" if type(model).__name__ in _TOKEN_SPLIT_HEADS else "shared"


def timm_data_config(model: nn.Module, pretrained_cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """timm's eval data config resolved against the model's current input size and channels."""
    try:
        from timm.data.model_config import resolve_input_data_config
    except ImportError:  # older timm: pretrained_cfg only
        from timm.data import resolve_data_config

        return dict(resolve_data_config({}, pretrained_cfg=pretrained_cfg, model=model))
    return dict(resolve_input_data_config(model, pretrained_cfg=pretrained_cfg))


def timm_preprocess(data_config: dict[str, Any]) -> Callable[[Any], torch.Tensor]:
    """PIL image -> ``(C, H, W)`` float tensor with timm's eval transform (resize, crop, normalize)."""
    from timm.data import create_transform
    from torchvision.transforms import Compose

    transform = create_transform(**data_config, is_training=False)
    channels = data_config["input_size"][0]
    steps = list(getattr(transform, "transforms", [transform]))
    if channels in (1, 3):  # grayscale/RGBA/palette images -> the mode the stem expects
        steps.insert(0, ToMode("L" if channels == 1 else "RGB"))
    return Compose(steps)


def _timm_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    # distilled models return (head, head_dist) when training with distillation: eval averages them
    return torch.stack(list(out)).mean(0) if isinstance(out, (tuple, list)) else out


def _timm_arch(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


class TimmClassifier(AffineHeadsClassifier):
    """A timm classifier: h(x) is what ``get_classifier()`` receives.

    Handles plain Linear heads, 1x1 conv heads (DLA), BatchNorm+Linear heads (LeViT, folded live) and
    distilled two-head models (DeiT, PiT, LeViT, EfficientFormer, RepViT; see
    :class:`AffineHeadsClassifier`). Preprocessing is timm's eval transform for the model's current
    input size (``timm.data`` config).

    Args:
        model: a model from ``timm.create_model``.
        source: provenance for reports.
        name: display name; defaults to the architecture.
        model_args: ``create_model`` keyword arguments needed to rebuild the model (e.g. ``img_size``),
            written by :meth:`save_pretrained`; timm >= 1.0.20 also records them itself.
    """

    kind = "timm"

    def __init__(
        self,
        model: nn.Module,
        *,
        source: dict[str, Any] | None = None,
        name: str | None = None,
        model_args: dict[str, Any] | None = None,
    ) -> None:
        if not is_timm_model(model):
            raise UnsupportedModelError(f"{type(model).__name__} is not a timm model")
        heads, combine = timm_head_spec(model)
        self.model_args = dict(model_args or {})
        self.data_config = timm_data_config(model)
        channels, height, width = self.data_config["input_size"]
        if int(height) * int(width) > MAX_INPUT_PIXELS:  # a batch of those would need tens of GB
            raise UnsupportedModelError(
                f"the model's input size {int(height)}x{int(width)} (pretrained_cfg.input_size) is over "
                f"{MAX_INPUT_PIXELS:,} pixels; fix the config or pass a transform of a sane size"
            )
        arch = _timm_arch(model)
        super().__init__(
            model,
            heads,
            combine=combine,
            logits_fn=_timm_logits,
            name=name or arch,
            input_channels=int(channels),
            input_size=(int(height), int(width)),
            preprocess=timm_preprocess(self.data_config),
            source=source or {"type": "timm", "architecture": arch},
        )

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` in timm's own format (``save_for_hf``).

        ``timm.create_model("local-dir:" + folder, pretrained=True)`` (or ``hf-hub:`` after upload)
        rebuilds the same model, model_args included, with the same logits.
        """
        from timm.models import save_for_hf

        folder = Path(folder)
        save_for_hf(self.model, str(folder), model_args=self.model_args or None, safe_serialization=True)
        return folder


# -- loading timm folders -------------------------------------------------------------------------------
def find_weights(path: Path, preferred: Sequence[str]) -> tuple[Path | None, list[Path]]:
    """The safetensors file to load (a preferred name, else the only ``*.safetensors``) and pickle files."""
    safe = next((path / n for n in preferred if (path / n).is_file()), None)
    if safe is None:
        found = sorted(path.glob("*.safetensors"))
        safe = found[0] if len(found) == 1 else None
    pickles = sorted(
        p
        for p in path.iterdir()
        if p.is_file() and (p.suffix in PICKLE_SUFFIXES or p.name.endswith(".bin.index.json"))
    )
    return safe, pickles


def unsafe_weights_error(path: Path, pickles: Sequence[Path]) -> UnsafeWeightsError:
    names = ", ".join(p.name for p in pickles)
    return UnsafeWeightsError(
        f"{path} has only pickle weights ({names}), which can run code when loaded; pass "
        "allow_pickle=True (--allow-pickle) if you trust the source"
    )


def reject_options(kw: dict[str, Any], what: str) -> None:
    """Raise on adapter options that do not apply (``None`` values are ignored)."""
    extra = sorted(k for k, v in kw.items() if v is not None)
    if extra:
        raise UnsupportedModelError(f"option(s) {', '.join(extra)} do not apply to {what}")


def _unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise UnsupportedModelError(f"the checkpoint holds a {type(obj).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_timm_folder(
    path: str | Path,
    *,
    allow_pickle: bool = False,
    name: str | None = None,
    source: dict[str, Any] | None = None,
    **kw: Any,
) -> TimmClassifier:
    """Load a folder written by ``timm.models.save_for_hf`` (``config.json`` with "architecture").

    The model is built from the config (``pretrained=False``, with its ``model_args`` and
    ``pretrained_cfg``) and the weights are loaded from ``model.safetensors``. Pickle weights
    (``pytorch_model.bin``, ``*.pth``) load only with ``allow_pickle`` (``torch.load(weights_only=True)``).
    """
    import safetensors.torch
    import timm

    reject_options(kw, "timm folders")
    path = Path(path)
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError, RecursionError) as e:
        raise UnsupportedModelError(f"{path}: cannot read config.json ({type(e).__name__})") from None
    arch = cfg.get("architecture")
    if not isinstance(arch, str):
        raise UnsupportedModelError(f"{path}/config.json has no timm 'architecture'")
    safe, pickles = find_weights(path, ("model.safetensors",))
    if safe is None and not pickles:
        raise UnsupportedModelError(f"{path} has no weights (model.safetensors or pytorch_model.bin)")
    if safe is None and not allow_pickle:
        raise unsafe_weights_error(path, pickles)
    weights = safe or next((p for p in pickles if p.name == "pytorch_model.bin"), pickles[0])
    try:
        # builds from config.json: architecture, model_args, pretrained_cfg; loads no weights
        model = timm.create_model(f"local-dir:{path.resolve()}", pretrained=False)
    except (RuntimeError, ValueError, TypeError, KeyError, AssertionError) as e:
        raise UnsupportedModelError(f"{path}: timm cannot build {arch!r} ({e})") from None
    if safe is not None:
        state = safetensors.torch.load_file(str(safe), device="cpu")
    else:
        try:
            obj = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - truncated zips, refused globals, bad pickles all land here
            detail = " ".join(str(e).split())[:200] or type(e).__name__
            raise CorruptWeightsError(
                f"{weights} cannot be loaded as plain weights (truncated, or it holds more than tensors: "
                f"{detail})"
            ) from None
        state = _unwrap_state_dict(obj)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:2])[:300]
        raise UnsupportedModelError(f"{weights} does not fit {arch}: {detail}") from None
    model.eval()
    return TimmClassifier(
        model,
        name=name or arch,
        source=source or {"type": "timm", "folder": str(path), "architecture": arch, "weights": weights.name},
        model_args=cfg.get("model_args") or None,
    )
