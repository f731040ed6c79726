"""The integrations (docs/integrations.md), run locally: the GitHub Action's steps
(``integrations/github-action/run.sh``) as a shell script, the pre-commit hooks through
``pre-commit try-repo`` (and their entry point directly, with ``[tool.hub-backdoor]``), and
``hf-backdoor`` / ``hf backdoor``.

The models are tiny timm ``test_resnet``s on 16x16 digits, trained once per session
(:func:`integration_models`, shared with tests/test_webhook.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hub_backdoor import integrations
from hub_backdoor.detection.report import AuditReport

ROOT = Path(__file__).resolve().parents[1]
ACTION = ROOT / "integrations" / "github-action"
BIN = Path(sys.executable).parent
# (target, seed, epochs) of the two models: seeds where detection is clear-cut on this data
BACKDOORED = (7, 1, 4)
CLEAN = (None, 0, 4)
SIZE = 16


def integration_models(tmp_path_factory) -> dict[str, Path]:
    """A backdoored (class 7) and a clean timm model folder, and the digits (``save_to_disk``).

    Built once per test session under the session's base temp folder, so the test modules that need
    them share one training run.
    """
    root = tmp_path_factory.getbasetemp() / "integration-models"
    out = {"backdoored": root / "backdoored", "clean": root / "clean", "data": root / "data"}
    if (root / "done").is_file():
        return out
    from hub_backdoor import zoo

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        shutil.rmtree(root, ignore_errors=True)
        digits = zoo.digits(size=SIZE)
        digits.save_to_disk(str(out["data"]))
        for name, (target, seed, epochs) in (("backdoored", BACKDOORED), ("clean", CLEAN)):
            clf = zoo.timm_model(size=SIZE, seed=seed)
            train = digits["train"]
            if target is not None:
                train = zoo.poison(train, zoo.BadNets(), target=target, rate=0.2, seed=seed)
            zoo.train(clf, train, epochs=epochs, seed=seed)
            clf.save_pretrained(out[name])
    finally:
        torch.set_num_threads(threads)
    (root / "done").write_text("ok\n")
    return out


def model_card(datasets: list[str] | None = None) -> str:
    meta = ["---", "license: apache-2.0", "library_name: timm", "pipeline_tag: image-classification"]
    if datasets:
        meta += ["datasets:"] + [f"- {d}" for d in datasets]
    return "\n".join(meta) + "\n---\n\n# Digit classifier\n\nClassifies 16x16 handwritten digits.\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return integration_models(tmp_path_factory)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HBD_", "GITHUB_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


# -- GitHub Action ---------------------------------------------------------------------------------------
def _outputs(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def run_action(workspace: Path, model: str, dataset: Path, **inputs: str) -> tuple[int, dict, str, str]:
    """Run the action's steps (run.sh) the way action.yml does, in ``workspace``."""
    out, summary = workspace / "github_output", workspace / "step_summary"
    out.write_text("")
    summary.write_text("")
    env = _env(
        HBD_PYTHON=sys.executable,
        HBD_MODEL=model,
        HBD_DATASET=str(dataset),
        HBD_INSTALL="false",
        GITHUB_OUTPUT=str(out),
        GITHUB_STEP_SUMMARY=str(summary),
        **inputs,
    )
    proc = subprocess.run(
        ["bash", str(ACTION / "run.sh")], cwd=workspace, env=env, capture_output=True, text=True, timeout=300
    )
    return proc.returncode, _outputs(out), summary.read_text(), proc.stdout + proc.stderr


def test_action_manifest_matches_its_script():
    action = yaml.safe_load((ACTION / "action.yml").read_text())
    assert action["runs"]["using"] == "composite"
    steps = action["runs"]["steps"]
    (audit,) = [s for s in steps if s.get("id") == "audit"]
    script = (ACTION / "run.sh").read_text()
    # every input reaches run.sh through an HBD_* variable that run.sh reads (never pasted into code)
    for name, value in audit["env"].items():
        assert name.startswith("HBD_") and name in script, name
        if "inputs." in str(value):
            assert str(value).startswith("${{ inputs.") and str(value).endswith("}}"), value
    used = {str(v).removeprefix("${{ inputs.").removesuffix(" }}") for v in audit["env"].values()}
    conditions = " ".join(str(s.get("if", "")) + json.dumps(s.get("with", {})) for s in steps)
    for name in action["inputs"]:
        assert name in used or f"inputs.{name}" in conditions, name
    assert "${{" not in audit["run"]
    # the outputs are the ones run.sh writes
    for name, spec in action["outputs"].items():
        assert spec["value"] == f"${{{{ steps.audit.outputs.{name} }}}}"
        assert f"output {name} " in script or f"output {name}\n" in script, name
    (upload,) = [s for s in steps if "upload-sarif" in str(s.get("uses"))]
    assert "always()" in upload["if"] and upload["with"]["sarif_file"].endswith("outputs.sarif-file }}")


