"""hub_backdoor.outputs.publish: a purified model as a pull request on the audited repo, against the session's
LocalHub, from library objects only (audit -> purify -> open_purification_pr)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_integrations import integration_models, model_card

import hub_backdoor
from hub_backdoor.errors import HubBackdoorError, UnsupportedModelError
from hub_backdoor.outputs import publish
from hub_backdoor.sources.datasets import load_reference_dataset


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return integration_models(tmp_path_factory)


def test_load_hint_names_the_revision():
    assert publish.load_hint("timm", "org/m", revision="refs/pr/N") == (
        '`timm.create_model("hf-hub:org/m@refs/pr/N", pretrained=True)`'
    )


def test_open_purification_pr(local_hub, models, tmp_path):
    repo = f"tester/pub-{uuid.uuid4().hex[:8]}"
    files = {p.name: p.read_bytes() for p in models["backdoored"].iterdir() if p.is_file()}
    files["README.md"] = model_card(["org/digits"]).encode()
    sha = local_hub.commit_files(repo, files)
    main_files = local_hub.files(repo)

    data = load_reference_dataset(str(models["data"]), split="test")
    clf = hub_backdoor.load_classifier(f"{repo}@{sha}")
    report = hub_backdoor.audit(clf, data.dataset, progress=False)
    assert report.target == 7
    result = hub_backdoor.purify(clf, data.dataset, report=report, epochs=1, progress=False,
                                 max_accuracy_drop=1.0)  # the publishing path, not the budget
    url = publish.open_purification_pr(
        result,
        repo_id=repo,
        sha=sha,
        dataset=data,
        report_after=report,
        card_metadata={"license": "apache-2.0", "library_name": "timm"},
        card_body="# Digit classifier\n\nOriginal text.\n",
    )

    (pr,) = [d for d in local_hub.discussions(repo) if d["is_pull_request"]]
    assert url.endswith(f"/discussions/{pr['num']}")
    assert pr["title"] == "Remove backdoor of class 7 (hub-backdoor)"
    pr_files = local_hub.files(repo, f"refs/pr/{pr['num']}")
    assert local_hub.files(repo) == main_files  # main is never written
    # the weights are the purified model's, not the original's
    assert pr_files["model.safetensors"] != main_files["model.safetensors"]
    (tmp_path / "pr.safetensors").write_bytes(pr_files["model.safetensors"])
    weights = load_file(str(tmp_path / "pr.safetensors"))
    purified = result.classifier.model.state_dict()
    shared = [k for k in weights if k in purified]
    assert shared and all(torch.equal(weights[k], purified[k].cpu()) for k in shared)
    record = json.loads(pr_files[publish.PURIFICATION_FILE])
    assert (record["schema_version"], record["target"]) == ("1", 7)
    assert record["audited_model"] == {"label": repo, "repo_id": repo, "revision": None, "sha": sha}
    assert record["dataset"]["name"] == str(models["data"]) and record["output"]["open_pr"] is True
    assert record["audit_after"]["verdict"] == report.verdict
    assert f"hub-backdoor purify {repo}@{sha}" in record["card"]["reproduce"]
    assert (record["params"]["threads"], record["params"]["determinism"]) == (1, "cpu-fixed-threads")
    assert "--threads" not in record["card"]["reproduce"]  # the default count: nothing to name
    assert json.loads(pr_files[publish.AUDIT_FILE])["target"] == 7
    card = pr_files["README.md"].decode()
    assert "license: apache-2.0" in card and "Original text." in card and "hub-backdoor" in card
    assert "refs/pr/N" in card  # the load hint points at the pull request

    # the guarded model is built from the pull request alone: its record names the target and the
    # audited commit, which is loaded beside it
    guarded = hub_backdoor.load_guarded(f"{repo}@refs/pr/{pr['num']}")
    assert guarded.target == 7 and not guarded.training
    x = torch.stack([result.classifier.preprocess(data.dataset[i]["image"]) for i in range(64)])
    with torch.no_grad():
        orig, pur = clf.forward(x)[0].argmax(1), result.classifier.forward(x)[0].argmax(1)
    assert torch.equal(guarded.predict(x), torch.where(orig == 7, pur, orig))


def test_refuses_what_it_cannot_publish(tmp_path, models):
    data = load_reference_dataset(str(models["data"]), split="test")
    unsaveable = SimpleNamespace(
        classifier=SimpleNamespace(kind="torch"), target=0, report=None, params={"epochs": 1}
    )
    with pytest.raises(UnsupportedModelError, match="cannot save a purified torch model"):
        publish.write_purified_folder(tmp_path / "out", result=unsaveable, record={}, context=None)
    with pytest.raises(HubBackdoorError, match="no audited commit"):
        publish.open_purification_pr(unsaveable, repo_id="org/m", sha="", dataset=data)
    assert not (tmp_path / "out").exists()
