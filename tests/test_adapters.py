"""Adapters for timm and transformers: W h + b reproduces the logits on many architectures.

Every model is built offline from a config with random weights and tiny sizes. Head weights and
BatchNorm running statistics are re-randomised so that folding and exactness are actually tested
(fresh heads are often zero-initialised and fresh BatchNorm is the identity).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
import transformers as tf
from PIL import Image
from torch import nn

from hub_backdoor.adapters import adapt, load_classifier
from hub_backdoor.adapters.base import Classifier
from hub_backdoor.adapters.timm import TimmClassifier, load_timm_folder
from hub_backdoor.adapters.transformers import TransformersClassifier, load_transformers_folder
from hub_backdoor.errors import NonLinearHeadError, UnsafeWeightsError, UnsupportedModelError

C = 7  # classes of every test model

tf.logging.set_verbosity_error()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread; two OpenMP threads spin badly when the CPUs are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- model builders ----------------------------------------------------------------------------------
def _randomize(model: nn.Module, num_classes: int) -> nn.Module:
    """Random head weights and BatchNorm1d statistics, so the fold and the check are not trivial."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            out = getattr(m, "out_features", getattr(m, "out_channels", None))
            if isinstance(m, (nn.Linear, nn.Conv2d)) and out == num_classes:
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.2)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
            if isinstance(m, nn.BatchNorm1d) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.randn(m.weight.shape, generator=gen))
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
    return model.eval()


def _timm(name: str, **kw: Any) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=C, **kw)


_TINY_VIT = dict(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=37,
    image_size=32,
    patch_size=8,
    num_labels=C,
)
_TINY_LEVIT = dict(
    image_size=64,
    hidden_sizes=[16, 32, 48],
    num_attention_heads=[1, 2, 3],
    depths=[1, 1, 1],
    key_dim=[8, 8, 8],
    num_labels=C,
)


def _hf(cls_name: str, cfg_name: str, **kw: Any) -> Callable[[], nn.Module]:
    return lambda: getattr(tf, cls_name)(getattr(tf, cfg_name)(**kw))


TIMM_CASES = {
    "resnet18": _timm("resnet18"),
    "resnet18_gray": _timm("resnet18", in_chans=1),
    "convnext_atto": _timm("convnext_atto"),
    "vit_tiny": _timm("vit_tiny_patch16_224", img_size=32, depth=2),
    "deit_tiny_distilled": _timm("deit_tiny_distilled_patch16_224", img_size=32, depth=2),
    "levit_128s": _timm("levit_128s", img_size=64, distilled=False),
    "levit_128s_distilled": _timm("levit_128s", img_size=64),
    "levit_conv_128s_distilled": _timm("levit_conv_128s", img_size=64),
    "mobilenetv3_small_050": _timm("mobilenetv3_small_050"),
    "efficientnet_b0": _timm("efficientnet_b0"),
    "dla34": _timm("dla34"),
    "regnetx_002": _timm("regnetx_002"),
    "swin_tiny": _timm(
        "swin_tiny_patch4_window7_224",
        img_size=32,
        window_size=2,
        embed_dim=24,
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 1, 1),
    ),
    "pit_ti_distilled": _timm("pit_ti_distilled_224", img_size=64),
    "repvit_m0_9_distilled": _timm("repvit_m0_9", distillation=True),
    "efficientformer_l1_distilled": _timm("efficientformer_l1"),
    "crossvit_tiny": _timm("crossvit_tiny_240"),  # two branches, two heads: concatenated
}

HF_CASES = {
    "vit": _hf("ViTForImageClassification", "ViTConfig", **_TINY_VIT),
    "deit_with_teacher": _hf("DeiTForImageClassificationWithTeacher", "DeiTConfig", **_TINY_VIT),
    "dinov2": _hf("Dinov2ForImageClassification", "Dinov2Config", **_TINY_VIT),
    "resnet": _hf(
        "ResNetForImageClassification",
        "ResNetConfig",
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        num_labels=C,
    ),
    "convnext": _hf(
        "ConvNextForImageClassification",
        "ConvNextConfig",
        hidden_sizes=[8, 16],
        depths=[1, 1],
        num_stages=2,
        image_size=32,
        num_labels=C,
    ),
    "mobilenet_v2": _hf(
        "MobileNetV2ForImageClassification",
        "MobileNetV2Config",
        depth_multiplier=0.25,
        image_size=32,
        num_labels=C,
    ),
    "levit": _hf("LevitForImageClassification", "LevitConfig", **_TINY_LEVIT),
    "levit_with_teacher": _hf("LevitForImageClassificationWithTeacher", "LevitConfig", **_TINY_LEVIT),
    "swiftformer": _hf(
        "SwiftFormerForImageClassification",
        "SwiftFormerConfig",
        depths=[1, 1, 1, 1],
        embed_dims=[8, 16, 24, 32],
        num_labels=C,
    ),
    "timm_wrapper_deit_distilled": _hf(
        "TimmWrapperForImageClassification",
        "TimmWrapperConfig",
        architecture="deit_tiny_distilled_patch16_224",
        model_args={"img_size": 32, "depth": 1},
        num_labels=C,
    ),
}
if hasattr(tf, "PPLCNetForImageClassification"):  # logits come back as last_hidden_state
    HF_CASES["pp_lcnet"] = _hf("PPLCNetForImageClassification", "PPLCNetConfig", num_labels=C)