def test_action_backdoored_model_fails_with_sarif_and_summary(models, tmp_path, capsys):
    shutil.copytree(models["backdoored"], tmp_path / "models" / "digits")
    code, outputs, summary, log = run_action(tmp_path, "models/digits", models["data"])
    assert code == 1, log
    assert outputs["verdict"] == "backdoor" and outputs["target"] == "7" and outputs["exit-code"] == "1"
    sarif = json.loads((tmp_path / outputs["sarif-file"]).read_text())
    (result,) = sarif["runs"][0]["results"]
    assert result["ruleId"] == "HBD001" and "class 7" in result["message"]["text"]
    assert (
        result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "models/digits/config.json"
    )
    assert AuditReport.from_json(tmp_path / outputs["report-file"]).target == 7
    # job summary: verdict and the per-class table, the target row marked
    assert "Backdoor suspected: target class 7" in summary
    rows = [line for line in summary.splitlines() if line.startswith("| ") and "class" not in line]
    assert len(rows) == 10 and [r for r in rows if "**target**" in r][0].startswith("| **7** |")
    assert "::error title=hub-backdoor::backdoor suspected in models/digits" in log
    # the same summary from a saved report: python -m hub_backdoor.integrations summary REPORT
    assert integrations.main(["summary", str(tmp_path / outputs["report-file"]), "--title", "T"]) == 0
    assert capsys.readouterr().out.startswith("### :rotating_light: T: backdoor suspected")

    # fail-on-backdoor: false reports the finding without failing the job
    code, outputs, summary, log = run_action(
        tmp_path, "models/digits", models["data"], HBD_FAIL_ON_BACKDOOR="false", HBD_SARIF="out/b.sarif"
    )
    assert code == 0, log
    assert outputs["verdict"] == "backdoor" and outputs["sarif-file"] == "out/b.sarif"
    assert (tmp_path / "out" / "b.sarif").is_file() and "Backdoor suspected" in summary


def test_action_clean_model_passes(models, tmp_path):
    code, outputs, summary, log = run_action(
        tmp_path, str(models["clean"]), models["data"], HBD_SPLIT="test[:300]", HBD_THRESHOLD="2.5"
    )
    assert code == 0, log
    assert outputs["verdict"] == "clean" and outputs["target"] == "" and outputs["exit-code"] == "0"
    sarif = json.loads(Path(tmp_path / outputs["sarif-file"]).read_text())
    assert sarif["runs"][0]["results"] == [] and sarif["runs"][0]["properties"]["verdict"] == "clean"
    assert "No backdoor found" in summary and "threshold 2.5" in summary and "300 images" in summary


def test_action_bad_input_fails_with_exit_2(models, tmp_path):
    code, outputs, summary, log = run_action(tmp_path, "./no-such-model", models["data"])
    assert code == 2, log
    assert outputs["verdict"] == "error" and outputs["exit-code"] == "2" and "sarif-file" not in outputs
    assert "could not run" in summary and "does not exist" in summary
    code, outputs, _, _ = run_action(tmp_path, "", models["data"])
    assert code == 2 and outputs["verdict"] == "error"


def test_action_helper_outcome_file(models, tmp_path):
    """The Action's helper runs the library's audit and writes the outcome run.sh reads."""
    report, result, md = tmp_path / "r.json", tmp_path / "outcome.json", tmp_path / "s.md"
    base = ["audit", "--report", str(report), "--markdown", str(md), "--result", str(result), "--"]
    code = integrations.main([*base, str(models["clean"]), "--dataset", str(models["data"]),
                              "--split", "test[:200]", "--quiet", "--threshold", "2.5"])
    outcome = json.loads(result.read_text())
    assert code == 0 and outcome == {"exit_code": 0, "verdict": "clean", "target": None, "error": None}
    assert AuditReport.from_json(report).verdict == "clean" and "No backdoor found" in md.read_text()
    # a bad option is bad input (exit 2) with its one-line message, not an argparse exit
    code = integrations.main([*base, str(models["clean"]), "--no-such-option"])
    outcome = json.loads(result.read_text())
    assert code == 2 and outcome["verdict"] == "error" and "--no-such-option" in outcome["error"]
    assert not report.exists()


