"""Every bad input gets a named exception with a one-line message (the CLI maps these to exit 2)."""

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from hub_backdoor import audit, load_classifier
from hub_backdoor.errors import (
    ChannelMismatchError,
    ColumnError,
    EmptyDatasetError,
    HubBackdoorError,
    LabelRangeError,
    NonFiniteLogitsError,
    NonLinearHeadError,
    OneClassDatasetError,
    UnsupportedModelError,
)


def _net(classes=4, width=16, channels=1):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(width, classes),
    )


def _clf(**kw):
    return load_classifier(_net(**kw), head="4", input_size=(8, 8))


def _images(n, classes=4, size=8, mode="L", seed=0):
    rng = np.random.default_rng(seed)
    imgs = [Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8), mode="L").convert(mode)
            for _ in range(n)]
    return imgs, (np.arange(n) % classes).tolist()


def _ds(n=16, classes=4, **cols):
    imgs, labels = _images(n, classes)
    feats = {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=classes)}
    data = {"image": imgs, "label": labels}
    for name, kind in cols.items():
        data[name] = imgs if kind == "image" else labels
        feats[name] = datasets.Image() if kind == "image" else datasets.ClassLabel(num_classes=classes)
    return datasets.Dataset.from_dict(data, features=datasets.Features(feats))


def _one_line(exc):
    msg = str(exc.value)
    assert msg and "\n" not in msg
    assert isinstance(exc.value, HubBackdoorError) and exc.value.exit_code == 2
    return msg


def test_good_input_passes():
    r = audit(_clf(), _ds(), progress=False, rule="mad")
    assert r.data["n"] == 16 and len(r.classes) == 4


def test_nonlinear_head():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    with pytest.raises(NonLinearHeadError) as e:
        load_classifier(model, head="2", input_size=(8, 8))
    assert "Sequential" in _one_line(e) and "ReLU" in _one_line(e)


def test_head_that_does_not_produce_the_logits():
    class Twisted(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.fc = _net()[:4], nn.Linear(16, 4)

        def forward(self, x):
            return torch.tanh(self.fc(self.body(x)))  # a non-linearity after the "head"

    with pytest.raises(NonLinearHeadError) as e:
        audit(load_classifier(Twisted(), head="fc", input_size=(8, 8)), _ds(), progress=False)
    assert "Twisted" in _one_line(e)


def test_more_classes_than_dimensions_is_audited_not_refused():
    clf = load_classifier(_net(classes=20, width=8), head="4", input_size=(8, 8))
    r = audit(clf, _ds(n=40, classes=20), progress=False)
    assert any("C - 1 = 19 >= d = 8" in n for n in r.notes)
    # a 20-class model is outside the 10-class calibration: never a bare "clean"
    assert r.verdict in ("backdoor", "inconclusive")
    # the explicit soft-margin option solves it and says so in the report
    r = audit(clf, _ds(n=40, classes=20), progress=False, soft_margin=10.0, rule="mad")
    assert any("soft margin" in n for n in r.notes)


def test_empty_dataset():
    with pytest.raises(EmptyDatasetError) as e:
        audit(_clf(), _ds().select([]), progress=False)
    assert "empty" in _one_line(e)


def test_one_class_dataset():
    ds = _ds()
    with pytest.raises(OneClassDatasetError) as e:
        audit(_clf(), ds.filter(lambda ex: ex["label"] == 2), progress=False)
    assert "label 2" in _one_line(e)


def test_missing_label_column():
    ds = _ds().remove_columns("label")
    with pytest.raises(ColumnError) as e:
        audit(_clf(), ds, progress=False)
    assert "no label column" in _one_line(e) and "label_column" in _one_line(e)


def test_ambiguous_label_column():
    with pytest.raises(ColumnError) as e:
        audit(_clf(), _ds(coarse="label"), progress=False)
    msg = _one_line(e)
    assert "ambiguous label column" in msg and "coarse" in msg
    # naming the column resolves it
    r = audit(_clf(), _ds(coarse="label"), label_column="coarse", progress=False, rule="mad")
    assert r.data["n"] == 16


def test_named_column_that_does_not_exist():
    with pytest.raises(ColumnError) as e:
        audit(_clf(), _ds(), image_column="pixels", progress=False)
    assert "'pixels'" in _one_line(e)


def test_labels_outside_range():
    imgs, _ = _images(8)
    ds = datasets.Dataset.from_dict({"image": imgs, "label": [0, 1, 2, 3, 4, 5, 6, 7]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.Value("int64")}))
    with pytest.raises(LabelRangeError) as e:
        audit(_clf(), ds, progress=False)
    assert "outside [0, 4)" in _one_line(e)


def test_non_finite_logits():
    net = _net()
    with torch.no_grad():
        net[4].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLogitsError) as e:
        audit(load_classifier(net, head="4", input_size=(8, 8)), _ds(), progress=False)
    assert "non-finite" in _one_line(e)


def test_wrong_image_channels():
    x = torch.rand(8, 3, 8, 8)  # RGB tensors for a 1-channel model
    y = torch.arange(8) % 4
    with pytest.raises(ChannelMismatchError) as e:
        audit(_clf(), (x, y), progress=False)
    assert "3 channels but the model expects 1" in _one_line(e)


def test_not_a_classifier():
    with pytest.raises(UnsupportedModelError) as e:
        load_classifier(nn.Linear(4, 4))
    assert "head=" in _one_line(e)


def test_tensor_input_matches_dataset_input():
    imgs, labels = _images(16)
    x = torch.stack([torch.from_numpy(np.array(im, dtype=np.float32) / 255.0)[None] for im in imgs])
    r_t = audit(_clf(), (x, torch.tensor(labels)), progress=False, rule="mad")
    r_d = audit(_clf(), _ds(), progress=False, rule="mad")
    np.testing.assert_allclose(r_t.norms, r_d.norms, rtol=1e-6)


# -- exit codes carried by the errors ----------------------------------------------------------------------
def _http_error(status):
    from huggingface_hub.errors import HfHubHTTPError

    httpx = pytest.importorskip("httpx2")  # the HTTP client of this huggingface_hub

    request = httpx.Request("GET", "https://hub.example/api/models/org/m")
    return HfHubHTTPError(f"{status} answer", response=httpx.Response(status, request=request))


@pytest.mark.parametrize(("status", "transient", "code"), [(503, True, 5), (429, True, 5), (400, False, 2)])
def test_hub_errors_carry_status_repo_and_cause(status, transient, code):
    from hub_backdoor.errors import ExitCode, HubError
    from hub_backdoor.sources.hub import raise_hub_error

    cause = _http_error(status)
    with pytest.raises(HubError) as exc:
        raise_hub_error(cause, repo_id="org/m", revision=None)
    e = exc.value
    assert (e.status, e.repo_id, e.transient) == (status, "org/m", transient)
    assert e.exit_code == code and ExitCode(code).name == ("TRANSIENT" if transient else "USAGE")
    assert e.__cause__ is cause and "\n" not in str(e)


def test_cli_returns_the_errors_exit_code(monkeypatch, capsys):
    import hub_backdoor.adapters.loading as loading
    from hub_backdoor import cli
    from hub_backdoor.errors import HubUnavailableError

    def unreachable(source, **kw):
        raise HubUnavailableError("cannot reach the Hub for model repo 'org/m'", repo_id="org/m")

    monkeypatch.setattr(loading, "download_model", unreachable)
    assert cli.main(["audit", "org/m", "--dataset", "org/d", "--quiet"]) == 5
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "error: cannot reach the Hub for model repo 'org/m'"
