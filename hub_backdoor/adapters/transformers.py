"""Adapter for transformers image classifiers (``*ForImageClassification``).

The head is found structurally: the ``nn.Linear`` (or 1x1 conv) whose out_features equals
``config.num_labels``, outside the backbone (``base_model_prefix``), widened to an enclosing
``nn.Sequential`` / BatchNorm+Linear wrapper so that BatchNorm is folded and MLP heads are refused.
A forward hook on it reads h(x); ``Classifier.verify`` checks ``W h + b`` against the logits on a
calibration batch. Models with two averaged heads (DeiT and LeViT with teacher, SwiftFormer) use a
fixed table, and ``TimmWrapperForImageClassification`` delegates to the timm logic.
"""

from __future__ import annotations

import inspect
import json
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import NonLinearHeadError, UnsupportedModelError
from .base import SEQUENTIAL_WRAPPERS, AffineHeadsClassifier, Combine, ToMode, module_path
from .timm import (
    find_weights,
    reject_options,
    timm_data_config,
    timm_head_spec,
    timm_preprocess,
    unsafe_weights_error,
)

__all__ = [
    "ProcessorPreprocess",
    "TransformersClassifier",
    "default_image_processor",
    "is_transformers_model",
    "load_transformers_folder",
    "transformers_head_spec",
]

#: Classes with two averaged heads: (head attributes, how their inputs combine).
_MULTI_HEADS: dict[str, tuple[tuple[str, ...], Combine]] = {
    # class token -> cls_classifier, distillation token -> distillation_classifier
    "DeiTForImageClassificationWithTeacher": (("cls_classifier", "distillation_classifier"), "concat"),
    # both BatchNorm+Linear heads read the mean-pooled sequence
    "LevitForImageClassificationWithTeacher": (("classifier", "classifier_distill"), "shared"),
    # both Linear heads read the normalised, pooled features
    "SwiftFormerForImageClassification": (("head", "dist_head"), "shared"),
}

#: Class-name prefixes whose logits come from a non-linear decoder (cross-attention on learned queries).
_NON_LINEAR_PREFIXES = ("Perceiver",)

#: Class-name prefixes whose inputs are not a plain pixel tensor (NaFlex patches + spatial shapes).
_NON_PIXEL_PREFIXES = ("Siglip2",)

_SAFE_NAMES = ("model.safetensors", "model.safetensors.index.json")


def is_transformers_model(model: Any) -> bool:
    """True for a transformers ``PreTrainedModel`` (checked without importing transformers)."""
    return isinstance(model, nn.Module) and any(
        c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.")
        for c in type(model).__mro__
    )


def _is_timm_wrapper(model: Any) -> bool:
    return getattr(model.config, "model_type", None) == "timm_wrapper" and hasattr(model, "timm_model")


def _is_image_classifier(model: Any) -> bool:
    if "ImageClassification" in type(model).__name__:
        return True
    from transformers import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING

    try:
        mapped: Any = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING[type(model.config)]
    except KeyError:
        return False
    return isinstance(model, tuple(mapped) if isinstance(mapped, (tuple, list)) else mapped)


def _is_head_layer(m: nn.Module, num_labels: int) -> bool:
    if isinstance(m, nn.Linear):
        return m.out_features == num_labels
    return isinstance(m, nn.Conv2d) and m.out_channels == num_labels and m.kernel_size == (1, 1)


def _widen(model: nn.Module, path: str) -> str:
    """Climb from a head layer to the outermost enclosing ``Sequential`` / BatchNorm+Linear wrapper."""
    while "." in path:
        parent = path.rsplit(".", 1)[0]
        mod = model.get_submodule(parent)
        if not (isinstance(mod, nn.Sequential) or type(mod).__name__ in SEQUENTIAL_WRAPPERS):
            break
        path = parent
    return path


