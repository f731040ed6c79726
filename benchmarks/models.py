"""Architectures of the benchmark zoo, each wrapped in a library :class:`Classifier`.

* ``preact18``: PreAct-ResNet18 (He et al. 2016, the BackdoorBench definition) as plain torch,
  with a ``width`` knob (64 is the standard network; the CPU quick suite uses 8).
* ``vit``: a timm VisionTransformer at 32x32 (patch 4); ``convnet``: a timm MobileNetV3 (conv + BN,
  so CLP applies). The quick suite uses timm's tiny ``test_*`` variants of the same families.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hub_backdoor.adapters.base import Classifier
from hub_backdoor.adapters.torch import TorchClassifier


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + sc


class PreActResNet18(nn.Module):
    """PreAct-ResNet18 for small images; ``h(x)`` is the pooled input of ``linear`` (d = 8 width)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(in_channels, w, 3, 1, 1, bias=False)
        planes, layers, in_planes = [w, 2 * w, 4 * w, 8 * w], [], w
        for i, p in enumerate(planes):
            blocks = []
            for s in (1 if i == 0 else 2, 1):
                blocks.append(PreActBlock(in_planes, p, s))
                in_planes = p
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = nn.BatchNorm2d(8 * w)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(8 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return self.linear(torch.flatten(self.avgpool(out), 1))


def _identity(x: Any) -> Any:
    return x


class LogitsOnly(nn.Module):
    """A transformers image classifier seen as ``x -> logits`` (the harness's training loops call
    ``model(x)``); the audit still goes through the transformers adapter on ``self.m``."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(pixel_values=x).logits


#: architecture name -> (factory(num_classes, channels, size, seed, **kw) -> Classifier, the
#: parameter-name prefixes of "the last stage + head" for the purification layer study)
def preact18(num_classes: int, channels: int, size: int, seed: int, width: int = 64) -> Classifier:
    torch.manual_seed(seed)
    m = PreActResNet18(num_classes, channels, width)
    return TorchClassifier(m, head="linear", input_channels=channels, input_size=(size, size),
                           preprocess=_identity, name=f"preact-resnet18-w{width}")


def timm_arch(arch: str, num_classes: int, channels: int, size: int, seed: int, **kw: Any) -> Classifier:
    import timm

    from hub_backdoor.adapters.timm import TimmClassifier

    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=channels, **kw)
    clf = TimmClassifier(model)
    clf.preprocess = _identity
    return clf


def hf_convnext(num_classes: int, channels: int, size: int, seed: int,
                hidden: tuple[int, ...] = (16, 32, 64, 128),
                depths: tuple[int, ...] = (1, 1, 2, 1)) -> Classifier:
    """A transformers ``ConvNextForImageClassification`` built from a config (patch 2 for 32x32)."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    torch.manual_seed(seed)
    cfg = ConvNextConfig(num_channels=channels, hidden_sizes=list(hidden), depths=list(depths),
                         num_labels=num_classes, patch_size=2, image_size=size)
    m = LogitsOnly(ConvNextForImageClassification(cfg))
    return TorchClassifier(m, head="m.classifier", input_channels=channels, input_size=(size, size),
                           preprocess=_identity, name="transformers-convnext-" + "-".join(map(str, hidden)))


def audit_view(clf: Classifier) -> Classifier:
    """The classifier the audit sees: a transformers model through the library's transformers
    adapter (its head discovery and checks), everything else as built."""
    if isinstance(clf.model, LogitsOnly):
        from hub_backdoor.adapters.transformers import TransformersClassifier

        view = TransformersClassifier(clf.model.m)
        view.preprocess = _identity
        return view
    return clf


ARCHS: dict[str, dict[str, Any]] = {
    # full suite
    "preact18": {"factory": preact18, "kw": {"width": 64}, "last": ["layer4", "bn", "linear"]},
    "vit": {"factory": timm_arch, "kw": {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4},
            "last": ["blocks.11", "norm", "head"]},
    "mobilenet": {"factory": timm_arch, "kw": {"arch": "mobilenetv3_small_100"},
                  "last": ["blocks.5", "conv_head", "classifier"]},
    # quick suite (CPU): the same families, shrunk
    "preact18-w8": {"factory": preact18, "kw": {"width": 8}, "last": ["layer4", "bn", "linear"]},
    "test-vit": {"factory": timm_arch, "kw": {"arch": "test_vit", "img_size": 16, "patch_size": 4},
                 "last": ["blocks.1", "norm", "head"]},
    # standard suite (CPU, 32x32 RGB Fashion-MNIST): four families, one adapter each at least
    # patch 8 (16 tokens): on one core 10 epochs take ~30 s and reach ~81 % clean, where patch 4
    # (64 tokens) took ~56 s for 5 epochs and 67-72 %, and every search on it cost 4x as much
    "vit-e64d4": {"factory": timm_arch,
                  "kw": {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "embed_dim": 64,
                         "depth": 4, "num_heads": 2},
                  "train": {"opt": "adamw", "lr": 0.002, "epochs": 10}, "last": ["blocks.3", "norm", "head"]},
    "mnv3-050": {"factory": timm_arch, "kw": {"arch": "mobilenetv3_small_050"}, "train": {"epochs": 6},
                 "last": ["blocks.5", "conv_head", "classifier"]},
    # fine-tuned from one backbone the harness pretrains on other images with a coarser labelling
    "hf-convnext": {"factory": hf_convnext, "kw": {}, "pretrain": {"epochs": 5, "lr": 0.003, "opt": "adamw"},
                    "train": {"epochs": 3, "lr": 0.002, "opt": "adamw"},
                    "last": ["m.convnext.encoder.stages.3", "m.convnext.layernorm", "m.classifier"]},
    # the standard zoo's many-class family (100 garment pairs): d = 96, narrower than C - 1 = 99
    "c100-test-resnet": {"factory": timm_arch, "kw": {"arch": "test_resnet"}, "train": {"epochs": 6},
                         "last": ["layer4", "fc"]},
    "test-efficientnet": {"factory": timm_arch, "kw": {"arch": "test_efficientnet"},
                          "last": ["blocks.4", "conv_head", "bn2", "classifier"]},
}


def build(arch: str, num_classes: int, channels: int, size: int, seed: int, *,
          channels_last: bool = False) -> Classifier:
    """``arch`` with fresh weights (``channels_last``: a convolutional family's kernels in that
    memory format)."""
    spec = ARCHS[arch]
    kw = dict(spec["kw"])
    if spec["factory"] is timm_arch:
        name = kw.pop("arch")
        if "img_size" in kw:
            kw["img_size"] = size
        clf = timm_arch(name, num_classes, channels, size, seed, **kw)
    else:
        clf = spec["factory"](num_classes, channels, size, seed, **kw)
    if channels_last and "vit" not in arch:
        # oneDNN's CPU kernels: a training step of the standard MobileNetV3 took 3x less time
        # channels-last (depthwise convolutions), PreAct-ResNet18 1.4x, the ConvNeXt 1.2x; the
        # inputs may stay contiguous. Not for stacked groups: vmap has no batching rule for the
        # strided copies and falls back to a slow loop
        clf.model.to(memory_format=torch.channels_last)
    return clf
