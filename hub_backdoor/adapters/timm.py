"""Adapter for timm classifiers, and the affine-head machinery both library adapters share.

A timm model names its classifier with ``get_classifier()``: one module, or a tuple of modules for
distilled models whose eval-mode logits are the mean of two heads. Each head module is reduced to a
live affine map (``nn.Linear``, a 1x1 ``nn.Conv2d``, BatchNorm folded into the following Linear, or an
``nn.Sequential`` of such layers) and a forward hook on it reads the embedding h(x).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..errors import CorruptWeightsError, NonLinearHeadError, UnsafeWeightsError, UnsupportedModelError
from .base import Classifier, _module_path
from .torch import _ToMode

#: How several head modules combine into one affine map (see :class:`AffineHeadsClassifier`).
Combine = Literal["single", "shared", "concat"]

#: Pickle-based weight files; loading them runs arbitrary code unless ``weights_only`` holds.
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl")

#: Layers that leave their input unchanged in eval mode.
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Flatten)

#: Non-``Sequential`` head wrappers that apply their children in registration order
#: (timm LeViT ``NormLinear``: BatchNorm1d, Dropout, Linear; transformers LeViT: BatchNorm1d, Linear).
SEQUENTIAL_WRAPPERS = frozenset({"NormLinear", "LevitClassificationLayer"})

#: timm classes whose heads read different tokens or branches (class and distillation token,
#: CrossViT branches): h is their concatenation. Other multi-head models share one pooled h.
_TOKEN_SPLIT_HEADS = frozenset({"VisionTransformerDistilled", "PoolingVisionTransformer", "CrossVit"})

# An affine map x -> W x + b under composition; diag=True stores W as its diagonal (d,) (BatchNorm).
_Map = tuple[torch.Tensor, torch.Tensor, bool]


# -- affine heads, shared with the transformers adapter ---------------------------------------------
def _layer_map(layer: nn.Module, where: str) -> _Map | None:
    """The live affine map of one layer (``None`` for pass-through layers)."""
    if isinstance(layer, _PASS_THROUGH):
        return None
    if isinstance(layer, nn.Linear):
        b = layer.bias if layer.bias is not None else layer.weight.new_zeros(layer.out_features)
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


# -- timm ----------------------------------------------------------------------------------------------
def is_timm_model(model: Any) -> bool:
    """True for a model built by timm (a timm class, or anything carrying timm's classifier API)."""
    if not isinstance(model, nn.Module) or not callable(getattr(model, "get_classifier", None)):
        return False
    return type(model).__module__.startswith("timm.") or hasattr(model, "pretrained_cfg")


def timm_head_spec(model: nn.Module, prefix: str = "") -> tuple[list[str], Combine]:
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
    paths = [prefix + _module_path(model, m) for m in mods]
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
        steps.insert(0, _ToMode("L" if channels == 1 else "RGB"))
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
    except (OSError, json.JSONDecodeError) as e:
        raise UnsupportedModelError(f"{path}: cannot read config.json ({e})") from None
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