def _batch(clf: Classifier, n: int = 3) -> torch.Tensor:
    """A random batch at the size the model's preprocessing produces."""
    assert clf.input_size is not None and clf.input_channels is not None
    return torch.randn(n, clf.input_channels, *clf.input_size)


def _gray_image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 45), dtype=np.uint8), mode="L")


def _check_contract(clf: Classifier) -> None:
    x = _batch(clf)
    assert clf.verify(x) < 1e-4

    W, b = clf.head_numpy()
    assert W.shape == (clf.num_classes, clf.embed_dim) and b.shape == (clf.num_classes,)
    assert W.dtype == np.float64 and clf.num_classes == C

    logits, h = clf.forward(x)
    assert logits.shape == (len(x), C) and h.shape == (len(x), clf.embed_dim)
    torch.testing.assert_close(clf.head_logits(h), logits, rtol=1e-4, atol=1e-5)

    pix = clf.preprocess(_gray_image())
    assert pix.dtype == torch.float32
    assert tuple(pix.shape) == (clf.input_channels, *clf.input_size)

    # the latent perturbation trains the head: gradients reach its parameters and s
    clf.model.zero_grad()
    s = torch.zeros(clf.embed_dim, requires_grad=True)
    loss = F.cross_entropy(clf.head_logits(h.detach() + s), torch.arange(len(x)) % C)
    loss.backward()
    assert s.grad is not None
    W_live, b_live = clf.head_affine()
    assert W_live.requires_grad and b_live.requires_grad
    for path in clf.head_paths:
        for pname, p in clf.model.get_submodule(path).named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient on {path}.{pname}"


# -- coverage ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_architectures(case: str) -> None:
    torch.manual_seed(0)
    clf = adapt(_randomize(TIMM_CASES[case](), C))
    assert isinstance(clf, TimmClassifier) and clf.kind == "timm"
    _check_contract(clf)


@pytest.mark.parametrize("case", list(HF_CASES))
def test_transformers_architectures(case: str) -> None:
    torch.manual_seed(0)
    clf = adapt(_randomize(HF_CASES[case](), C))
    assert isinstance(clf, TransformersClassifier) and clf.kind == "transformers"
    _check_contract(clf)


def test_special_heads_are_combined_as_documented() -> None:
    torch.manual_seed(0)
    deit = TimmClassifier(_randomize(TIMM_CASES["deit_tiny_distilled"](), C))
    assert deit.head_paths == ("head", "head_dist") and deit.embed_dim == 2 * 192
    W, b = deit.head_affine()
    torch.testing.assert_close(W[:, :192], deit.model.head.weight / 2)
    torch.testing.assert_close(b, (deit.model.head.bias + deit.model.head_dist.bias) / 2)
    levit = TransformersClassifier(_randomize(HF_CASES["levit_with_teacher"](), C))
    assert levit.embed_dim == 48  # both folded heads read the same pooled features
    dla = TimmClassifier(_randomize(TIMM_CASES["dla34"](), C))
    assert isinstance(dla.model.get_submodule(dla.head_paths[0]), nn.Conv2d)


# -- save / load ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["vit_tiny", "levit_128s_distilled"])
def test_timm_round_trip(case: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    clf = TimmClassifier(_randomize(TIMM_CASES[case](), C))
    x = _batch(clf)
    clf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "pytorch_model.bin").exists()

    back = load_classifier(tmp_path)
    assert isinstance(back, TimmClassifier)
    assert back.input_size == clf.input_size and back.data_config == clf.data_config
    with torch.no_grad():
        torch.testing.assert_close(back.forward(x)[0], clf.forward(x)[0], rtol=0, atol=0)
        # timm itself rebuilds the same model (hf-hub: uses the same loader)
        native = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
        torch.testing.assert_close(native(x), clf.model(x), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["vit", "levit_with_teacher", "timm_wrapper_deit_distilled"])
