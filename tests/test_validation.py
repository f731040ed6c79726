"""Bad input never yields a clean verdict (library side): options, data, reports and outputs are
refused with a named one-line error before any work, and data the model cannot classify gives an
inconclusive verdict. The CLI's table of the same cases is in tests/test_cli.py."""

from __future__ import annotations

import importlib

import datasets
import numpy as np
import pytest
import torch
from test_errors import _clf, _ds, _images, _net, _one_line

from hub_backdoor import audit, load_classifier, purify
from hub_backdoor.detection.report import AuditReport
from hub_backdoor.detection.validation import (
    check_outputs,
    check_report_matches,
    default_min_accuracy,
    head_fingerprint,
)
from hub_backdoor.errors import (
    ColumnError,
    DatasetError,
    ExitCode,
    OptionError,
    OutputPathError,
    ReportError,
    UnsupportedModelError,
)

NAN = float("nan")


def test_exit_codes_keep_their_values():
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 4, 5, 6, 130]
    assert (ExitCode.INCONCLUSIVE, ExitCode.TRANSIENT, ExitCode.ACCURACY_BUDGET, ExitCode.INTERRUPTED) == (
        4, 5, 6, 130)


@pytest.mark.parametrize(
    ("kw", "phrase"),
    [
        ({"threshold": NAN}, "--threshold / threshold= must be a finite number > 0, got nan"),
        ({"threshold": -1.0}, "--threshold"),
        ({"threshold": 0}, "--threshold"),
        ({"threshold": float("inf")}, "--threshold"),
        ({"soft_margin": -1.0}, "--soft-margin / soft_margin="),
        ({"soft_margin": NAN}, "--soft-margin"),
        ({"seed": -1}, "--seed / seed= must be an integer in 0..4294967295"),
        ({"seed": 99999999999999999999}, "--seed"),
        ({"device": "foo"}, "not a torch device"),
        ({"device": "cuda:99"}, "--device"),
        ({"max_samples": 0}, "--max-samples"),
        ({"batch_size": 0}, "--batch-size"),
        ({"min_reference_accuracy": 1.5}, "--min-reference-accuracy"),
        ({"min_class_samples": -1}, "--min-class-samples"),
    ],
)
def test_audit_refuses_bad_options_before_loading(kw, phrase, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(importlib.import_module("hub_backdoor.detection.audit"), "load_classifier", no_load)
    with pytest.raises(OptionError) as e:
        audit("never/loaded", None, progress=False, **kw)
    assert phrase in _one_line(e)


@pytest.mark.parametrize(
    ("kw", "phrase"),
    [
        ({"lr": -1.0}, "--lr / lr= must be a finite number > 0"),
        ({"lr": NAN}, "--lr"),
        ({"beta": -1.0}, "--beta"),
        ({"scale": 0.0}, "--scale"),
        ({"distill": NAN}, "--distill"),
        ({"holdout": 1.0}, "--holdout"),
        ({"epochs": 0}, "--epochs"),
        ({"seed": -1}, "--seed"),
        ({"device": "foo"}, "--device"),
    ],
)
def test_purify_refuses_bad_options_before_loading(kw, phrase, monkeypatch):
    import hub_backdoor.purification.purify as purification

    monkeypatch.setattr(purification, "load_classifier", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(OptionError) as e:
        purify("never/loaded", None, progress=False, **kw)
    assert phrase in _one_line(e)


def test_purify_refuses_a_target_outside_the_classes():
    with pytest.raises(OptionError) as e:
        purify(_clf(), _ds(), target=9, progress=False)
    assert "not a class" in _one_line(e)


@pytest.mark.parametrize(
    ("dataset", "phrase"),
    [
        (np.zeros((16, 1, 8, 8), np.float32), "without labels"),
        ("/some/dataset/folder", "is a path"),
        ([{"image": 1, "label": 0}, {"image": 2, "label": 1}], "list of 2 dicts"),
        ([(1, 0), (2, 1), (3, 2)], "(images, labels) pair"),
        ((torch.rand(4, 1, 8, 8), ["zero", "one", "two", "three"]), "integer"),
        ((torch.rand(4, 1, 8, 8), torch.rand(4)), "integer class indices"),
    ],
)
def test_unusable_dataset_objects(dataset, phrase):
    with pytest.raises(DatasetError) as e:
        audit(_clf(), dataset, progress=False)
    assert phrase in _one_line(e)


def test_columns_of_the_wrong_type():
    ds = _ds()
    words = ds.cast_column("label", datasets.Value("int64")).map(
        lambda ex: {"label": ["zero", "one", "two", "three"][ex["label"]]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")}),
    )
    with pytest.raises(ColumnError) as e:
        audit(_clf(), words, progress=False)
    assert "holds string values" in _one_line(e) and "integer class indices" in _one_line(e)
    with pytest.raises(ColumnError) as e:
        audit(_clf(), ds, label_column="image", progress=False)
    assert "label column 'image' holds images" in _one_line(e)
    with pytest.raises(ColumnError) as e:
        audit(_clf(), ds, image_column="label", progress=False)
    assert "image column 'label' holds class labels" in _one_line(e)


def test_missing_folder_is_named_as_a_folder():
    with pytest.raises(UnsupportedModelError) as e:
        load_classifier("/missing/folder")
    assert _one_line(e) == "model folder /missing/folder does not exist"


# -- the reference-set gate -------------------------------------------------------------------------------
def test_chance_accuracy_is_inconclusive_never_clean():
    r = audit(_clf(), _ds(n=32), progress=False, rule="mad")  # an untrained net: chance accuracy
    assert r.data["accuracy"] < default_min_accuracy(4) == 0.5
    assert r.verdict == "inconclusive" and not r.backdoor_found
    assert "of the reference images right" in r.reason and "--min-reference-accuracy" in r.reason
    assert "INCONCLUSIVE" in r.summary()
    assert AuditReport.from_json(r.to_json()).reason == r.reason
    # the floor is an option: at 0, the same data gives a verdict
    r0 = audit(_clf(), _ds(n=32), progress=False, rule="mad", min_reference_accuracy=0.0)
    assert r0.verdict in ("clean", "backdoor") and r0.reason is None
    assert r0.params["min_reference_accuracy"] == 0.0


def test_a_class_without_reference_images_is_inconclusive():
    ds = _ds(n=32).filter(lambda ex: ex["label"] != 3)
    r = audit(_clf(), ds, progress=False, rule="mad", min_reference_accuracy=0.0)
    assert r.verdict == "inconclusive" and "classes 3" in r.reason
    r = audit(_clf(), ds, progress=False, rule="mad", min_reference_accuracy=0.0, min_class_samples=0)
    assert r.verdict != "inconclusive"


def test_mixed_sizes_are_resized_and_noted_or_refused():
    imgs, labels = _images(16)
    imgs = [im.resize((4, 4)) if i % 2 else im for i, im in enumerate(imgs)]
    ds = datasets.Dataset.from_dict(
        {"image": imgs, "label": labels},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=4)}),
    )
    r = audit(_clf(), ds, progress=False, rule="mad", min_reference_accuracy=0.0)
    assert any("come in 2 sizes" in n for n in r.notes), r.notes
    # a transform that keeps the raw size cannot batch them: refused in one line
    raw = lambda im: torch.from_numpy(np.array(im, dtype=np.float32) / 255.0)[None]  # noqa: E731
    with pytest.raises(DatasetError) as e:
        audit(_clf(), ds, transform=raw, progress=False)
    assert "different shapes" in _one_line(e)


