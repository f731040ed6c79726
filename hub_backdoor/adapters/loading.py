"""Load a classifier with its provenance: :func:`load_model` (a model folder or a Hub model).

A :class:`LoadedModel` is what every job (``audit``, ``purify``, the integrations) starts from: the
adapted classifier, the folder its files are in, where they came from (Hub repo, the revision asked
for and the commit they were pinned to), the files themselves and their format, and the model card.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CorruptWeightsError, HubBackdoorError, UnsupportedModelError
from ..sources.datasets import looks_like_path
from ..sources.hub import download_model, split_card
from .base import Classifier
from .folder import load_folder

__all__ = ["LoadedModel", "load_model"]


@dataclass
class LoadedModel:
    """A classifier and where it came from.

    ``label`` names it in messages (Hub id, ``id@revision`` or the folder as given); ``repo_id``,
    ``revision`` (as asked; ``None``: the default branch) and ``sha`` (the pinned commit) are set for
    Hub models; ``folder`` holds its files (the HF cache snapshot for Hub models); ``files`` are their
    paths relative to ``folder``; ``format`` is ``"timm"`` or ``"transformers"``; ``card_metadata`` /
    ``card_body`` are its README's YAML and text.
    """

    clf: Classifier
    label: str
    folder: Path
    repo_id: str | None = None
    revision: str | None = None
    sha: str | None = None
    card_metadata: dict[str, Any] = field(default_factory=dict)
    card_body: str = ""
    files: list[str] = field(default_factory=list)

    @property
    def format(self) -> str:
        """The model's library: ``"timm"`` or ``"transformers"``."""
        return str(self.clf.kind)

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None

    @property
    def pinned(self) -> str:
        """The source as a command-line argument pinned to the loaded commit."""
        if self.repo_id:
            return f"{self.repo_id}@{self.sha}" if self.sha else self.repo_id
        return self.label


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "(no message)"


def _refuse_remote_code(folder: Path, label: str, trust_remote_code: bool) -> None:
    """Refuse a model that needs its own code (``auto_map``) unless ``trust_remote_code``."""
    if trust_remote_code:
        return
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return  # the loader reports a missing or broken config
    if isinstance(cfg, dict) and cfg.get("auto_map"):
        raise UnsupportedModelError(
            f"{label} needs its own model code (auto_map in config.json), which is never run without "
            "--trust-remote-code; pass it only if you trust the repo"
        )


def _load_folder(folder: Path, *, label: str, hub: bool, **kw: Any) -> Classifier:
    """:func:`load_folder` with errors that name the model as the user gave it."""
    try:
        return load_folder(folder, **kw)
    except HubBackdoorError as e:
        if hub and str(folder) in str(e):  # name the repo, not the cache folder
            raise type(e)(str(e).replace(str(folder), label)) from e
        raise
    except Exception as e:
        if type(e).__name__ == "SafetensorError":
            raise CorruptWeightsError(
                f"the safetensors weights of {label} are corrupted or truncated ({_one_line(str(e))})"
            ) from e
        raise


def load_model(
    source: str,
    *,
    revision: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    token: str | bool | None = None,
    on_download: Callable[[str], None] | None = None,
    **adapter_kw: Any,
) -> LoadedModel:
    """Load a model folder or a Hub model (``org/name[@revision]``), with its provenance.

    Args:
        source: a timm / transformers folder, or a Hub id ``org/name`` or ``org/name@revision``.
        revision: Hub branch, tag, ``refs/pr/N`` or commit; overrides ``@revision`` in ``source``.
        allow_pickle: also load pickle weights (``.bin``, ``.pth``, ...), which can run code.
        trust_remote_code: let transformers run the repo's own model code (``auto_map``); without
            it such a model is refused (:class:`~hub_backdoor.errors.UnsupportedModelError`).
        token: Hub token; ``None`` uses huggingface_hub's usual places.
        on_download: called with ``source`` before a Hub download starts (progress messages).
        **adapter_kw: adapter options (``processor=``, ...).
    """
    path = Path(source).expanduser()
    repo_id = sha = None
    if path.is_dir():
        folder, label = path, source
    elif path.exists():
        raise UnsupportedModelError(f"{source} is a file; pass a model folder or a Hub id (org/name)")
    elif looks_like_path(source):
        raise UnsupportedModelError(f"model folder {source} does not exist")
    else:
        if on_download is not None:
            on_download(source)
        folder, info = download_model(source, revision=revision, allow_pickle=allow_pickle, token=token)
        repo_id, revision, sha = info["repo_id"], info.get("revision"), info.get("sha")
        label = repo_id if revision is None else f"{repo_id}@{revision}"
    folder = Path(folder)
    _refuse_remote_code(folder, label, trust_remote_code)
    clf = _load_folder(
        folder,
        label=label,
        hub=repo_id is not None,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        **adapter_kw,
    )
    if repo_id is not None:
        clf.source = {**clf.source, "type": "hub", "repo_id": repo_id, "revision": revision, "sha": sha}
        clf.name = repo_id
    meta, body = _card(folder)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return LoadedModel(
        clf, label, folder, repo_id, revision if repo_id else None, sha, meta, body, files
    )


def _card(folder: Path) -> tuple[dict[str, Any], str]:
    """The YAML metadata and text of the folder's README.md (empty without one)."""
    readme = folder / "README.md"
    if not readme.is_file():
        return {}, ""
    return split_card(readme.read_text(encoding="utf-8", errors="replace"))
