"""Test session setup: one local Hub for the whole session, and a private HF cache.

``huggingface_hub`` reads ``HF_ENDPOINT`` (and the cache paths) when it is first imported, so this
runs at import time of the conftest, which pytest loads before any test module. It:

- starts one :class:`tests.hubserver.LocalHub` on a free loopback port and sets ``HF_ENDPOINT`` to it
  (subprocesses started by tests inherit it, e.g. CLI runs);
- sets ``HF_HUB_OFFLINE=0``, ``HF_HUB_DISABLE_TELEMETRY=1`` and a fake ``HF_TOKEN`` (the local Hub
  accepts any token);
- points ``HF_HOME`` at a fresh temporary folder (removed at exit), so no cache is shared with the
  user's, and drops variables that would override the paths derived from it.

Use the ``local_hub`` fixture to reach the server and its inspection helpers. Tests share the
server: give each repo a unique name (e.g. with ``uuid``).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

if "huggingface_hub" in sys.modules:  # pragma: no cover - guards against a plugin importing it first
    raise RuntimeError("huggingface_hub was imported before tests/conftest.py could set HF_ENDPOINT")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hubserver import LocalHub  # noqa: E402

_HUB = LocalHub().start()
_HF_HOME = tempfile.mkdtemp(prefix="hub-backdoor-tests-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
atexit.register(_HUB.stop)

for _var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HF_XET_CACHE", "HF_TOKEN_PATH"):
    os.environ.pop(_var, None)
os.environ.update(
    HF_ENDPOINT=_HUB.endpoint,
    HF_HOME=_HF_HOME,
    HF_HUB_OFFLINE="0",
    HF_HUB_DISABLE_TELEMETRY="1",
    HF_TOKEN="hf_local_fake_token",
)


if os.environ.get("PYTEST_XDIST_WORKER"):
    # `./dev test` runs two workers on two cores: one torch thread each, so they do not fight over
    # the cores (two threads each made the heaviest files slower than one process alone)
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def local_hub() -> LocalHub:
    """The session's in-memory Hub (its ``endpoint`` is ``HF_ENDPOINT``)."""
    return _HUB


@pytest.fixture(autouse=True)
def _latent_default_rule(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The library's default rule runs an input-space search that costs seconds per audit, and the
    plumbing tests (CLI, Hub, cards, integrations) audit dozens of times: in-process they run the
    latent rule (``detection.LATENT_RULE``, ``agree-mad``) as their default. Tests marked
    ``default_rule`` (the efficacy tests, the default's own tests) run the library's real default;
    subprocesses always do."""
    if request.node.get_closest_marker("default_rule") is None:
        from hub_backdoor.detection import rules as detection

        monkeypatch.setattr(detection, "DEFAULT_RULE", detection.LATENT_RULE)