# -- reports ------------------------------------------------------------------------------------------------
def _report():
    return audit(_clf(), _ds(n=32), progress=False, rule="mad", min_reference_accuracy=0.0)


def test_report_belongs_to_its_model():
    r = _report()
    clf = _clf()
    W, b = clf.head_numpy()
    assert r.model["head_sha256"] == head_fingerprint(W, b)
    check_report_matches(r, clf, "same")  # its own model passes
    other = load_classifier(_net(), head="4", input_size=(8, 8))
    with torch.no_grad():
        other.model[4].weight.add_(0.01)  # same shape, other weights
    with pytest.raises(ReportError) as e:
        check_report_matches(r, other, "other")
    assert "another model" in _one_line(e)
    r2 = AuditReport.from_json(r.to_json())
    r2.target_perturbation = [0.0] * 3
    with pytest.raises(ReportError) as e:
        check_report_matches(r2, clf, "m")
    assert "dimension 3" in _one_line(e)
    with pytest.raises(ReportError) as e:
        purify(other, _ds(n=32), report=r, target=0, progress=False, epochs=1)
    assert "another model" in _one_line(e)


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        (lambda d: d["classes"][0].update(norm="big"), "classes[0].norm"),
        (lambda d: d.update(target=99), "'target'"),
        (lambda d: d.update(verdict="maybe"), "'verdict'"),
        (lambda d: d.update(flagged=["x"]), "'flagged'"),
        (lambda d: d.update(params=[]), "'params'"),
        (lambda d: d.update(classes="none"), "'classes'"),
        (lambda d: d.update(schema_version="99"), "schema version 99"),  # not a version it reads
    ],
)
def test_malformed_reports_are_refused(change, phrase):
    d = _report().to_dict()
    change(d)
    with pytest.raises(ReportError) as e:
        AuditReport.from_dict(d)
    assert phrase in _one_line(e)


def test_schema_1_reports_still_load():
    d = _report().to_dict()
    d["schema_version"] = "1"
    for key in ("reason",):
        d.pop(key)
    d["model"].pop("head_sha256")
    r = AuditReport.from_dict(d)
    assert r.schema_version == "1" and r.reason is None
    check_report_matches(r, _clf(), "m")  # no fingerprint: only the shape is checked


# -- outputs -------------------------------------------------------------------------------------------------
def test_output_checks(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "README.md").write_text("card")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    protected = [(model, "the model folder")]
    cases = [
        ([("-", "--json"), ("-", "--sarif")], "at most one"),
        ([(tmp_path, "--json")], "is a directory"),
        ([(a_file / "r.json", "--json")], "is not a folder"),
        ([(model / "README.md", "--card")], "the model folder"),
        ([(model / "sub" / "r.json", "--json")], "the model folder"),
    ]
    for outputs, phrase in cases:
        with pytest.raises(OutputPathError) as e:
            check_outputs(outputs, protected)
        assert phrase in _one_line(e), outputs
    check_outputs([("-", "--json"), (tmp_path / "new" / "r.json", "--sarif")], protected)
    assert not (tmp_path / "new").exists()  # the probe writes nothing that stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "model"]


def test_unwritable_folder_is_refused(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputPathError) as e:
            check_outputs([(ro / "r.json", "--json")])
        assert "cannot write" in _one_line(e)
    finally:
        ro.chmod(0o700)