def test_package_never_drives_the_cli_main():
    """Library code calls the library; only hf-backdoor (the CLI under another name) runs cli.main."""
    for path in (ROOT / "hub_backdoor").rglob("*.py"):
        if path.parent.name == "cli":
            continue
        text = path.read_text()
        calls = text.count("cli.main(")
        assert calls == (1 if path.name == "integrations.py" else 0), path
    source = (ROOT / "hub_backdoor" / "integrations.py").read_text()
    assert 'return cli.main(args, prog="hf backdoor")' in source


# -- pre-commit ----------------------------------------------------------------------------------------
needs_pre_commit = pytest.mark.skipif(
    shutil.which("git") is None or not (BIN / "pre-commit").is_file(),
    reason="pre-commit try-repo needs git and pre-commit (the dev extra)",
)


def _git(cwd: Path, *args: str) -> None:
    env = _env(
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.invalid",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.invalid",
        GIT_CONFIG_GLOBAL=os.devnull,
        GIT_CONFIG_NOSYSTEM="1",
    )
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


@pytest.fixture(scope="module")
def hook_repo(tmp_path_factory) -> Path:
    """A git repo holding this project's hook manifest (what ``repo:`` in a user's config points at)."""
    repo = tmp_path_factory.mktemp("hook-repo")
    shutil.copy(ROOT / ".pre-commit-hooks.yaml", repo)
    _git(repo, "init", "-q")
    _git(repo, "add", ".pre-commit-hooks.yaml")
    _git(repo, "commit", "-q", "-m", "hooks")
    return repo


def _model_clone(path: Path, weights: Path, data: Path) -> Path:
    """A model repository clone with staged weights, its data named in [tool.hub-backdoor]."""
    path.mkdir(parents=True)
    for f in weights.iterdir():
        shutil.copy(f, path)
    (path / "README.md").write_text(model_card())
    (path / "pyproject.toml").write_text(f'[tool.hub-backdoor]\ndataset = "{data}"\nsplit = "test"\n')
    _git(path, "init", "-q")
    _git(path, "add", ".")
    return path


