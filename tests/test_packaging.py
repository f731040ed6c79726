"""The wheel holds every package of the tree, the webhook service (integrations/hub_webhook, installed
as hub_backdoor_webhook) and its console script, and the data files the library reads."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")

ROOT = Path(__file__).resolve().parent.parent


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_the_package_list_is_the_tree():
    cfg = _config()
    found = {".".join(d.relative_to(ROOT).parts) for d in (ROOT / "hub_backdoor").rglob("*")
             if d.is_dir() and d.name != "__pycache__"} | {"hub_backdoor"}
    mapped = set(cfg["package-dir"])
    assert set(cfg["packages"]) == found | mapped
    assert cfg["package-dir"]["hub_backdoor_webhook"] == "integrations/hub_webhook"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and "No module named" in done.stderr:
        pytest.skip(f"cannot build a wheel here: {done.stderr.strip()[-200:]}")
    assert done.returncode == 0, done.stderr[-2000:]
    return zipfile.ZipFile(next(out.glob("*.whl")))


def test_the_wheel_installs_the_webhook_and_the_data(wheel):
    names = set(wheel.namelist())
    for module in (ROOT / "integrations" / "hub_webhook").glob("*.py"):
        assert f"hub_backdoor_webhook/{module.name}" in names
    for data in ("hub_backdoor/detection/calibration/standard.json",
                 "hub_backdoor/outputs/cards/security_card.md", "hub_backdoor/py.typed",
                 "hub_backdoor/purification/metrics/attack_success_rate/attack_success_rate.py"):
        assert data in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = wheel.read(entry).decode()
    assert "hub-backdoor-webhook = hub_backdoor_webhook.service:main" in scripts
    assert "hub-backdoor = hub_backdoor.cli:main" in scripts


def test_the_webhook_runs_installed_without_a_checkout(wheel, tmp_path):
    # unpacked away from the checkout, next to nothing else: the service's --help answers
    wheel.extractall(tmp_path / "site")
    done = subprocess.run([sys.executable, "-m", "hub_backdoor_webhook", "--help"], cwd=tmp_path,
                          env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage: hub-backdoor-webhook" in done.stdout