def transformers_head_spec(model: Any) -> tuple[list[str], Combine]:
    """The head module paths of a transformers image classifier and how they combine."""
    name = type(model).__name__
    num_labels = int(model.config.num_labels)
    if name in _MULTI_HEADS:
        attrs, combine = _MULTI_HEADS[name]
        mods = [getattr(model, a, None) for a in attrs]
        if any(m is None or isinstance(m, nn.Identity) for m in mods):
            raise UnsupportedModelError(f"{name} has no classification heads (num_labels={num_labels})")
        return [module_path(model, m) for m in mods if m is not None], combine
    backbone = getattr(model, "base_model_prefix", "") or ""
    found = [
        p
        for p, m in model.named_modules()
        if p
        and _is_head_layer(m, num_labels)
        and not (backbone and (p == backbone or p.startswith(backbone + ".")))
    ]
    heads = list(dict.fromkeys(_widen(model, p) for p in found))  # dedupe, keep order
    if not heads:
        raise NonLinearHeadError(
            f"{name}: no linear layer with out_features == num_labels ({num_labels}) outside the backbone"
        )
    if len(heads) > 1:
        raise UnsupportedModelError(
            f"{name}: several candidate heads {heads} map to num_labels ({num_labels}); which one "
            "produces the logits is unknown"
        )
    return heads, "single"


def _transformers_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(**{getattr(model, "main_input_name", "pixel_values"): x})
    if isinstance(out, tuple):
        return out[0]
    logits = getattr(out, "logits", None)
    if logits is None:  # PPLCNet returns its logits as last_hidden_state
        logits = out.last_hidden_state
    return logits


# -- preprocessing ------------------------------------------------------------------------------------
class ProcessorPreprocess:
    """PIL image -> ``(C, H, W)`` float tensor through a transformers image processor.

    Grayscale / RGBA / palette images are converted to the mode the model expects first.
    """

    def __init__(self, processor: Any, channels: int | None) -> None:
        self.processor = processor
        self._mode = ToMode("L" if channels == 1 else "RGB") if channels in (1, 3) else None

    def __call__(self, img: Any) -> torch.Tensor:
        if self._mode is not None:
            img = self._mode(img)
        return self.processor(images=img, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"ProcessorPreprocess({type(self.processor).__name__})"


def _config_image_size(config: Any) -> tuple[int, int] | None:
    size = getattr(config, "image_size", None)
    if isinstance(size, int):
        return size, size
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[0]), int(size[1])
    return None


def _probe_size(processor: Any) -> tuple[int, int]:
    from PIL import Image

    out = processor(images=Image.new("RGB", (48, 40), (128, 128, 128)), return_tensors="pt")
    h, w = out["pixel_values"].shape[-2:]
    return int(h), int(w)


def _scaled(sizes: Any, ratio: float) -> dict[str, int] | None:
    if sizes is None:
        return None
    scalable = ("height", "width", "shortest_edge", "longest_edge")
    return {k: max(1, round(v * ratio)) for k, v in dict(sizes).items() if v is not None and k in scalable}


def _sized_processor(cls: type, target: tuple[int, int]) -> Any:
    """``cls()`` with its resize and crop scaled together so that its output is ``target`` (H, W)."""
    proc = cls()
    got = _probe_size(proc)
    if got == target:
        return proc
    ratio = target[0] / got[0]
    kw: dict[str, Any] = {"size": _scaled(getattr(proc, "size", None), ratio)}
    crop = _scaled(getattr(proc, "crop_size", None), ratio)
    if crop:
        kw["crop_size"] = crop
    proc = cls(**kw)
    if _probe_size(proc) != target:  # the processor sizes by other rules: fix the output size
        proc = cls(size={"height": target[0], "width": target[1]}, do_center_crop=False)
    if _probe_size(proc) != target:
        raise ValueError(f"{cls.__name__} does not produce {target} images")
    return proc


def default_image_processor(config: Any) -> Any:
    """The library's default image processor for ``config.model_type``, sized to ``config.image_size``.

    Used when a folder ships no ``preprocessor_config.json``. Size and crop are scaled together so the
    output is ``config.image_size`` (224 when the config has none). Unknown model types, and processors
    that need arguments or fail on a test image, give way to a ``ViTImageProcessor`` (resize, rescale,
    normalise with mean = std = 0.5).
    """
    from transformers import ViTImageProcessor
    from transformers.models.auto.image_processing_auto import (
        IMAGE_PROCESSOR_MAPPING_NAMES,
        get_image_processor_class_from_name,
    )

    target = _config_image_size(config) or (224, 224)
    names: Any = IMAGE_PROCESSOR_MAPPING_NAMES.get(getattr(config, "model_type", None) or "") or {}
    if isinstance(names, dict):  # transformers 5: {backend: class}; torchvision first, as AutoImageProcessor
        names = [names.get("torchvision"), *names.values()]
    names = list(dict.fromkeys(names)) if isinstance(names, (list, tuple)) else [names]
    for n in names:
        cls = get_image_processor_class_from_name(n) if n else None
        if cls is None:
            continue
        try:
            return _sized_processor(cls, target)
        except Exception:  # any failure of a default only means: try the next one
            continue
    return ViTImageProcessor(size={"height": target[0], "width": target[1]})


