"""hub_backdoor.sources.hub against the session's LocalHub, with the real huggingface_hub client."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard

from hub_backdoor.errors import (
    HubBackdoorError,
    RepoNotFoundError,
    RevisionNotFoundError,
    UnsafeWeightsError,
)
from hub_backdoor.sources.hub import card_data, download_model, parse_repo_ref, push_folder

README = (
    "---\nlicense: apache-2.0\ndatasets:\n- tester/cifar-mini\ntags:\n- image-classification\n---\n# Model\n"
)


@pytest.fixture
def repo_id() -> str:
    return f"tester/model-{uuid.uuid4().hex[:10]}"


def write_model(
    folder: Path, weights: bytes = b"weights-v1", *, pickle_only: bool = False
) -> dict[str, bytes]:
    """A classifier folder (contents need not be loadable: only bytes travel); returns its files."""
    files = {
        "config.json": json.dumps({"architecture": "resnet18", "num_classes": 10}).encode(),
        "preprocessor_config.json": b'{"size": 32}',
        "README.md": README.encode(),
        ("pytorch_model.bin" if pickle_only else "model.safetensors"): weights,
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def read_folder(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("org/name", ("org/name", None)),
        ("org/name@v1.0", ("org/name", "v1.0")),
        (" org/name@refs/pr/3 ", ("org/name", "refs/pr/3")),
        ("org/name/@main", ("org/name", "main")),
    ],
)
def test_parse_repo_ref(source: str, expected: tuple[str, str | None]) -> None:
    assert parse_repo_ref(source) == expected


@pytest.mark.parametrize("source", ["", "@main", "org/name@", "org/name@  "])
def test_parse_repo_ref_rejects_empty_parts(source: str) -> None:
    with pytest.raises(HubBackdoorError):
        parse_repo_ref(source)


def test_push_then_download_round_trip(local_hub, repo_id, tmp_path) -> None:
    files = write_model(tmp_path / "model")
    (tmp_path / "model" / "notes.txt").write_text("not a model file")
    url = push_folder(tmp_path / "model", repo_id, commit_message="add model")

    sha = local_hub.branch_sha(repo_id)
    assert url == f"{local_hub.endpoint}/{repo_id}/commit/{sha}"
    assert {k: v for k, v in local_hub.files(repo_id).items() if k != ".gitattributes"} == {
        **files,
        "notes.txt": b"not a model file",
    }

    folder, info = download_model(repo_id)
    assert info == {"type": "hub", "repo_id": repo_id, "revision": None, "sha": sha}
    assert read_folder(folder) == files  # only the model files: notes.txt is not downloaded


def test_revision_pins_the_commit(local_hub, repo_id, tmp_path) -> None:
    write_model(tmp_path / "v1", b"old weights")
    push_folder(tmp_path / "v1", repo_id, commit_message="v1")
    old_sha = local_hub.branch_sha(repo_id)
    write_model(tmp_path / "v2", b"new weights")
    push_folder(tmp_path / "v2", repo_id, commit_message="v2")
    new_sha = local_hub.branch_sha(repo_id)
    assert new_sha != old_sha

    folder, info = download_model(f"{repo_id}@{old_sha}")
    assert (folder / "model.safetensors").read_bytes() == b"old weights"
    assert info["revision"] == info["sha"] == old_sha

    folder, info = download_model(repo_id)
    assert (folder / "model.safetensors").read_bytes() == b"new weights"
    assert info["sha"] == new_sha

    # the keyword overrides @revision, and a branch name resolves to its head
    folder, info = download_model(f"{repo_id}@{old_sha}", revision="main")
    assert (info["revision"], info["sha"]) == ("main", new_sha)


def test_create_pr_leaves_main_untouched(local_hub, repo_id, tmp_path) -> None:
    write_model(tmp_path / "orig", b"backdoored")
    push_folder(tmp_path / "orig", repo_id, commit_message="upload")
    main_sha = local_hub.branch_sha(repo_id)

    write_model(tmp_path / "fixed", b"repaired")
    url = push_folder(
        tmp_path / "fixed", repo_id, commit_message="Remove backdoor", create_pr=True, protected_repo=repo_id
    )

    assert url == f"{local_hub.endpoint}/{repo_id}/discussions/1"
    assert local_hub.branch_sha(repo_id) == main_sha
    assert local_hub.files(repo_id, "refs/pr/1")["model.safetensors"] == b"repaired"
    refs = HfApi().list_repo_refs(repo_id, include_pull_requests=True)
    assert [(r.ref, r.target_commit) for r in refs.pull_requests] == [
        ("refs/pr/1", local_hub.branch_sha(repo_id, "refs/pr/1"))
    ]
    folder, info = download_model(f"{repo_id}@refs/pr/1")
    assert (folder / "model.safetensors").read_bytes() == b"repaired"

    # a second commit to the open PR is allowed on the protected repo too
    (tmp_path / "fixed" / "report.json").write_text("{}")
    push_folder(
        tmp_path / "fixed", repo_id, commit_message="add report", revision="refs/pr/1", protected_repo=repo_id
    )
    assert "report.json" in local_hub.files(repo_id, "refs/pr/1")
    assert local_hub.branch_sha(repo_id) == main_sha


@pytest.mark.parametrize("revision", [None, "main"])
def test_push_refuses_main_of_protected_repo(local_hub, repo_id, tmp_path, revision) -> None:
    write_model(tmp_path / "m")
    push_folder(tmp_path / "m", repo_id, commit_message="upload")
    main_sha = local_hub.branch_sha(repo_id)
    with pytest.raises(HubBackdoorError, match="audited repo") as err:
        push_folder(
            tmp_path / "m", repo_id, commit_message="x", revision=revision, protected_repo=repo_id.upper()
        )
    assert "\n" not in str(err.value)
    assert local_hub.branch_sha(repo_id) == main_sha


def test_pickle_only_repo_needs_allow_pickle(local_hub, repo_id, tmp_path) -> None:
    write_model(tmp_path / "m", b"\x80\x04pickle", pickle_only=True)
    push_folder(tmp_path / "m", repo_id, commit_message="pickle weights")

    with pytest.raises(UnsafeWeightsError, match="--allow-pickle") as err:
        download_model(repo_id)
    assert "\n" not in str(err.value)

    folder, _ = download_model(repo_id, allow_pickle=True)
    assert (folder / "pytorch_model.bin").read_bytes() == b"\x80\x04pickle"


def test_pickle_files_skipped_when_safetensors_exist(local_hub, repo_id) -> None:
    local_hub.commit_files(
        repo_id, {"config.json": b"{}", "model.safetensors": b"st", "pytorch_model.bin": b"pk"}
    )
    folder, _ = download_model(repo_id)
    assert sorted(read_folder(folder)) == ["config.json", "model.safetensors"]
    folder, _ = download_model(repo_id, allow_pickle=True)
    assert sorted(read_folder(folder)) == ["config.json", "model.safetensors"]


def test_repo_without_weights_is_refused(local_hub, repo_id) -> None:
    local_hub.commit_files(repo_id, {"config.json": b"{}", "training_args.bin": b"pk"})
    with pytest.raises(HubBackdoorError, match="no weights"):
        download_model(repo_id)


def test_unknown_repo_and_revision(local_hub, repo_id, tmp_path) -> None:
    with pytest.raises(RepoNotFoundError) as err:
        download_model("tester/does-not-exist")
    assert str(err.value) == (
        f"model repo 'tester/does-not-exist' not found on {local_hub.endpoint} "
        "(check the id, or log in for a private repo)"
    )

    local_hub.commit_files(repo_id, {"model.safetensors": b"st"})
    with pytest.raises(RevisionNotFoundError, match="'v9'") as err:
        download_model(f"{repo_id}@v9")
    assert "\n" not in str(err.value)

    write_model(tmp_path / "m")
    with pytest.raises(RepoNotFoundError):
        push_folder(tmp_path / "m", "tester/does-not-exist", commit_message="x", create_pr=True)
    with pytest.raises(RevisionNotFoundError):
        push_folder(tmp_path / "m", repo_id, commit_message="x", revision="no-such-branch")
    with pytest.raises(HubBackdoorError, match="not a Hub repo id"):
        download_model("not a repo")


def test_card_metadata(local_hub, repo_id, tmp_path) -> None:
    write_model(tmp_path / "m")
    push_folder(tmp_path / "m", repo_id, commit_message="upload")

    assert ModelCard.load(repo_id).data.datasets == ["tester/cifar-mini"]
    data = card_data(repo_id)
    assert data == {
        "license": "apache-2.0",
        "datasets": ["tester/cifar-mini"],
        "tags": ["image-classification"],
    }
    assert HfApi().model_info(repo_id).card_data.datasets == ["tester/cifar-mini"]

    ModelCard("---\ndatasets:\n- tester/other\n---\nNew card").push_to_hub(repo_id)
    assert card_data(repo_id)["datasets"] == ["tester/other"]
    old_sha = local_hub._repo(repo_id, "model").commits[local_hub.branch_sha(repo_id)].parent
    assert card_data(repo_id, old_sha)["datasets"] == ["tester/cifar-mini"]

    no_card = f"{repo_id}-bare"
    local_hub.commit_files(no_card, {"model.safetensors": b"st"})
    assert card_data(no_card) is None


def test_discussions(local_hub, repo_id) -> None:
    local_hub.commit_files(repo_id, {"model.safetensors": b"st"})
    api = HfApi()
    disc = api.create_discussion(repo_id, title="Backdoor found", description="Audit summary")
    api.comment_discussion(repo_id, disc.num, "Details: class 3 is a target")

    [seen] = local_hub.discussions(repo_id)
    assert (seen["num"], seen["title"], seen["is_pull_request"]) == (disc.num, "Backdoor found", False)
    assert seen["description"] == "Audit summary"
    assert seen["comments"] == ["Details: class 3 is a target"]
    assert [d.title for d in api.get_repo_discussions(repo_id)] == ["Backdoor found"]
    details = api.get_discussion_details(repo_id, disc.num)
    assert [e.content for e in details.events] == ["Audit summary", "Details: class 3 is a target"]


def test_hubserver_runs_standalone() -> None:
    script = Path(__file__).with_name("hubserver.py")
    proc = subprocess.Popen([sys.executable, str(script), "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        endpoint = proc.stdout.readline().strip()
        assert endpoint.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{endpoint}/api/whoami-v2", timeout=10) as resp:
            assert json.load(resp)["name"] == "local-user"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
