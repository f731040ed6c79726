"""ImageNet-shaped classifiers end to end: 1000 classes on an embedding narrower than C - 1 (a timm
ResNet-18, d = 512, and a transformers ViT, d = 192), 224-px inputs, saved as the Hub would. Every
audit ends in a verdict (never an error that asks for a parameter), and purify works on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hub_backdoor import audit, cli, purify, zoo
from hub_backdoor.adapters import load_classifier
from hub_backdoor.defaults import VERIFY
from hub_backdoor.detection.calibration import load_calibration
from hub_backdoor.detection.rules import DEFAULT_RULE

C = 1000
PRESENT = 12  # classes with reference images
PER_CLASS = 3
RES = 224


def _images(seed: int = 0) -> tuple[list[Image.Image], list[int]]:
    """``PER_CLASS`` noisy copies of one random 224-px prototype for each of ``PRESENT`` classes
    spread over the 1000 (so that a network with random weights maps each class to a tight cluster)."""
    rng = np.random.default_rng(seed)
    classes = [int(k) for k in np.linspace(3, C - 4, PRESENT).round()]
    imgs, labels = [], []
    for k in classes:
        proto = rng.integers(0, 256, (RES, RES, 3))
        for _ in range(PER_CLASS):
            px = np.clip(proto + rng.normal(0, 10, proto.shape), 0, 255).astype(np.uint8)
            imgs.append(Image.fromarray(px))
            labels.append(k)
    return imgs, labels


def _timm_resnet18():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=C).eval()
    return model, lambda m: m.get_classifier()


def _hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=384,
                    image_size=RES, patch_size=16, num_labels=C)
    return ViTForImageClassification(cfg).eval(), lambda m: m.classifier


BUILDERS = {"timm-resnet18": _timm_resnet18, "transformers-vit": _hf_vit}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("many-classes")


@pytest.fixture(scope="module")
def reference(work) -> tuple[Path, list[Image.Image], list[int]]:
    """The reference images as a dataset saved with ``save_to_disk``, labels in 0..999."""
    import datasets

    imgs, labels = _images()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=C)})
    root = work / "reference"
    datasets.Dataset.from_dict({"image": imgs, "label": labels}, features=features).save_to_disk(str(root))
    return root, imgs, labels


def _save(model, folder: Path) -> Path:
    load_classifier(model).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def saved(work, reference) -> dict[str, dict[str, Path]]:
    """Each architecture saved twice as the Hub would: untrained, and with its head fitted."""
    _root, imgs, labels = reference
    out: dict[str, dict[str, Path]] = {}
    for name, build in BUILDERS.items():
        model, head = build()
        untrained = _save(model, work / f"{name}-untrained")
        clf = load_classifier(untrained)
        x = torch.stack([clf.preprocess(im) for im in imgs])
        zoo.fit_mean_head(clf, head(clf.model), x, torch.as_tensor(labels))
        out[name] = {"untrained": untrained, "fitted": _save(clf.model, work / f"{name}-fitted")}
    return out


def _run(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("name", list(BUILDERS))
def test_an_untrained_imagenet_classifier_is_inconclusive_before_any_search(name, saved, reference, work,
                                                                           capsys):
    clf = load_classifier(saved[name]["untrained"])
    assert (clf.num_classes, clf.num_classes - 1 >= clf.embed_dim) == (C, True)
    report_path = work / f"{name}-untrained.json"
    code, err = _run(["audit", str(saved[name]["untrained"]), "--dataset", str(reference[0]), "-q",
                      "--json", str(report_path)], capsys)
    assert code == 4, err
    r = json.loads(report_path.read_text())
    assert r["verdict"] == "inconclusive" and "reference" in r["reason"]
    assert "input_verification" not in r["timings"]  # the data gate came first
    assert "soft_margin" not in err and "soft-margin" not in err


@pytest.mark.default_rule
@pytest.mark.parametrize("name", list(BUILDERS))
def test_a_fitted_imagenet_classifier_is_audited_to_the_end(name, saved, reference, work, capsys):
    report_path = work / f"{name}-fitted.json"
    code, err = _run(["audit", str(saved[name]["fitted"]), "--dataset", str(reference[0]), "-q",
                      "--min-class-samples", "0", "--verify-top", "2", "--verify-images", "4",
                      "--json", str(report_path)], capsys)
    assert code in (0, 1, 4), err
    r = json.loads(report_path.read_text())
    assert r["data"]["accuracy"] == 1.0 and r["model"]["embed_dim"] < C - 1
    stages = {s["stage"]: s for s in r["evidence"]["stages"]}
    search = stages["additive verification"]
    assert search["classes"] == 2 and "2 of 1000" in search["why"]
    assert any("Theorem 1" in n for n in r["notes"])
    searched = [c for c in r["classes"] if c["input_bound"] is not None]
    assert len(searched) <= 2
    # the calibration holds models of 10 to 100 classes: no borrowed p-value, and no bare "clean"
    assert all(c["p_value"] is None for c in r["classes"])
    assert r["evidence"]["calibration"]["covers_this_model"] is False
    if code == 4:
        assert r["verdict"] == "inconclusive" and r["reason"].startswith("outside calibration")
    else:
        assert code == 1 and r["verdict"] == "backdoor"


@pytest.mark.default_rule
@pytest.mark.parametrize("name", list(BUILDERS))
def test_purify_runs_on_an_imagenet_classifier(name, saved, reference):
    import datasets

    root, _imgs, labels = reference
    target = labels[0]
    res = purify(str(saved[name]["fitted"]), datasets.load_from_disk(str(root)), target=target, epochs=1,
                 batch_size=16, holdout=0.25, progress=False,
                 audit_kw={"min_class_samples": 0, "verify_top": 2, "verify_images": 4})
    s_t = np.asarray(res.perturbation)
    assert s_t.shape == (load_classifier(saved[name]["fitted"]).embed_dim,)
    assert np.isfinite(s_t).all() and np.linalg.norm(s_t) > 0
    assert res.classifier.num_classes == C


def test_an_unreachable_class_is_no_latent_evidence_and_purify_still_gets_a_direction():
    # ten classes in a 2-d embedding: nine weight vectors on a circle and one at its centre, whose
    # region is bounded, so no single change moves every image into it
    ang = np.linspace(0, 2 * np.pi, 9, endpoint=False)
    mu = np.r_[np.c_[np.cos(ang), np.sin(ang)] * 3, [[0.0, 0.0]]]
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2, 2), torch.nn.Linear(2, 10))
    with torch.no_grad():
        net[1].weight.copy_(torch.eye(2))
        net[1].bias.zero_()
        net[2].weight.copy_(torch.as_tensor(mu))
        net[2].bias.copy_(torch.as_tensor(-0.5 * (mu**2).sum(1)))
    g = torch.Generator().manual_seed(0)
    y = torch.arange(10).repeat_interleave(6)
    centres = torch.as_tensor(mu, dtype=torch.float32)[y]
    x = (centres + 0.2 * torch.randn(len(y), 2, generator=g)).view(-1, 2, 1, 1)
    clf = load_classifier(net, head="2", input_size=(1, 1))
    r = audit(clf, (x, y), rule="mad", progress=False)
    assert not np.isfinite(r.classes[9].norm) and np.isfinite(r.norms[:9]).all()
    assert r.classes[9].anomaly_index == -np.inf and 9 not in r.flagged
    assert json.loads(r.to_json())["classes"][9]["norm"] is None
    res = purify(clf, (x, y), target=9, report=r, epochs=1, holdout=0.2, progress=False)
    assert np.linalg.norm(res.perturbation) > 0


def test_calibration_names_the_class_counts_it_covers():
    cal = load_calibration(DEFAULT_RULE)
    # the zoo's 10-class families and its 100-class family: 10 to 100 classes, not 1000
    assert cal is not None and cal.covers(10) and cal.covers(100) and not cal.covers(C)
    assert "10-100 classes" in cal.coverage()


@pytest.mark.default_rule
def test_a_trained_100_class_model_on_a_96_wide_embedding_gets_a_verdict(tmp_path, capsys):
    clf = zoo.timm_model("test_resnet", num_classes=100, size=32)
    assert clf.num_classes - 1 >= clf.embed_dim == 96
    zoo.train(clf, zoo.digit_pairs(4000, seed=0), epochs=12, lr=0.05)
    ref = zoo.digit_pairs(1000, seed=1, split="test")
    assert zoo.accuracy(clf, ref) > 0.6
    folder, data = tmp_path / "model", tmp_path / "reference"
    clf.save_pretrained(folder)
    ref.save_to_disk(str(data))
    report_path = tmp_path / "r.json"
    code, err = _run(["audit", str(folder), "--dataset", str(data), "-q", "--json", str(report_path)], capsys)
    assert code in (0, 1, 4), err
    r = json.loads(report_path.read_text())
    # within the calibration (the zoo's 100-class family): a verdict with p-values, never "outside"
    assert r["evidence"]["calibration"]["covers_this_model"] is True
    assert not (r["reason"] or "").startswith("outside calibration")
    assert all(c["p_value"] is not None for c in r["classes"])
    search = {s["stage"]: s for s in r["evidence"]["stages"]}["additive verification"]
    assert search["classes"] == VERIFY["top"]
