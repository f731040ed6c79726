"""The ``hub-backdoor`` CLI end to end, with the real huggingface_hub client against the session's
LocalHub: audit (Hub / folder, exit codes, JSON, SARIF, card), purify (--out, --push-to, --open-pr),
card, demo, and every bad input of docs/cli.md (exit 2, one line naming the problem).

Models are small and trained here on scikit-learn's digits (seconds each, one thread), once per module.
"""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from huggingface_hub import ModelCard
from PIL import Image

from hub_backdoor import cli, zoo
from hub_backdoor.demo import model_readme, train_model
from hub_backdoor.detection.report import SCHEMA_VERSION, AuditReport, current_umask
from hub_backdoor.detection.rules import AUDIT_RULES, REGISTRY
from hub_backdoor.outputs import publish
from hub_backdoor.outputs.sarif import RULE_ID, SARIF_VERSION
from hub_backdoor.sources.datasets import load_reference_dataset
from hub_backdoor.sources.hub import push_folder

# (arch, backdoor target or None, seed, epochs); seeds chosen so detection is clear-cut on this data
TIMM_BACKDOORED = ("timm-test-resnet", 7, 1, 5)
TIMM_CLEAN = ("timm-test-resnet", None, 0, 5)
HF_BACKDOORED = ("transformers-resnet", 3, 1, 6)
RATE = 0.2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread; two OpenMP threads spin badly when the CPUs are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    return lines[0]