# -- the classifier ---------------------------------------------------------------------------------
class TransformersClassifier(AffineHeadsClassifier):
    """A transformers image classifier: h(x) is what the classification head receives.

    Handles single Linear heads (``Sequential`` wrappers included), BatchNorm+Linear heads (folded
    live), the two-head models in ``_MULTI_HEADS``, PPLCNet (logits in ``last_hidden_state``) and
    ``TimmWrapperForImageClassification`` (timm's head logic and preprocessing). Perceiver and MLP
    heads raise :class:`NonLinearHeadError`.

    Args:
        model: a ``*ForImageClassification`` model.
        processor: its image processor; ``None`` builds :func:`default_image_processor` (timm's
            transform for TimmWrapper models).
        source: provenance for reports.
        name: display name; defaults to ``config._name_or_path`` or the class name.
    """

    kind = "transformers"

    def __init__(
        self,
        model: nn.Module,
        *,
        processor: Any = None,
        source: dict[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        if not is_transformers_model(model):
            raise UnsupportedModelError(f"{type(model).__name__} is not a transformers model")
        cls_name = type(model).__name__
        config = model.config
        if cls_name.startswith(_NON_LINEAR_PREFIXES):
            raise NonLinearHeadError(
                f"{cls_name}: the logits come from a cross-attention decoder on learned queries, not from "
                "a linear layer on an image embedding; not supported"
            )
        if (
            cls_name.startswith(_NON_PIXEL_PREFIXES)
            or getattr(model, "main_input_name", "") != "pixel_values"
        ):
            raise UnsupportedModelError(
                f"{cls_name} does not take a (N, C, H, W) pixel tensor (it needs patch sequences or "
                "colour tokens); not supported"
            )
        if not _is_image_classifier(model):
            raise UnsupportedModelError(
                f"{cls_name} is not an image classifier; load the model with AutoModelForImageClassification"
            )
        preprocess: Callable[[Any], torch.Tensor]
        if _is_timm_wrapper(model):
            timm_model: Any = model.timm_model
            heads, combine = timm_head_spec(timm_model, prefix="timm_model.")
            data_config = timm_data_config(timm_model, getattr(config, "pretrained_cfg", None))
            channels = int(data_config["input_size"][0])
            if processor is None:
                preprocess = timm_preprocess(data_config)
                size = (int(data_config["input_size"][1]), int(data_config["input_size"][2]))
            else:
                preprocess = ProcessorPreprocess(processor, channels)
                size = _probe_size(processor)
        else:
            heads, combine = transformers_head_spec(model)
            channels = int(getattr(config, "num_channels", 3) or 3)
            processor = processor if processor is not None else default_image_processor(config)
            preprocess = ProcessorPreprocess(processor, channels)
            try:
                size = _probe_size(processor)
            except Exception as e:  # third-party processors fail in many ways
                raise UnsupportedModelError(
                    f"{cls_name}: its image processor {type(processor).__name__} fails on a test image "
                    f"({type(e).__name__}: {str(e).strip()[:200]})"
                ) from None
        self.processor = processor
        super().__init__(
            model,
            heads,
            combine=combine,
            logits_fn=_transformers_logits,
            name=name or getattr(config, "_name_or_path", "") or cls_name,
            input_channels=channels,
            input_size=size,
            preprocess=preprocess,
            source=source
            or {"type": "transformers", "class": cls_name, "model_type": getattr(config, "model_type", None)},
        )

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the model (safetensors) and its image processor so ``from_pretrained`` reloads them.

        TimmWrapper models also get timm's ``pretrained_cfg`` (input size, mean, std, crop) in
        ``config.json``, which is where transformers and timm read their preprocessing.
        """
        folder = Path(folder)
        model: Any = self.model  # a transformers PreTrainedModel
        save = model.save_pretrained
        if "safe_serialization" in inspect.signature(save).parameters:  # transformers 4.x
            save(str(folder), safe_serialization=True)
        else:
            save(str(folder))
        if _is_timm_wrapper(self.model):
            self._write_timm_pretrained_cfg(folder)
        elif self.processor is not None and hasattr(self.processor, "save_pretrained"):
            self.processor.save_pretrained(str(folder))
        return folder

    def _write_timm_pretrained_cfg(self, folder: Path) -> None:
        cfg_file = folder / "config.json"
        cfg = json.loads(cfg_file.read_text())
        if "pretrained_cfg" in cfg:
            return
        model: Any = self.model
        timm_model = model.timm_model
        pre = {
            k: v
            for k, v in dict(getattr(timm_model, "pretrained_cfg", {}) or {}).items()
            if k not in ("url", "file", "hf_hub_id", "source", "state_dict", "num_classes")
            and isinstance(v, (str, int, float, bool, list, tuple, type(None)))
        }
        data = timm_data_config(timm_model)
        pre.update({k: list(v) if isinstance(v, tuple) else v for k, v in data.items()})
        cfg["pretrained_cfg"] = pre
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# -- loading transformers folders ----------------------------------------------------------------------
def _load_processor(path: Path, trust_remote_code: bool) -> Any:
    """The saved image processor, or ``None`` when the folder has none (a default is built later)."""
    if not any((path / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
        return None
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(
            f"{path}: cannot load the image processor ({e}); using the default for the model type",
            stacklevel=2,
        )
        return None


def _classifier_config(path: Path, trust_remote_code: bool) -> Any:
    """The folder's config, refused (:class:`UnsupportedModelError`) when transformers cannot read
    it or it is not an image classifier's."""
    from transformers import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING, AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsupportedModelError(f"{path}: transformers cannot read config.json ({first})") from None
    remote = "AutoModelForImageClassification" in (getattr(config, "auto_map", None) or {})
    if type(config) not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING and not (remote and trust_remote_code):
        archs = ", ".join(getattr(config, "architectures", None) or []) or "no architectures"
        raise UnsupportedModelError(
            f"{path}: model_type {config.model_type!r} ({archs}) is not an image classifier"
        )
    return config


def load_transformers_folder(
    path: str | Path,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    processor: Any = None,
    name: str | None = None,
    source: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    **kw: Any,
) -> TransformersClassifier:
    """Load a folder written by ``save_pretrained`` with ``AutoModelForImageClassification``.

    Weights come from safetensors; pickle-only folders (``pytorch_model.bin``) raise
    :class:`UnsafeWeightsError` unless ``allow_pickle``. The model is loaded in ``dtype`` (float32 by
    default rather than transformers' ``"auto"``, so the exactness check and the QP see full
    precision). Configs that are not image classifiers, and checkpoints that leave weights
    uninitialised, raise :class:`UnsupportedModelError`.
    """
    from transformers import AutoModelForImageClassification

    reject_options(kw, "transformers folders")
    path = Path(path)
    safe, pickles = find_weights(path, _SAFE_NAMES)
    if safe is None and not pickles:
        raise UnsupportedModelError(f"{path} has no weights (model.safetensors or pytorch_model.bin)")
    if safe is None and not allow_pickle:
        raise unsafe_weights_error(path, pickles)
    config = _classifier_config(path, trust_remote_code)
    try:
        model, info = AutoModelForImageClassification.from_pretrained(
            str(path),
            config=config,
            use_safetensors=safe is not None,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            output_loading_info=True,
        )
    except (pickle.UnpicklingError, EOFError) as e:
        # a pickle that weights-only loading refuses (it names code to run) or a broken one: never
        # loaded the unsafe way
        raise UnsupportedModelError(
            f"{path}: transformers cannot load the model: its pickle weights are broken or hold objects "
            f"that safe (weights-only) loading refuses ({type(e).__name__}); ask for safetensors weights"
        ) from None
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsupportedModelError(f"{path}: transformers cannot load the model ({first[:300]})") from None
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise UnsupportedModelError(
            f"{path}: {len(missing)} weight(s) are missing from the checkpoint (e.g. {sorted(missing)[0]}) "
            "and would be random; is this an image-classification checkpoint?"
        )
    model.eval()
    if processor is None and not _is_timm_wrapper(model):
        processor = _load_processor(path, trust_remote_code)
    weights = safe or pickles[0]
    return TransformersClassifier(
        model,
        processor=processor,
        name=name or path.name,
        source=source
        or {
            "type": "transformers",
            "folder": str(path),
            "class": type(model).__name__,
            "model_type": config.model_type,
            "weights": weights.name,
        },
    )