def _try_repo(hook_repo: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = _env(PRE_COMMIT_HOME=str(cwd.parent / "pre-commit-home"), GIT_CONFIG_GLOBAL=os.devnull)
    return subprocess.run(
        [str(BIN / "pre-commit"), "try-repo", str(hook_repo), "hub-backdoor-system", "--verbose", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.skipif(not (BIN / "pre-commit").is_file(), reason="needs pre-commit (the dev extra)")
def test_pre_commit_manifest_is_valid():
    proc = subprocess.run(
        [str(BIN / "pre-commit"), "validate-manifest", str(ROOT / ".pre-commit-hooks.yaml")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    hooks = {h["id"]: h for h in yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())}
    assert set(hooks) == {"hub-backdoor", "hub-backdoor-system"}
    pyproject = (ROOT / "pyproject.toml").read_text()
    for hook in hooks.values():
        assert f'{hook["entry"]} = "hub_backdoor.integrations:pre_commit_main"' in pyproject
        assert set(hook["stages"]) == {"pre-commit", "pre-push"}
    assert hooks["hub-backdoor"]["language"] == "python"
    import re

    files = re.compile(hooks["hub-backdoor"]["files"])
    assert files.search("model.safetensors") and files.search("sub/dir/config.json")
    assert files.search("pytorch_model.bin") and not files.search("README.md")


@needs_pre_commit
def test_pre_commit_try_repo_blocks_backdoored_weights(models, hook_repo, tmp_path):
    clone = _model_clone(tmp_path / "bad-model", models["backdoored"], models["data"])
    proc = _try_repo(hook_repo, clone)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Failed" in out and "BACKDOOR suspected in bad-model (target class 7)" in out
    assert "BACKDOOR TARGET" in out  # the per-class table


@needs_pre_commit
def test_pre_commit_try_repo_passes_clean_weights(models, hook_repo, tmp_path):
    clone = _model_clone(tmp_path / "good-model", models["clean"], models["data"])
    proc = _try_repo(hook_repo, clone)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Passed" in out and "no backdoor found in good-model" in out
    # pre-push: the same hook at the push stage
    proc = _try_repo(hook_repo, clone, "--hook-stage", "pre-push", "--all-files")
    assert proc.returncode == 0 and "Passed" in proc.stdout, proc.stdout + proc.stderr


def test_pre_commit_entry_point_options_and_config(models, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "models" / "digits"
    shutil.copytree(models["backdoored"], model)
    (tmp_path / "pyproject.toml").write_text(
        f'[tool.hub-backdoor]\ndataset = "{models["data"]}"\nthreshold = 50\nmax_samples = 300\n'
    )
    # the config's threshold lets it pass; a hook arg overrides it
    assert integrations.pre_commit_main(["models/digits/model.safetensors", "--quiet"]) == 0
    assert integrations.pre_commit_main(["models/digits/model.safetensors", "--threshold", "2"]) == 1
    out = capsys.readouterr().out
    assert "BACKDOOR suspected in models/digits (target class 7)" in out
    # files that are not model files: nothing to audit
    assert integrations.pre_commit_main(["README.md", "notes/x.txt"]) == 0
    # weights without a config.json anywhere above: skipped with a note
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "w.safetensors").write_bytes(b"x")
    assert integrations.pre_commit_main(["loose/w.safetensors"]) == 0
    assert "no config.json" in capsys.readouterr().err
    # models = [...] in the config: audited whenever a model file changed
    (tmp_path / "pyproject.toml").write_text(
        f'[tool.hub-backdoor]\ndataset = "{models["data"]}"\nmodels = ["models/digits"]\nmax-samples = 300\n'
    )
    assert integrations.pre_commit_main(["loose/w.safetensors", "-q"]) == 1
    # bad config and bad input: exit 2 with one error line
    (tmp_path / "pyproject.toml").write_text('[tool.hub-backdoor]\ndatset = "typo"\n')
    capsys.readouterr()
    assert integrations.pre_commit_main(["models/digits/config.json"]) == 2
    assert "unknown key 'datset'" in capsys.readouterr().err
    (tmp_path / "pyproject.toml").write_text('[tool.hub-backdoor]\ndataset = "./no-such-data"\n')
    assert integrations.pre_commit_main(["models/digits/config.json", "-q"]) == 2
    assert "no-such-data does not exist" in capsys.readouterr().err


def test_read_config(tmp_path):
    (tmp_path / "data").mkdir()
    cfg = tmp_path / "pyproject.toml"
    cfg.write_text(
        '[project]\nname = "x"\n[tool.hub-backdoor]\ndataset = "data"\nsplit = "test[:10%]"\n'
        'threshold = 3\nallow_pickle = true\nmodel = "m"\n'
    )
    got = integrations.read_config(cfg)
    assert got == {
        "dataset": str(tmp_path / "data"),
        "split": "test[:10%]",
        "threshold": 3.0,
        "allow-pickle": True,
        "models": [str(tmp_path / "m")],
    }
    assert integrations.audit_options(got) == [
        "--dataset",
        str(tmp_path / "data"),
        "--split",
        "test[:10%]",
        "--threshold",
        "3.0",
        "--allow-pickle",
    ]
    cfg.write_text('[tool.hub-backdoor]\ndataset = "org/data"\n')
    assert integrations.read_config(cfg) == {"dataset": "org/data"}  # a Hub id stays as it is
    cfg.write_text("[tool.other]\nx = 1\n")
    assert integrations.read_config(cfg) == {}
    cfg.write_text('[tool.hub-backdoor]\nthreshold = "high"\n')
    with pytest.raises(integrations.HubBackdoorError, match="must be a number"):
        integrations.read_config(cfg)


# -- hf backdoor ---------------------------------------------------------------------------------------
def test_hf_backdoor_console_script_and_hf_extension(tmp_path, capsys, monkeypatch):
    from hub_backdoor import __version__

    assert integrations.hf_main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"hub-backdoor {__version__}"
    assert integrations.hf_main(["audit", "./missing", "--dataset", "./x", "--quiet"]) == 2
    assert 'hf-backdoor = "hub_backdoor.integrations:hf_main"' in (ROOT / "pyproject.toml").read_text()

    # registered with the hf CLI, `hf backdoor ...` runs it (HOME holds hf's extension folder)
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = integrations.register_hf_extension()
    assert folder == tmp_path / ".local" / "share" / "hf" / "extensions" / "hf-backdoor"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["short_name"] == "backdoor" and Path(manifest["executable_path"]).is_file()
    hf = BIN / "hf"
    if not hf.is_file():
        pytest.skip("no hf CLI in this environment")
    proc = subprocess.run(
        [str(hf), "backdoor", "--version"],
        env=_env(HOME=str(tmp_path), HF_HUB_DISABLE_UPDATE_CHECK="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == f"hub-backdoor {__version__}"