def test_transformers_round_trip(case: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    clf = TransformersClassifier(_randomize(HF_CASES[case](), C))
    x = _batch(clf)
    clf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()

    back = load_classifier(tmp_path)
    assert isinstance(back, TransformersClassifier)
    assert type(back.model) is type(clf.model) and back.input_size == clf.input_size
    img = _gray_image()
    torch.testing.assert_close(back.preprocess(img), clf.preprocess(img))
    with torch.no_grad():
        torch.testing.assert_close(back.forward(x)[0], clf.forward(x)[0], rtol=0, atol=0)
        native = tf.AutoModelForImageClassification.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(native(pixel_values=x).logits, clf.model(pixel_values=x).logits)


def test_half_precision_checkpoint_loads_in_float32(tmp_path: Path) -> None:
    torch.manual_seed(0)
    _randomize(HF_CASES["vit"](), C).half().save_pretrained(tmp_path)
    clf = load_transformers_folder(tmp_path)
    assert clf.model.dtype == torch.float32
    assert clf.verify(_batch(clf)) < 1e-4


def _to_pickle_only(folder: Path) -> None:
    state = safetensors.torch.load_file(folder / "model.safetensors")
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def test_pickle_only_folders_need_allow_pickle(tmp_path: Path) -> None:
    torch.manual_seed(0)
    t = TimmClassifier(_randomize(TIMM_CASES["vit_tiny"](), C))
    h = TransformersClassifier(_randomize(HF_CASES["vit"](), C))
    for clf, sub, loader in [(t, "timm", load_timm_folder), (h, "hf", load_transformers_folder)]:
        folder = tmp_path / sub
        clf.save_pretrained(folder)
        _to_pickle_only(folder)
        with pytest.raises(UnsafeWeightsError, match="allow_pickle") as err:
            loader(folder)
        assert "\n" not in str(err.value)
        with pytest.raises(UnsafeWeightsError):
            load_classifier(folder)
        x = _batch(clf)
        back = loader(folder, allow_pickle=True)
        with torch.no_grad():
            torch.testing.assert_close(back.forward(x)[0], clf.forward(x)[0], rtol=0, atol=0)


# -- refusals ------------------------------------------------------------------------------------------
def test_mlp_heads_are_refused() -> None:
    torch.manual_seed(0)
    m = timm.create_model("resnet18", pretrained=False, num_classes=C)
    m.fc = nn.Sequential(nn.Linear(512, 16), nn.ReLU(), nn.Linear(16, C))
    with pytest.raises(NonLinearHeadError, match="ReLU"):
        adapt(m)
    v = HF_CASES["vit"]()
    v.classifier = nn.Sequential(nn.Linear(32, 16), nn.GELU(), nn.Linear(16, C))
    with pytest.raises(NonLinearHeadError, match="GELU"):
        adapt(v)


def test_perceiver_is_refused() -> None:
    cfg = tf.PerceiverConfig(
        num_latents=4,
        d_latents=16,
        d_model=16,
        num_blocks=1,
        num_self_attends_per_block=1,
        num_self_attention_heads=1,
        num_cross_attention_heads=1,
        image_size=8,
        num_labels=C,
    )
    with pytest.raises(NonLinearHeadError, match="PerceiverForImageClassificationLearned"):
        adapt(tf.PerceiverForImageClassificationLearned(cfg))


def test_non_classifiers_are_refused(tmp_path: Path) -> None:
    vit_cfg = {k: v for k, v in _TINY_VIT.items() if k != "num_labels"}
    with pytest.raises(UnsupportedModelError, match="ViTModel"):
        adapt(tf.ViTModel(tf.ViTConfig(**vit_cfg)))
    # a backbone checkpoint: the classifier head would be random
    tf.ViTModel(tf.ViTConfig(**vit_cfg)).save_pretrained(tmp_path / "backbone")
    with pytest.raises(UnsupportedModelError, match="missing"):
        load_transformers_folder(tmp_path / "backbone")
    bert = tf.BertModel(
        tf.BertConfig(
            vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8
        )
    )
    bert.save_pretrained(tmp_path / "bert")
    with pytest.raises(UnsupportedModelError, match="not an image classifier") as err:
        load_classifier(tmp_path / "bert")
    assert "\n" not in str(err.value)
