"""Hostile input, as a new user meets it: every case ends in a documented exit code with one line
that names the problem, before any long work, and every input file is byte-identical afterwards."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hub_backdoor import cli, purify
from hub_backdoor.adapters import load_classifier
from hub_backdoor.adapters.base import ToMode, to_8bit
from hub_backdoor.detection.validation import check_outputs
from hub_backdoor.errors import DatasetError, OptionError, OutputPathError


def _digests(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots``, symlinks followed (what they point to is an input too)."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def linked_model(tmp_path_factory) -> dict[str, Path]:
    """A timm model folder laid out as the Hub cache lays it: every file a symlink to a blob."""
    import timm

    root = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    plain = root / "plain"
    load_classifier(timm.create_model("resnet10t", num_classes=4, in_chans=1)).save_pretrained(plain)
    blobs, snap = root / "blobs", root / "snapshot"
    blobs.mkdir()
    snap.mkdir()
    for f in plain.iterdir():
        blob = blobs / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(blob)
    return {"root": root, "model": snap, "blobs": blobs, "weights": (snap / "model.safetensors").resolve()}


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_a_report_onto_a_symlinked_weights_file_is_refused(linked_model, capsys):
    before = _digests(linked_model["blobs"])
    code, line = _cli(["audit", str(linked_model["model"]), "--dataset", str(linked_model["root"] / "none"),
                       "--json", str(linked_model["weights"]), "-q"], capsys)
    assert code == 2 and "the model folder" in line and str(linked_model["weights"]) in line
    assert _digests(linked_model["blobs"]) == before


def test_purify_out_over_the_model_is_refused_even_with_overwrite(linked_model, capsys):
    before = _digests(linked_model["blobs"])
    code, line = _cli(["purify", str(linked_model["model"]), "--out", str(linked_model["blobs"]),
                       "--overwrite", "-q"], capsys)
    assert code == 2 and "--out" in line
    assert _digests(linked_model["blobs"]) == before


def test_a_card_over_the_models_own_card_is_refused(linked_model, tmp_path, capsys):
    (linked_model["model"] / "README.md").write_text("# the model's own card\n")
    report = tmp_path / "r.json"
    report.write_text("{}")
    before = _digests(linked_model["model"], linked_model["blobs"])
    code, line = _cli(["card", str(linked_model["model"]), "--report", str(report),
                       "--out", str(linked_model["model"] / "README.md")], capsys)
    assert code == 2 and "the model folder" in line
    assert _digests(linked_model["model"], linked_model["blobs"]) == before


@pytest.mark.parametrize(
    ("argv", "phrase"),
    [
        (["--json", "{d}/r.out", "--sarif", "{d}/r.out"],
         "--json {d}/r.out and --sarif {d}/r.out are the same file"),
        (["--json", "{d}/r.png", "--card", "{d}/r.md"], "are the same file"),
        (["--card", "{d}/c.png"], "are the same file"),
    ],
)
def test_outputs_that_collide_are_refused_before_any_work(argv, phrase, tmp_path, capsys):
    d = str(tmp_path)
    code, line = _cli(["audit", "org/model", *[a.format(d=d) for a in argv]], capsys)
    assert code == 2 and phrase.format(d=d) in line
    assert list(tmp_path.iterdir()) == []


def test_outputs_are_checked_against_each_other_through_symlinks(tmp_path):
    (tmp_path / "real.json").write_text("{}")
    (tmp_path / "alias.json").symlink_to(tmp_path / "real.json")
    with pytest.raises(OutputPathError, match="same file"):
        check_outputs([(tmp_path / "real.json", "--json"), (tmp_path / "alias.json", "--sarif")])


@pytest.mark.parametrize("drop", [float("nan"), -0.01, 1.5])
def test_a_bad_accuracy_budget_is_refused_before_loading(drop):
    with pytest.raises(OptionError, match="max_accuracy_drop"):
        purify("no/such-model", None, max_accuracy_drop=drop)


@pytest.mark.parametrize("drop", ["nan", "-1", "101"])
def test_a_bad_accuracy_budget_is_refused_by_the_cli(drop, tmp_path, capsys):
    code, line = _cli(["purify", "org/model", "--out", str(tmp_path / "o"), "--max-accuracy-drop", drop],
                      capsys)
    assert code == 2 and "--max-accuracy-drop" in line


def test_16_bit_images_read_as_the_8_bit_ones_they_show():
    rng = np.random.default_rng(0)
    eight = rng.integers(0, 256, (16, 16)).astype(np.uint8)
    sixteen = Image.fromarray(eight.astype(np.uint16) * 257)  # the same picture at 16 bits
    assert sixteen.mode == "I;16"
    for mode in ("L", "RGB"):
        got = np.asarray(ToMode(mode)(sixteen))
        want = np.asarray(Image.fromarray(eight).convert(mode))
        assert np.array_equal(got, want)
    as_i = Image.fromarray(eight.astype(np.int32) * 257)  # mode I, 16-bit values
    assert np.array_equal(np.asarray(to_8bit(as_i)), eight)
    unit = Image.fromarray(eight.astype(np.float32) / 255.0)  # mode F in 0..1
    assert np.abs(np.asarray(to_8bit(unit)).astype(int) - eight).max() <= 1


def test_an_image_with_no_faithful_8_bit_reading_is_refused():
    with pytest.raises(DatasetError, match="no faithful 8-bit reading"):
        ToMode("L")(Image.fromarray(np.full((4, 4), -3.0, dtype=np.float32)))


def test_class_names_and_tags_from_the_data_stay_literal_in_the_card():
    import datasets

    from hub_backdoor import audit
    from hub_backdoor.outputs.card import CardContext, build_card

    names = ["<script>alert(1)</script>", "**bold**", "c", "d"]
    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (4, 4)).astype(np.uint8), "L") for _ in range(40)]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    ds = datasets.Dataset.from_dict({"image": imgs, "label": [i % 4 for i in range(40)]}, features=feats)
    report = audit(load_classifier(net, head="3", input_size=(4, 4)), ds, rule="mad", progress=False,
                   min_reference_accuracy=0.0)
    card = build_card(report, CardContext(model_label="m", extra_metadata={"tags": "malware"}),
                      chart_file="c.png")
    text = card.text  # the body; the YAML metadata keeps the names as data
    assert "<script>" not in text and "**bold**" not in text and "&lt;script&gt;" in text
    assert "malware" in card.data.tags and "m" not in card.data.tags


@pytest.fixture(scope="module")
def bad_data(linked_model) -> dict[str, Path]:
    """Image folders with one unreadable file each, a saved dataset of 0 rows, a deeply nested JSON."""
    import datasets

    root = linked_model["root"] / "data"
    rng = np.random.default_rng(0)
    bodies = {"corrupt": b"\x89PNG\r\n\x1a\nnot an image", "empty": b"", "truncated": None}
    out = {}
    for name, body in bodies.items():
        folder = root / name
        for k in range(4):
            (folder / str(k)).mkdir(parents=True)
            for i in range(3):
                px = rng.integers(0, 256, (32, 32)).astype(np.uint8)
                Image.fromarray(px).save(folder / str(k) / f"{i}.png")
        bad = folder / "2" / "bad.png"
        if body is None:  # a real PNG cut in half: PIL opens it and fails on decoding
            whole = (folder / "2" / "0.png").read_bytes()
            bad.write_bytes(whole[: len(whole) // 2])
        else:
            bad.write_bytes(body)
        out[name] = folder
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=4)})
    datasets.Dataset.from_dict({"image": [], "label": []}, features=feats).save_to_disk(str(root / "no-rows"))
    out["no-rows"] = root / "no-rows"
    nested = root / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    out["nested"] = nested
    return out


@pytest.mark.parametrize("name", ["corrupt", "empty", "truncated"])
def test_an_unreadable_image_is_named_with_exit_2(name, linked_model, bad_data, capsys):
    before = _digests(bad_data[name], linked_model["blobs"])
    code, line = _cli(["audit", str(linked_model["model"]), "--dataset", str(bad_data[name]), "-q"], capsys)
    assert code == 2 and "cannot read its image" in line, line
    assert _digests(bad_data[name], linked_model["blobs"]) == before


def test_a_saved_dataset_of_no_rows_is_exit_2(linked_model, bad_data, capsys):
    code, line = _cli(["audit", str(linked_model["model"]), "--dataset", str(bad_data["no-rows"]), "-q"],
                      capsys)
    assert code == 2 and "no rows" in line


def test_a_deeply_nested_report_is_exit_2(linked_model, bad_data, tmp_path, capsys):
    code, line = _cli(["purify", str(linked_model["model"]), "--dataset", str(bad_data["corrupt"]),
                       "--report", str(bad_data["nested"]), "--out", str(tmp_path / "o"), "-q"], capsys)
    assert code == 2 and "nested too deeply" in line
    assert not (tmp_path / "o").exists()


def test_a_name_too_long_is_refused_before_any_work(tmp_path, capsys):
    code, line = _cli(["audit", "org/model", "--json", str(tmp_path / ("x" * 300 + ".json"))], capsys)
    assert code == 2 and "--json" in line and "255 bytes" in line


def test_purify_will_not_replace_the_folder_it_runs_in(tmp_path, capsys, monkeypatch):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    code, line = _cli(["purify", "org/model", "--out", ".", "--overwrite"], capsys)
    assert code == 2 and "current folder" in line
    code, line = _cli(["purify", "org/model", "--out", "..", "--overwrite"], capsys)
    assert code == 2 and "current folder" in line


def test_the_hf_extension_names_itself_in_its_usage(capsys):
    from hub_backdoor.integrations import hf_main

    assert hf_main(["audit", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: hf backdoor audit")


def test_a_timm_config_asking_for_a_giant_input_is_refused(linked_model, tmp_path, capsys):
    import json
    import shutil

    folder = tmp_path / "giant"
    shutil.copytree(linked_model["root"] / "plain", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.setdefault("pretrained_cfg", {})["input_size"] = [1, 120_000, 120_000]
    (folder / "config.json").write_text(json.dumps(cfg))
    code, line = _cli(["audit", str(folder), "--dataset", str(tmp_path / "none"), "-q"], capsys)
    assert code == 2 and "input size 120000x120000" in line


def test_a_pickle_with_code_in_it_never_runs_and_is_exit_2(tmp_path, capsys):
    import os
    import pickle

    from transformers import ViTConfig

    folder = tmp_path / "hf-pickle"
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
              patch_size=8, num_labels=4, architectures=["ViTForImageClassification"]).save_pretrained(folder)
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"vit.embeddings.cls_token": Evil()}))
    code, line = _cli(["audit", str(folder), "--allow-pickle", "--dataset", str(tmp_path / "none"), "-q"],
                      capsys)
    assert code == 2 and "cannot load" in line, line
    assert not marker.exists()