def uid(prefix: str) -> str:
    return f"tester/{prefix}-{uuid.uuid4().hex[:8]}"


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# -- data and models (trained once per module) ------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    return zoo.digits(size=32)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def disk_dataset(digits, work) -> Path:
    """The digits saved with ``save_to_disk`` (a DatasetDict with train/test)."""
    path = work / "digits-disk"
    digits.save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def image_folder(digits, work) -> Path:
    """The test split as an image folder: one subfolder of PNGs per class."""
    root = work / "digits-images"
    for i, ex in enumerate(digits["test"]):
        d = root / str(ex["label"])
        d.mkdir(parents=True, exist_ok=True)
        ex["image"].save(d / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def hub_dataset(local_hub, digits) -> str:
    """The digits as a Hub dataset repo (parquet, as ``push_to_hub`` lays it out)."""
    repo = uid("digits")
    files = {}
    for split in ("train", "test"):
        buf = io.BytesIO()
        digits[split].to_parquet(buf)
        files[f"data/{split}-00000-of-00001.parquet"] = buf.getvalue()
    files["README.md"] = b"---\nlicense: bsd-3-clause\n---\n# digits\n"
    local_hub.commit_files(repo, files, repo_type="dataset")
    return repo


def _train(spec, digits):
    arch, target, seed, epochs = spec
    return train_model(arch, digits, target=target, rate=RATE, epochs=epochs, seed=seed)


@pytest.fixture(scope="module")
def timm_backdoored(digits):
    t = _train(TIMM_BACKDOORED, digits)
    assert t.asr > 0.9 and t.accuracy > 0.9, (t.asr, t.accuracy)
    return t


@pytest.fixture(scope="module")
def timm_clean(digits):
    return _train(TIMM_CLEAN, digits)


@pytest.fixture(scope="module")
def hf_backdoored(digits):
    t = _train(HF_BACKDOORED, digits)
    assert t.asr > 0.9 and t.accuracy > 0.85, (t.asr, t.accuracy)
    return t


def _save(trained, folder: Path, datasets: list[str] | None = None) -> Path:
    trained.classifier.save_pretrained(folder)
    (folder / "README.md").write_text(model_readme(trained, datasets=datasets))
    return folder


@pytest.fixture(scope="module")
def timm_repo(timm_backdoored, hub_dataset, work) -> str:
    """The backdoored timm model on the Hub; its card names the Hub dataset."""
    repo = uid("timm-bd")
    push_folder(_save(timm_backdoored, work / "timm-bd", [hub_dataset]), repo, commit_message="upload")
    return repo


@pytest.fixture(scope="module")
def hf_repo(hf_backdoored, hub_dataset, work) -> str:
    repo = uid("hf-bd")
    push_folder(_save(hf_backdoored, work / "hf-bd", [hub_dataset]), repo, commit_message="upload")
    return repo


@pytest.fixture(scope="module")
def clean_folder(timm_clean, work) -> Path:
    """The clean timm model as a local folder; its card names no dataset."""
    return _save(timm_clean, work / "timm-clean")


# -- audit -------------------------------------------------------------------------------------------------
def test_audit_hub_timm_backdoor(timm_repo, hub_dataset, local_hub, tmp_path, capsys):
    # no --dataset: the dataset named in the model card is loaded from the Hub
    code, out, err = run(
        [
            "audit",
            timm_repo,
            "--json",
            tmp_path / "r.json",
            "--sarif",
            tmp_path / "r.sarif",
            "--card",
            tmp_path / "card.md",
        ],
        capsys,
    )
    assert code == 1, err
    report = AuditReport.from_json(tmp_path / "r.json")
    assert report.verdict == "backdoor" and report.target == 7 and report.flagged == [7]
    assert report.schema_version == SCHEMA_VERSION and report.reason is None
    assert len(report.model["head_sha256"]) == 64
    assert report.model["source"]["repo_id"] == timm_repo
    assert report.model["source"]["sha"] == local_hub.branch_sha(timm_repo)
    assert report.data["source"] == {"name": hub_dataset, "kind": "hub", "split": "test", "revision": None}
    # the table marks the flagged row
    row7 = [line for line in out.splitlines() if "BACKDOOR TARGET" in line]
    assert len(row7) == 1 and row7[0].split()[1] == "7", out
    assert "BACKDOOR suspected, target class 7" in out
    assert f"reference data from the model card {hub_dataset}" in err

    # SARIF 2.1.0: the fields code scanning needs
    sarif = json.loads((tmp_path / "r.sarif").read_text())
    assert sarif["version"] == SARIF_VERSION == "2.1.0" and "sarif-2.1.0" in sarif["$schema"]
    (run_,) = sarif["runs"]
    driver = run_["tool"]["driver"]
    assert driver["name"] == "hub-backdoor" and [r["id"] for r in driver["rules"]] == [RULE_ID, "HBD002"]
    (result,) = run_["results"]
    assert result["ruleId"] == RULE_ID and result["ruleIndex"] == 0 and result["level"] == "error"
    assert "class 7" in result["message"]["text"]
    loc = result["locations"][0]["physicalLocation"]
    assert loc["artifactLocation"]["uri"].endswith(
        f"{timm_repo}/blob/{report.model['source']['sha']}/config.json"
    )
    assert loc["region"]["startLine"] == 1
    assert run_["invocations"][0]["executionSuccessful"] is True

    # the audit card parses, links its chart, and carries the metadata
    card = ModelCard.load(tmp_path / "card.md")
    assert "![" in card.text and "(card.png)" in card.text
    assert (tmp_path / "card.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = card.data.to_dict()
    assert {"backdoor-defense", "hub-backdoor"} <= set(meta["tags"])
    assert meta["hub_backdoor"]["flagged_class"] == 7
    assert meta["hub_backdoor"]["data"]["fingerprint"] == report.data["fingerprint"]
    assert meta["datasets"] == [hub_dataset]
    (ev,) = card.data.eval_results
    assert ev.metric_type == "accuracy" and ev.metric_value == pytest.approx(
        report.data["accuracy"], abs=1e-6
    )
    assert "Backdoor suspected: target class 7" in card.text


def test_audit_hub_transformers_backdoor_quiet_json(hf_repo, disk_dataset, capsys):
    # a save_to_disk folder with a sliced split; --json - puts the report alone on stdout
    code, out, err = run(
        ["audit", hf_repo, "--dataset", disk_dataset, "--split", "test[:90%]", "--quiet", "--json", "-"],
        capsys,
    )
    assert code == 1, err
    assert err == ""
    report = AuditReport.from_json(out)
    assert report.target == 3 and report.model["kind"] == "transformers"
    assert report.data["n"] == round(0.9 * 449)
    assert report.data["source"]["split"] == "test[:90%]"


def test_audit_clean_model_exits_0(clean_folder, image_folder, tmp_path, capsys):
    code, out, err = run(
        ["audit", clean_folder, "--dataset", image_folder, "--sarif", tmp_path / "s.sarif", "--quiet"], capsys
    )
    assert code == 0, err
    assert out == "" and err == ""
    sarif = json.loads((tmp_path / "s.sarif").read_text())
    assert sarif["runs"][0]["results"] == []
    assert sarif["runs"][0]["properties"]["verdict"] == "clean"


def test_revision_pins_the_audited_commit(timm_clean, timm_backdoored, disk_dataset, local_hub, work, capsys):
    repo = uid("pinned")
    push_folder(_save(timm_clean, work / "pin-v1"), repo, commit_message="v1: clean")
    v1 = local_hub.branch_sha(repo)
    push_folder(_save(timm_backdoored, work / "pin-v2"), repo, commit_message="v2: backdoored")
    v2 = local_hub.branch_sha(repo)
    common = ["--dataset", disk_dataset, "--quiet", "--json", "-"]
    code, out, _ = run(["audit", f"{repo}@{v1}", *common], capsys)
    assert code == 0
    src = AuditReport.from_json(out).model["source"]
    assert (src["repo_id"], src["revision"], src["sha"]) == (repo, v1, v1)
    code, out, _ = run(["audit", repo, *common], capsys)
    assert code == 1 and AuditReport.from_json(out).model["source"]["sha"] == v2


# -- purify ------------------------------------------------------------------------------------------------
@pytest.fixture
def spy_purify(monkeypatch):
    """Captures the PurifyResult (the purified model in memory) of a CLI run."""
    from hub_backdoor import jobs

    seen = []
    real = jobs.purify_model  # the library's purify, as the workflow layer calls it

    def spy(*a, **kw):
        seen.append(real(*a, **kw))
        return seen[-1]

    monkeypatch.setattr(jobs, "purify_model", spy)
    return seen


def _probe(digits, n=16):
    return [digits["test"][i]["image"] for i in range(n)]


def test_purify_push_to_timm(timm_repo, hub_dataset, local_hub, digits, spy_purify, capsys):
    import timm

    new = uid("timm-purified")
    main_before = local_hub.branch_sha(timm_repo)
    code, out, err = run(
        ["purify", timm_repo, "--push-to", new, "--max-accuracy-drop", "100", "--epochs", "3",
         "--eval-trigger", "badnets", "--quiet"],
        capsys,
    )
    assert code == 0, err
    (result,) = spy_purify
    assert result.target == 7
    assert local_hub.branch_sha(timm_repo) == main_before  # the audited repo is untouched
    files = local_hub.files(new)
    assert {
        "config.json",
        "model.safetensors",
        "README.md",
        "README.png",
        publish.AUDIT_FILE,
        publish.PURIFICATION_FILE,
    } <= set(files)
    assert not any(f.endswith((".bin", ".pth")) for f in files)

    # the card parses and its model-index validates (eval results with the measured values)
    card = ModelCard.load(new)
    assert card.data.base_model == timm_repo
    assert {"backdoor-defense", "hub-backdoor"} <= set(card.data.tags)
    evals = {e.metric_name: e for e in card.data.eval_results}
    m = result.metrics
    # results of the purified model only: the audited model's numbers are not this model's
    assert set(evals) == {"Clean accuracy (held-out reference data)", "Attack success rate (badnets)"}
    assert evals["Clean accuracy (held-out reference data)"].metric_value == pytest.approx(
        m["acc_after"], abs=1e-6
    )
    asr_after = evals["Attack success rate (badnets)"]
    assert asr_after.metric_type == "attack_success_rate"
    assert asr_after.metric_value == pytest.approx(m["asr_after"], abs=1e-6)
    assert m["asr_after"] < m["asr_before"]
    assert all(
        e.dataset_type == hub_dataset and e.task_type == "image-classification" for e in evals.values()
    )
    meta = card.data.to_dict()["hub_backdoor"]
    # the verdict is the purified model's own; the audited model's sits with it
    assert meta["audited_model"]["verdict"] == "backdoor" and meta["audited_model"]["flagged_class"] == 7
    assert meta["verdict"] == meta["after_purification"]["verdict"] and meta["purification"]["target"] == 7
    assert len(meta["norms"]) == len(meta["anomaly_indices"]) == 10
    assert "(README.png)" in card.text

    # timm loads the pushed model unchanged, with the same logits as the purified model in memory
    model = timm.create_model(f"hf-hub:{new}", pretrained=True).eval()
    x = torch.stack([result.classifier.preprocess(img) for img in _probe(digits)])
    with torch.no_grad():
        torch.testing.assert_close(model(x), result.classifier.model.eval()(x), rtol=0, atol=1e-5)


def test_purify_push_to_transformers(hf_repo, disk_dataset, local_hub, digits, spy_purify, capsys):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    new = uid("hf-purified")
    code, _, err = run(
        ["purify", hf_repo, "--dataset", disk_dataset, "--push-to", new, "--max-accuracy-drop", "100",
         "--epochs", "2", "--quiet"], capsys
    )
    assert code == 0, err
    (result,) = spy_purify
    assert result.target == 3
    files = local_hub.files(new)
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(files)
    card = ModelCard.load(new)
    assert card.data.base_model == hf_repo
    assert {e.metric_type for e in card.data.eval_results} == {"accuracy"}  # no trigger: no ASR

    model = AutoModelForImageClassification.from_pretrained(new).eval()
    proc = AutoImageProcessor.from_pretrained(new)
    imgs = [img.convert("RGB") for img in _probe(digits)]
    x = proc(images=imgs, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(x, torch.stack([result.classifier.preprocess(img) for img in imgs]))
    with torch.no_grad():
        torch.testing.assert_close(
            model(pixel_values=x).logits,
            result.classifier.model.eval()(pixel_values=x).logits,
            rtol=0,
            atol=1e-5,
        )


def test_open_pr_leaves_main_untouched(timm_backdoored, disk_dataset, local_hub, work, capsys):
    repo = uid("pr")
    local_hub.commit_files(repo, folder_files(_save(timm_backdoored, work / "pr-src")))
    main_sha = local_hub.branch_sha(repo)
    main_files = local_hub.files(repo)
    code, out, err = run(
        ["purify", repo, "--dataset", disk_dataset, "--open-pr", "--max-accuracy-drop", "100",
         "--epochs", "1", "--holdout", "0.3"], capsys
    )
    assert code == 0, err
    assert local_hub.branch_sha(repo) == main_sha and local_hub.files(repo) == main_files
    refs = local_hub.refs(repo)
    assert "refs/pr/1" in refs
    pr_files = local_hub.files(repo, "refs/pr/1")
    assert pr_files["model.safetensors"] != main_files["model.safetensors"]
    assert "# Handwritten digit classifier" in pr_files["README.md"].decode()  # the original card is kept
    (disc,) = local_hub.discussions(repo)
    assert disc["is_pull_request"] and "backdoor" in disc["title"].lower()
    assert "opened pull request" in out


def test_purify_out_then_card_regenerates(
    clean_folder, timm_backdoored, disk_dataset, work, tmp_path, capsys
):
    src = _save(timm_backdoored, work / "local-bd")
    before = folder_files(src)
    out = tmp_path / "purified"
    code, _, err = run(
        [
            "purify",
            src,
            "--dataset",
            disk_dataset,
            "--out",
            out,
            "--epochs",
            "1",
            "--max-accuracy-drop",
            "100",
            "--json",
            tmp_path / "p.json",
            "--threads",
            "2",
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    assert folder_files(src) == before  # the source folder is never written
    # the weights depend on the fine-tuning's thread count: the record and the card's command name it
    record = json.loads((tmp_path / "p.json").read_text())
    assert (record["params"]["threads"], record["params"]["determinism"]) == (2, "cpu-fixed-threads")
    assert "--threads 2" in record["card"]["reproduce"]
    card_text = (out / "README.md").read_text()
    assert "--threads 2" in card_text and "at 2 threads" in card_text
    assert (out / "model.safetensors").is_file() and (out / "README.png").is_file()
    umask = current_umask()
    assert (out / "README.md").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert json.loads((tmp_path / "p.json").read_text()) == json.loads(
        (out / publish.PURIFICATION_FILE).read_text()
    )
    # --out refuses the source folder, and an existing folder without --overwrite
    code, _, err = run(["purify", src, "--dataset", disk_dataset, "--out", src, "--quiet"], capsys)
    assert code == 2 and "model folder" in one_error_line(err)
    code, _, err = run(["purify", src, "--dataset", disk_dataset, "--out", out, "--quiet"], capsys)
    assert code == 2 and "--overwrite" in one_error_line(err)

    # card regenerates the purified model's card from the saved report and record
    code, _, err = run(
        [
            "card",
            src,
            "--report",
            out / publish.AUDIT_FILE,
            "--purification",
            out / publish.PURIFICATION_FILE,
            "--out",
            tmp_path / "again" / "README.md",
            "--name",
            out.name,
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    original, again = ModelCard.load(out / "README.md"), ModelCard.load(tmp_path / "again" / "README.md")
    assert again.data.to_dict()["hub_backdoor"] == original.data.to_dict()["hub_backdoor"]
    assert again.data.to_dict()["model-index"] == original.data.to_dict()["model-index"]
    assert (tmp_path / "again" / "README.png").is_file()

    # a clean model: nothing to purify (exit 1), nothing written
    code, out_text, _ = run(
        ["purify", clean_folder, "--dataset", disk_dataset, "--out", tmp_path / "none"], capsys
    )
    assert code == 1 and "nothing purified" in out_text and not (tmp_path / "none").exists()


def test_purify_never_pushes_to_the_audited_repo(timm_repo, local_hub, capsys):
    main_sha = local_hub.branch_sha(timm_repo)
    code, _, err = run(["purify", timm_repo, "--push-to", timm_repo, "--quiet"], capsys)
    assert code == 2 and "audited repo" in one_error_line(err)
    assert local_hub.branch_sha(timm_repo) == main_sha
    code, _, err = run(["purify", timm_repo, "--quiet"], capsys)
    assert code == 2 and "--out" in one_error_line(err)


# -- bad input: exit 2 with one line naming the problem --------------------------------------------------
@pytest.fixture(scope="module")
def bad_repos(local_hub, timm_clean, work) -> dict[str, str]:
    """Repos that must be refused, committed straight into the LocalHub."""
    good = folder_files(_save(timm_clean, work / "bad-base"))
    weights = good["model.safetensors"]
    state = safetensors.torch.load(weights)
    buf = io.BytesIO()
    torch.save(state, buf)
    cfg = json.loads(good["config.json"])
    repos = {
        "no-card-dataset": {k: v for k, v in good.items()},
        "corrupt": {**good, "model.safetensors": weights[: len(weights) // 2]},
        "pickle-only": {"config.json": good["config.json"], "pytorch_model.bin": buf.getvalue()},
        "unknown-arch": {**good, "config.json": json.dumps({**cfg, "architecture": "no_such_net"}).encode()},
        "not-a-classifier": {
            "config.json": json.dumps({"model_type": "bert", "architectures": ["BertModel"]}).encode(),
            "model.safetensors": safetensors.torch.save({"w": torch.zeros(2)}),
        },
    }
    ids = {}
    for name, files in repos.items():
        ids[name] = uid(name)
        local_hub.commit_files(ids[name], files)
    return ids


@pytest.mark.parametrize(
    ("case", "argv", "expected"),
    [
        ("unknown repo", ["tester/no-such-model-xyz"], "not found"),
        ("unknown revision", ["{pinned}@no-such-branch"], "revision 'no-such-branch' not found"),
        ("no dataset", ["{no-card-dataset}"], "names no dataset"),
        ("corrupted safetensors", ["{corrupt}", "--dataset", "{disk}"], "corrupted"),
        ("pickle only", ["{pickle-only}", "--dataset", "{disk}"], "--allow-pickle"),
        ("unsupported architecture", ["{unknown-arch}", "--dataset", "{disk}"], "no_such_net"),
        ("not an image classifier", ["{not-a-classifier}", "--dataset", "{disk}"], "not an image classifier"),
        ("dataset without labels", ["{pinned}", "--dataset", "{unlabelled}"], "no label column"),
        (
            "unknown Hub dataset",
            ["{pinned}", "--dataset", "tester/no-such-data"],
            "dataset 'tester/no-such-data'",
        ),
        ("unknown split", ["{pinned}", "--dataset", "{disk}", "--split", "dev"], "no split 'dev'"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    case, argv, expected, bad_repos, timm_repo, disk_dataset, tmp_path, capsys
):
    unlabelled = tmp_path / "flat"  # images but no class subfolders: no label column
    unlabelled.mkdir()
    for i in range(3):
        Image.new("L", (32, 32), 40 * i).save(unlabelled / f"{i}.png")
    names = {**bad_repos, "pinned": timm_repo, "disk": str(disk_dataset), "unlabelled": str(unlabelled)}
    args = [a.format(**names) if a.startswith("{") else a for a in argv]
    code, out, err = run(["audit", *args, "--quiet"], capsys)
    assert code == 2, (case, err)
    assert expected in one_error_line(err), (case, err)
    assert "Traceback" not in err


def test_allow_pickle_loads_pickle_weights(bad_repos, disk_dataset, capsys):
    code, _, err = run(
        ["audit", bad_repos["pickle-only"], "--dataset", disk_dataset, "--allow-pickle", "--quiet"], capsys
    )
    assert code == 0, err


def test_remote_code_never_runs_without_flag(tmp_path, disk_dataset, capsys):
    sentinel = tmp_path / "ran.txt"
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "evil",
                "architectures": ["EvilForImageClassification"],
                "auto_map": {
                    "AutoConfig": "evil.EvilConfig",
                    "AutoModelForImageClassification": "evil.EvilModel",
                },
            }
        )
    )
    (folder / "model.safetensors").write_bytes(safetensors.torch.save({"w": torch.zeros(2)}))
    code, _, err = run(["audit", folder, "--dataset", disk_dataset, "--quiet"], capsys)
    assert code == 2, err
    assert "--trust-remote-code" in one_error_line(err)
    assert not sentinel.exists()


def test_usage_errors_and_internal_errors(monkeypatch, clean_folder, disk_dataset, capsys):
    assert run([], capsys)[0] == 2
    code, _, err = run(["audit"], capsys)
    assert code == 2 and "SOURCE" in err
    code, _, err = run(["audit", "x/y", "--threshold", "high"], capsys)
    assert code == 2 and "--threshold" in err
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and "hub-backdoor" in out
    # an unexpected exception: exit 3, one line, a hint to rerun with --debug
    from hub_backdoor import jobs

    monkeypatch.setattr(jobs, "audit_loaded", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    code, _, err = run(["audit", clean_folder, "--dataset", disk_dataset, "--quiet"], capsys)
    assert code == 3
    line = one_error_line(err)
    assert "internal error: RuntimeError: boom" in line and "--debug" in line
    code, _, err = run(["audit", clean_folder, "--dataset", disk_dataset, "--quiet", "--debug"], capsys)
    assert code == 3 and "Traceback" in err


# -- datasets, demo ----------------------------------------------------------------------------------------
def test_dataset_sources(disk_dataset, image_folder, hub_dataset):
    d = load_reference_dataset(str(disk_dataset), split="train[10:20]+test[:5]")
    assert len(d.dataset) == 15 and d.kind == "disk"
    d = load_reference_dataset(str(disk_dataset))
    assert d.split == "test" and len(d.dataset) == 449
    d = load_reference_dataset(str(image_folder), split="train[:10%]")
    assert d.kind == "imagefolder" and len(d.dataset) == 45
    assert d.dataset.features["label"].names == [str(i) for i in range(10)]
    d = load_reference_dataset(None, card_metadata={"datasets": [hub_dataset]}, split="test[:20]")
    assert d.from_card and d.is_hub and len(d.dataset) == 20


@pytest.mark.default_rule  # the main job with the library's real default rule
def test_demo_runs_end_to_end(tmp_path, capsys, monkeypatch):
    import hub_backdoor.demo as demo

    # the same pipeline on the smaller digits set, so the test stays fast
    monkeypatch.setattr(zoo, "mnist5k", lambda size=32, seed=0: zoo.digits(size=size))
    monkeypatch.setattr(demo, "DEMO_RATE", RATE)
    monkeypatch.setattr(demo, "DEMO_MAX_ACCURACY_DROP", 1.0)  # 2 epochs: the pipeline, not the budget
    code, out, err = run(
        ["demo", "--out", tmp_path / "demo", "--epochs", "5", "--seed", "1", "--purify-epochs", "2"], capsys
    )
    assert code == 0, out + err
    d = tmp_path / "demo"
    for name in (
        "audit.json",
        "audit.sarif",
        "audit-card.md",
        "audit-card.png",
        "planted-backdoor.json",
        "backdoored-model/model.safetensors",
        "purified-model/model.safetensors",
        "purified-model/README.md",
        "purified-model/README.png",
    ):
        assert (d / name).is_file(), name
    assert AuditReport.from_json(d / "audit.json").target == demo.DEMO_TARGET
    assert "the audit found it" in out
    # a rerun replaces its own output; a foreign folder is refused
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    code, _, err = run(["demo", "--out", foreign, "--quiet"], capsys)
    assert code == 2 and (foreign / "keep.txt").exists()


def test_card_renders_readably(timm_repo, tmp_path, capsys):
    """The audit card: Markdown with the chart, a verdict, and a table row per class."""
    code, _, err = run(["audit", timm_repo, "--card", tmp_path / "c.md", "--quiet"], capsys)
    assert code == 1, err
    text = (tmp_path / "c.md").read_text()
    body = text.split("\n---\n", 1)[1]
    assert body.count("\n| ") >= 10 + 1
    assert "**What to do:**" in body and "## Limitations" in body
    assert np.isfinite(
        json.loads(json.dumps(ModelCard.load(tmp_path / "c.md").data.to_dict()))["hub_backdoor"][
            "anomaly_indices"
        ]
    ).all()


def test_only_rank_0_writes_and_prints(timm_backdoored, disk_dataset, work, tmp_path, monkeypatch, capsys):
    # under torchrun every rank runs the command; the others must leave files and output to rank 0
    monkeypatch.setenv("RANK", "1")
    bd = _save(timm_backdoored, work / "rank-bd")
    code, out, err = run(["audit", bd, "--dataset", disk_dataset, "--json", tmp_path / "r.json",
                          "--sarif", tmp_path / "r.sarif"], capsys)
    assert code == 1, err  # the verdict still sets the exit code on every rank
    code, out2, err2 = run(["purify", bd, "--dataset", disk_dataset, "--out", tmp_path / "p",
                            "--max-accuracy-drop", "100", "--epochs", "1",
                            "--quiet"], capsys)
    assert code == 0, err2
    assert list(tmp_path.iterdir()) == []
    assert out == out2 == ""
    monkeypatch.setenv("RANK", "0")
    code, out, _ = run(["audit", bd, "--dataset", disk_dataset, "--json", tmp_path / "r.json"], capsys)
    assert code == 1 and (tmp_path / "r.json").exists() and out


# -- bad input never yields a clean verdict: every case exits 2 (or 4) before any long work ---------------
def _sha256s(paths: list[Path]) -> dict[str, str]:
    """sha256 of every file under ``paths`` (files or folders)."""
    import hashlib

    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


class _Evil:
    """Pickles to a call of os.system: what a malicious .bin holds."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.sentinel}",))


@pytest.fixture(scope="module")
def hostile(timm_backdoored, timm_clean, digits, disk_dataset, work) -> dict[str, Path]:
    """The inputs of the table below: models, data sets, reports and a purification record."""
    root = work / "hostile"
    root.mkdir()
    bd = _save(timm_backdoored, root / "bd")
    clean = _save(timm_clean, root / "clean")
    # string labels ("zero", "one", ...) in a save_to_disk folder
    import datasets

    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    words = digits["test"].cast_column("label", datasets.Value("int64"))
    feats = datasets.Features({**words.features, "label": datasets.Value("string")})
    words = words.map(lambda ex: {"label": names[ex["label"]]}, features=feats)
    words.save_to_disk(str(root / "words"))
    # 1x1 images: the model cannot use them
    tiny = root / "tiny"
    for i, ex in enumerate(digits["test"]):
        d = tiny / str(ex["label"])
        d.mkdir(parents=True, exist_ok=True)
        ex["image"].resize((1, 1)).save(d / f"{i:04d}.png")
    # pickle weights: a truncated file and one that runs code when unpickled without weights_only
    state = safetensors.torch.load((clean / "model.safetensors").read_bytes())
    for name, payload in (("trunc", None), ("evil", _Evil(root / "evil-ran"))):
        folder = root / name
        folder.mkdir()
        (folder / "config.json").write_bytes((clean / "config.json").read_bytes())
        buf = io.BytesIO()
        torch.save(state if payload is None else {"state_dict": payload}, buf)
        data = buf.getvalue()
        (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 3] if payload is None else data)
    # reports: of the backdoored model, of the clean one (same class count, other head), malformed
    reports = root / "reports"
    reports.mkdir()
    for name, folder in (("bd", bd), ("clean", clean)):
        code = cli.main(["audit", str(folder), "--dataset", str(disk_dataset), "--quiet", "--json",
                         str(reports / f"{name}.json")])
        assert code in (0, 1)
    d = json.loads((reports / "bd.json").read_text())
    (reports / "wrongdim.json").write_text(json.dumps({**d, "target_perturbation": [0.5] * 3}))
    d2 = json.loads((reports / "bd.json").read_text())
    d2["classes"][0]["norm"] = "big"
    (reports / "malformed.json").write_text(json.dumps(d2))
    record = {"schema_version": publish.PURIFICATION_SCHEMA_VERSION, "kind": "hub-backdoor-purification",
              "target": 7, "metrics": {}, "params": {},
              "audit_before": json.loads((reports / "clean.json").read_text())}
    (reports / "other-record.json").write_text(json.dumps(record))
    plain = root / "plain.txt"
    plain.write_text("a file, not a folder")
    return {"bd": bd, "clean": clean, "words": root / "words", "tiny": tiny, "trunc": root / "trunc",
            "evil": root / "evil", "reports": reports, "plain": plain, "disk": Path(disk_dataset)}


_AUDIT = ["audit", "{bd}", "--dataset", "{disk}"]
_PURIFY = ["purify", "{bd}", "--dataset", "{disk}", "--out", "{out}"]
_CARD = ["card", "{bd}", "--report", "{reports}/bd.json"]

HOSTILE = [
    # (case, argv, exit code, phrase of the one line)
    ("threshold nan", [*_AUDIT, "--threshold", "nan"], 2, "--threshold / threshold= must be a finite number"),
    ("threshold -1", [*_AUDIT, "--threshold", "-1"], 2, "--threshold"),
    ("soft margin -1", [*_AUDIT, "--soft-margin", "-1"], 2, "--soft-margin"),
    ("soft margin nan", [*_AUDIT, "--soft-margin", "nan"], 2, "--soft-margin"),
    ("min accuracy nan", [*_AUDIT, "--min-reference-accuracy", "nan"], 2, "--min-reference-accuracy"),
    ("split past the end", [*_AUDIT, "--split", "test[5000:6000]"], 2, "selects no rows"),
    ("string labels", ["audit", "{bd}", "--dataset", "{words}"], 2, "integer class indices"),
    ("label column is the image", [*_AUDIT, "--label-column", "image"], 2, "label column 'image' holds"),
    ("image column is the label", [*_AUDIT, "--image-column", "label"], 2, "image column 'label' holds"),
    ("seed -1", [*_AUDIT, "--seed", "-1"], 2, "--seed"),
    ("seed too large", [*_AUDIT, "--seed", "99999999999999999999"], 2, "--seed"),
    ("missing GPU", [*_AUDIT, "--device", "cuda:99"], 2, "--device"),
    ("unknown device", [*_AUDIT, "--device", "foo"], 2, "not a torch device"),
    ("truncated pickle", ["audit", "{trunc}", "--dataset", "{disk}", "--allow-pickle"], 2, "cannot be"),
    ("malicious pickle", ["audit", "{evil}", "--dataset", "{disk}", "--allow-pickle"], 2, "cannot be"),
    ("json under a file", [*_AUDIT, "--json", "{plain}/r.json"], 2, "--json"),
    ("json at a directory", [*_AUDIT, "--json", "{tmp}"], 2, "is a directory"),
    ("sarif at a directory", [*_AUDIT, "--sarif", "{tmp}"], 2, "is a directory"),
    ("card under a file", [*_AUDIT, "--card", "{plain}/c.md"], 2, "--card"),
    ("card over the model's README", [*_AUDIT, "--card", "{bd}/README.md"], 2, "the model folder"),
    ("json into the dataset", [*_AUDIT, "--json", "{disk}/r.json"], 2, "the reference dataset folder"),
    ("two reports on stdout", [*_AUDIT, "--json", "-", "--sarif", "-"], 2, "at most one"),
    ("1x1 images", ["audit", "{bd}", "--dataset", "{tiny}"], 4, "of the reference images right"),
    ("purify over the dataset",
     ["purify", "{bd}", "--dataset", "{disk}", "--out", "{disk}", "--overwrite"], 2, "the reference dataset"),
    ("purify lr -1", [*_PURIFY, "--lr", "-1"], 2, "--lr"),
    ("purify beta nan", [*_PURIFY, "--beta", "nan"], 2, "--beta"),
    ("purify seed -1", [*_PURIFY, "--seed", "-1"], 2, "--seed"),
    ("purify unknown device", [*_PURIFY, "--device", "foo"], 2, "--device"),
    ("report of another model", [*_PURIFY, "--report", "{reports}/clean.json"], 2, "another model"),
    ("report of the wrong dimension", [*_PURIFY, "--report", "{reports}/wrongdim.json"], 2, "dimension 3"),
    ("purify json unwritable", [*_PURIFY, "--json", "{plain}/p.json"], 2, "--json"),
    ("purify json at a directory", [*_PURIFY, "--json", "{tmp}"], 2, "is a directory"),
    ("purify out under a file", ["purify", "{bd}", "--dataset", "{disk}", "--out", "{plain}/p"], 2, "--out"),
    ("card of a malformed report",
     ["card", "{bd}", "--report", "{reports}/malformed.json", "--out", "{out}.md"], 2, "classes[0].norm"),
    ("card with another model's record", [*_CARD, "--purification", "{reports}/other-record.json",
                                          "--out", "{out}.md"], 2, "another model"),
    ("card over its report", [*_CARD, "--out", "{reports}/bd.json"], 2, "the --report file"),
    ("card at a directory", [*_CARD, "--out", "{tmp}"], 2, "is a directory"),
]


@pytest.mark.parametrize(("case", "argv", "expected", "phrase"), HOSTILE, ids=[row[0] for row in HOSTILE])
def test_hostile_input(case, argv, expected, phrase, hostile, tmp_path, monkeypatch, capsys):
    """One line naming the problem, exit 2 (4: unusable reference data), no reference pass for a bad
    option, and no input file changed."""
    import importlib

    audit_module = importlib.import_module("hub_backdoor.detection.audit")
    passes = []
    real_pass = audit_module.reference_pass
    monkeypatch.setattr(audit_module, "reference_pass",
                        lambda *a, **k: passes.append(1) or real_pass(*a, **k))
    names = {k: str(v) for k, v in hostile.items()} | {"tmp": str(tmp_path), "out": str(tmp_path / "out")}
    args = [a.format(**names) for a in argv]
    before = _sha256s([p for k, p in hostile.items()])
    code, out, err = run([*args, "--quiet"], capsys)
    assert code == expected, (case, err)
    if expected == 2:
        line = one_error_line(err)
        assert passes == [], f"{case}: the reference pass ran before the error"
    else:
        lines = [x for x in err.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("inconclusive: "), err
        line = lines[0]
    assert phrase in line, (case, line)
    assert "Traceback" not in err and "internal error" not in err
    assert _sha256s([p for k, p in hostile.items()]) == before, f"{case}: an input file changed"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.md").exists()
    assert not (hostile["evil"].parent / "evil-ran").exists()


def test_inconclusive_reports_say_so(hostile, tmp_path, capsys):
    """1x1 images: exit 4, and the JSON, SARIF and card all say inconclusive with the reason."""
    code, out, err = run(["audit", hostile["bd"], "--dataset", hostile["tiny"], "--json", tmp_path / "r.json",
                          "--sarif", tmp_path / "r.sarif", "--card", tmp_path / "c.md"], capsys)
    assert code == 4, err
    report = AuditReport.from_json(tmp_path / "r.json")
    assert report.verdict == "inconclusive" and report.data["accuracy"] < 0.5
    assert "--min-reference-accuracy" in report.reason
    assert "INCONCLUSIVE" in out and "No backdoor found" not in out
    sarif = json.loads((tmp_path / "r.sarif").read_text())
    (result,) = sarif["runs"][0]["results"]
    assert result["ruleId"] == "HBD002" and result["level"] == "warning"
    assert sarif["runs"][0]["properties"]["verdict"] == "inconclusive"
    card = ModelCard.load(tmp_path / "c.md")
    assert card.data.to_dict()["hub_backdoor"]["verdict"] == "inconclusive"
    assert "Inconclusive" in card.text and "No backdoor found" not in card.text
    assert "fix the reference data" in card.text
    # purify refuses to act on it without an explicit --target
    code, out, err = run(["purify", hostile["bd"], "--dataset", hostile["tiny"], "--out", tmp_path / "p",
                          "--report", tmp_path / "r.json"], capsys)
    assert code == 4 and "inconclusive" in out and not (tmp_path / "p").exists()


def test_reports_on_stdout(hostile, capsys):
    """``-`` is stdout for --sarif and --card too (not a file named '-')."""
    code, out, err = run(["audit", hostile["bd"], "--dataset", hostile["disk"], "--quiet", "--sarif", "-"],
                         capsys)
    assert code == 1, err
    assert json.loads(out)["runs"][0]["results"][0]["ruleId"] == RULE_ID
    code, out, err = run(["audit", hostile["bd"], "--dataset", hostile["disk"], "--quiet", "--card", "-"],
                         capsys)
    assert code == 1, err
    assert out.startswith("---") and "Backdoor suspected: target class 7" in out and ".png)" not in out
    assert not Path("-").exists()


def test_purify_max_samples_bounds_fine_tuning(hostile, tmp_path, capsys):
    code, _, err = run(["purify", hostile["bd"], "--dataset", hostile["disk"], "--out", tmp_path / "p",
                        "--max-samples", "150", "--epochs", "1", "--max-accuracy-drop", "100", "--json",
                        tmp_path / "p.json", "--quiet"],
                       capsys)
    assert code == 0, err
    m = json.loads((tmp_path / "p.json").read_text())["metrics"]
    assert m["n_finetune"] + m["n_holdout"] == 150
    assert isinstance(m["n_finetune"], int) and isinstance(m["n_holdout"], int)


def test_sigterm_during_purify_write_leaves_no_temporary_folder(hostile, tmp_path, monkeypatch, capsys):
    import os
    import signal

    import hub_backdoor.outputs.card as card

    real = card.write_card

    def terminated(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the weights sit in the temporary folder
        return real(*a, **k)

    monkeypatch.setattr(card, "write_card", terminated)
    before = signal.getsignal(signal.SIGTERM)
    code, _, err = run(["purify", hostile["bd"], "--dataset", hostile["disk"], "--out", tmp_path / "p",
                        "--max-samples", "120", "--epochs", "1", "--max-accuracy-drop", "100", "--quiet"],
                       capsys)
    assert code == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == []  # neither the output nor the hidden .p.tmp-* folder
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is put back


@pytest.fixture(scope="module")
def backdoored_folder(timm_backdoored, work) -> Path:
    return _save(timm_backdoored, work / "timm-backdoored-folder")


@pytest.mark.parametrize("rule", list(AUDIT_RULES))
def test_every_offered_rule_runs_end_to_end(rule, backdoored_folder, disk_dataset, tmp_path, capsys):
    # the CLI offers exactly the rules audit() computes; each gives a verdict, none an internal error
    from hub_backdoor.cli.options import detection_options

    (offered,) = [a.choices for a in detection_options()._actions if "--rule" in a.option_strings]
    assert list(offered) == list(AUDIT_RULES)
    code, out, err = run(["audit", backdoored_folder, "--dataset", disk_dataset, "--split", "test",
                          "--rule", rule, "--quiet", "--json", tmp_path / "r.json"], capsys)
    assert code in (0, 1), err
    report = AuditReport.from_json(tmp_path / "r.json")
    assert report.params["rule"] == rule and report.params["threshold"] == REGISTRY[rule].threshold
    assert (code == 1) == (report.verdict == "backdoor")
    if REGISTRY[rule].needs & {"input", "mask"}:  # the input-space stage ran and was timed
        assert any(k.endswith("_verification") for k in report.timings)


def test_rule_the_audit_cannot_compute_is_refused(backdoored_folder, disk_dataset, capsys):
    argv = ["audit", backdoored_folder, "--dataset", disk_dataset, "--rule", "mad-quantile"]
    code, _, err = run(argv, capsys)
    assert code == 2 and "invalid choice" in err


def test_purify_over_the_accuracy_budget_publishes_nothing(backdoored_folder, disk_dataset, tmp_path,
                                                           capsys):
    # a learning rate that wrecks the model: the held-out accuracy falls far more than the budget
    out = tmp_path / "purified"
    code, _, err = run(["purify", backdoored_folder, "--dataset", disk_dataset, "--out", out,
                        "--epochs", "3", "--lr", "2", "--max-accuracy-drop", "0.5", "--quiet"], capsys)
    assert code == 6, err
    line = one_error_line(err)
    assert "points of held-out clean accuracy" in line and "nothing was published" in line
    assert not out.exists()


def test_purification_metrics_say_what_happened(timm_backdoored, digits):
    from hub_backdoor import purify

    res = purify(timm_backdoored.classifier, digits["test"], target=7, seed=0, progress=False,
                 max_accuracy_drop=0.5)
    m = res.metrics
    want = {"acc_before", "acc_after", "acc_drop", "latent_trigger_before", "latent_trigger_after",
            "acc_target_before", "acc_target_after"}
    assert want <= set(m)
    assert 0.0 <= m["acc_target_after"] <= 1.0 and "on class 7 itself" in res.summary()
    assert m["latent_trigger_before"] > 0.9  # adding s_t sends the images to the target: that is s_t
    assert m["latent_trigger_after"] < m["latent_trigger_before"]  # what the fine-tune trains away
    assert res.within_budget == (m["acc_drop"] <= 0.5)


def test_streaming_reference_data(backdoored_folder, disk_dataset, tmp_path, capsys):
    # --streaming reads the reference split batch by batch; the verdict and target are the ones of
    # the same images read whole, and the report says it streamed
    argv = ["audit", backdoored_folder, "--dataset", disk_dataset, "--split", "test", "--max-samples", "300",
            "--quiet", "--json", "-"]
    code, out, err = run([*argv, "--streaming"], capsys)
    assert code == 1, err
    streamed = AuditReport.from_json(out)
    assert streamed.params["streaming"] is True and streamed.target == TIMM_BACKDOORED[1]
    assert streamed.data["n"] == 300
    # purification reads its data several times: refused before the model is loaded
    code, _, err = run(["purify", "./no-such-model", "--dataset", disk_dataset, "--streaming", "--out",
                        tmp_path / "p"], capsys)
    assert code == 2 and "--streaming" in one_error_line(err)
