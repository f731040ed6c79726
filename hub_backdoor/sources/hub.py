"""Every Hugging Face Hub call of hub_backdoor, through ``huggingface_hub`` only.

- :func:`parse_repo_ref` splits ``org/name@revision``.
- :func:`download_model` fetches the files a classifier needs (config, preprocessor config, model
  card, safetensors weights; pickle weights only on request) at one pinned commit.
- :func:`push_folder` uploads a folder as one commit (or one pull request), never to the main
  branch of the audited repo.
- :func:`card_data` reads the model card metadata (e.g. ``datasets:``).

Hub errors become one-line :class:`~hub_backdoor.errors.HubBackdoorError` subclasses that say what
to do next. The endpoint is huggingface_hub's (``HF_ENDPOINT``, default https://huggingface.co).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any, NoReturn

import yaml
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download, snapshot_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from huggingface_hub.errors import RevisionNotFoundError as HfRevisionNotFoundError
from huggingface_hub.repocard import metadata_load
from huggingface_hub.utils import filter_repo_objects, validate_repo_id

from ..errors import (
    HubBackdoorError,
    HubError,
    HubUnavailableError,
    RepoNotFoundError,
    RevisionNotFoundError,
    UnsafeWeightsError,
)
from ..layout import PURIFICATION_FILE

__all__ = [
    "MODEL_FILE_PATTERNS",
    "PURIFICATION_FILE",
    "PICKLE_SUFFIXES",
    "TRANSIENT_STATUS",
    "card_data",
    "download_model",
    "check_repo_id",
    "parse_repo_ref",
    "push_folder",
    "raise_hub_error",
    "split_card",
]

#: Files a classifier folder needs, downloaded by :func:`download_model`.
MODEL_FILE_PATTERNS = [
    "config.json",
    "preprocessor_config.json",
    "README.md",
    PURIFICATION_FILE,
    "*.safetensors",
    "*.safetensors.index.json",
]
#: Weight files loaded through pickle (arbitrary code execution on load).
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
_PICKLE_PATTERNS = [f"*{suffix}" for suffix in PICKLE_SUFFIXES] + [
    f"*{s}.index.json" for s in PICKLE_SUFFIXES
]
# Pickle files that trainers leave next to the weights; never weights themselves.
_TRAINING_STATE = ["*training_args.bin", "*optimizer.pt", "*optimizer.bin", "*scheduler.pt", "*scaler.pt"]
_TRAINING_STATE += ["*rng_state*.pth"]
# Never uploaded (same as huggingface_hub's upload_folder defaults).
_IGNORED_UPLOADS = [".git", ".git/*", "*/.git", "**/.git/**", ".cache/huggingface", ".cache/huggingface/*"]
_PR_PREFIX = "refs/pr/"


def parse_repo_ref(source: str) -> tuple[str, str | None]:
    """Split ``"org/name@revision"`` into ``("org/name", "revision")``; no ``@`` gives ``None``.

    Raises :class:`HubBackdoorError` for an empty id or an empty revision after ``@``.
    """
    repo_id, sep, revision = source.strip().partition("@")
    repo_id = repo_id.strip().strip("/")
    if not repo_id:
        raise HubBackdoorError(f"no Hub repo id in {source!r}; expected org/name or org/name@revision")
    if sep and not revision.strip():
        raise HubBackdoorError(f"empty revision after '@' in {source!r}; expected org/name@revision")
    return repo_id, (revision.strip() if sep else None)


def download_model(
    source: str,
    *,
    revision: str | None = None,
    allow_pickle: bool = False,
    token: str | bool | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Download the files of a Hub classifier at one commit; returns ``(folder, info)``.

    Args:
        source: ``org/name`` or ``org/name@revision``.
        revision: branch, tag, ``refs/pr/N`` or commit sha; overrides ``@revision`` in ``source``.
        allow_pickle: fetch pickle weights (``.bin``, ``.pth``, ``.pt``, ``.ckpt``) when the repo has
            no safetensors. Without it a repo whose weights exist only as pickle files is refused
            (:class:`UnsafeWeightsError`). Trainer state (``training_args.bin``, ``optimizer.pt``,
            ...) is never fetched nor counted as weights.
        token: Hub token; ``None`` uses huggingface_hub's usual places (``HF_TOKEN``, login).

    ``info`` is ``{"type": "hub", "repo_id", "revision"`` (as asked, ``None`` for the default
    branch) ``, "sha"`` (the commit the files come from) ``}``. The file list and the sha come from
    one repo-info call; the download is then pinned to that sha.
    """
    repo_id, ref_revision = parse_repo_ref(source)
    asked = revision if revision is not None else ref_revision
    check_repo_id(repo_id)
    api = HfApi(token=token)
    try:
        info = api.model_info(repo_id, revision=asked, token=token)
    except Exception as exc:  # raise_hub_error re-raises what it does not map
        raise_hub_error(exc, repo_id=repo_id, revision=asked)
    sha = info.sha
    files = [s.rfilename for s in info.siblings or []]
    at = f"{repo_id}@{asked}" if asked else repo_id

    safetensors = [f for f in files if f.endswith(".safetensors")]
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    pickles = list(filter_repo_objects(pickles, ignore_patterns=_TRAINING_STATE))
    if not safetensors and pickles and not allow_pickle:
        raise UnsafeWeightsError(
            f"model repo '{at}' has weights only as pickle files ({', '.join(sorted(pickles)[:3])}), "
            "which can run arbitrary code when loaded; pass --allow-pickle if you trust the repo"
        )
    if not safetensors and not pickles:
        raise HubBackdoorError(
            f"model repo '{at}' has no weights (*.safetensors, or *.bin/*.pth/*.pt/*.ckpt with "
            "--allow-pickle); check the id and revision"
        )
    # Pickle weights only when allowed and needed: with safetensors present they would be dead weight.
    patterns = MODEL_FILE_PATTERNS + (_PICKLE_PATTERNS if allow_pickle and not safetensors else [])
    try:
        folder = snapshot_download(
            repo_id, revision=sha, allow_patterns=patterns, ignore_patterns=_TRAINING_STATE, token=token
        )
    except Exception as exc:
        raise_hub_error(exc, repo_id=repo_id, revision=asked)
    return Path(folder), {"type": "hub", "repo_id": repo_id, "revision": asked, "sha": sha}


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    commit_message: str,
    create_pr: bool = False,
    revision: str | None = None,
    private: bool = False,
    token: str | bool | None = None,
    protected_repo: str | None = None,
) -> str:
    """Upload every file of ``folder`` to ``repo_id`` as one commit; returns the commit or PR url.

    Args:
        folder: local folder; its layout is kept (``.git`` and ``.cache/huggingface`` are skipped).
        repo_id: target model repo ``org/name``; created (``exist_ok``) unless ``create_pr``.
        commit_message: commit summary (also the PR title with ``create_pr``).
        create_pr: open a pull request against ``revision`` (default: main) instead of committing.
        revision: branch to commit to, or ``refs/pr/N`` to add a commit to an open PR.
        private: visibility when the repo is created.
        token: Hub token; ``None`` uses huggingface_hub's usual places.
        protected_repo: the audited repo: to it only a pull request (new, or ``refs/pr/N``) is allowed.

    All files go in a single ``create_commit`` call, so the push is atomic: either every file lands
    or none does. (``upload_folder`` may split a folder into several commits.)
    """
    check_repo_id(repo_id)
    folder = Path(folder)
    if not folder.is_dir():
        raise HubBackdoorError(f"cannot push {folder}: not a folder")
    is_pr_ref = (revision or "").startswith(_PR_PREFIX)
    if (
        protected_repo is not None
        and repo_id.lower() == protected_repo.lower()
        and not (create_pr or is_pr_ref)
    ):
        raise HubBackdoorError(
            f"refusing to commit to '{repo_id}@{revision or 'main'}': it is the audited repo, which only "
            "gets pull requests; open a pull request (create_pr) or push to another repo"
        )
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    paths = list(filter_repo_objects(paths, ignore_patterns=_IGNORED_UPLOADS))
    if not paths:
        raise HubBackdoorError(f"nothing to push: {folder} has no files")

    api = HfApi(token=token)
    try:
        if not create_pr and not is_pr_ref:
            api.create_repo(repo_id, private=private, exist_ok=True, token=token)
        commit = api.create_commit(
            repo_id,
            operations=[CommitOperationAdd(path_in_repo=p, path_or_fileobj=folder / p) for p in paths],
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
            token=token,
        )
    except Exception as exc:
        raise_hub_error(exc, repo_id=repo_id, revision=revision, writing=True)
    return commit.pr_url if create_pr and commit.pr_url else commit.commit_url


def card_data(
    repo_id: str,
    revision: str | None = None,
    token: str | bool | None = None,
    *,
    repo_type: str = "model",
) -> dict[str, Any] | None:
    """The YAML metadata of the repo's card (README.md) as a dict; ``None`` without a card.

    A card without YAML front matter gives ``{}``.
    """
    check_repo_id(repo_id)
    try:
        path = hf_hub_download(repo_id, "README.md", revision=revision, repo_type=repo_type, token=token)
    except EntryNotFoundError as exc:
        if isinstance(exc, LocalEntryNotFoundError):  # offline / unreachable, not "no card"
            raise_hub_error(exc, repo_id=repo_id, revision=revision, repo_type=repo_type)
        return None
    except Exception as exc:
        raise_hub_error(exc, repo_id=repo_id, revision=revision, repo_type=repo_type)
    try:
        data = metadata_load(path)
    except Exception as exc:  # yaml errors: the card is the repo's, not ours
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise HubBackdoorError(f"the card of '{repo_id}' has invalid YAML metadata ({first})") from None
    return data if isinstance(data, dict) else {}


# -- errors -----------------------------------------------------------------------------------


def check_repo_id(repo_id: str) -> None:
    """Raise :class:`HubBackdoorError` unless ``repo_id`` is a valid ``org/name``."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise HubBackdoorError(
            f"{repo_id!r} is not a Hub repo id; expected org/name (letters, digits, '-', '_', '.')"
        ) from None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of whichever HTTP client this huggingface_hub uses."""
    found: list[type[BaseException]] = [OfflineModeIsEnabled, LocalEntryNotFoundError]
    for module, name in (
        ("httpx2", "TransportError"),
        ("httpx", "TransportError"),
        ("requests", "ConnectionError"),
    ):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


#: HTTP answers after which the same request may succeed (besides 5xx): timeout, conflict, precondition
#: failed (a concurrent commit), too early, too many requests.
TRANSIENT_STATUS = frozenset({408, 409, 412, 425, 429})


def raise_hub_error(
    exc: BaseException,
    *,
    repo_id: str,
    revision: str | None,
    repo_type: str = "model",
    writing: bool = False,
) -> NoReturn:
    """Re-raise a huggingface_hub / transport error as a one-line :class:`HubError` (``from exc``:
    the Hub's own error stays reachable as ``__cause__``)."""
    endpoint = hf_constants.ENDPOINT
    kind = f"{repo_type} repo"
    if isinstance(exc, HubBackdoorError):
        raise exc
    if isinstance(exc, GatedRepoError):
        raise RepoNotFoundError(
            f"{kind} '{repo_id}' on {endpoint} is gated: accept its conditions on the repo page, then log in "
            "(hf auth login) or set HF_TOKEN",
            status=_status(exc), repo_id=repo_id,
        ) from exc
    if isinstance(exc, RepositoryNotFoundError):
        raise RepoNotFoundError(
            f"{kind} '{repo_id}' not found on {endpoint} (check the id, or log in for a private repo)",
            status=_status(exc), repo_id=repo_id,
        ) from exc
    if isinstance(exc, HfRevisionNotFoundError):
        raise RevisionNotFoundError(
            f"revision '{revision or 'main'}' not found in {kind} '{repo_id}' on {endpoint} "
            "(check the branch, tag, refs/pr/N or commit sha)",
            status=_status(exc), repo_id=repo_id,
        ) from exc
    if isinstance(exc, HfHubHTTPError):
        _raise_http_error(exc, kind=kind, repo_id=repo_id, endpoint=endpoint, writing=writing)
    if isinstance(exc, _transport_errors()):
        raise HubUnavailableError(
            f"cannot reach {endpoint} for {kind} '{repo_id}' ({type(exc).__name__}); check the network, "
            "HF_ENDPOINT and HF_HUB_OFFLINE",
            repo_id=repo_id,
        ) from exc
    raise exc


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _raise_http_error(
    exc: HfHubHTTPError, *, kind: str, repo_id: str, endpoint: str, writing: bool
) -> NoReturn:
    """An HTTP answer other than "no such repo/revision": no access, a concurrent change, or a failure."""
    status = _status(exc)
    if status in (401, 403) and writing:
        raise HubError(
            f"no write access to {kind} '{repo_id}' on {endpoint}: log in with a write token "
            "(hf auth login) or set HF_TOKEN, or open a pull request instead",
            status=status, repo_id=repo_id,
        ) from exc
    if status == 412:
        raise HubUnavailableError(
            f"{kind} '{repo_id}' changed while pushing (HTTP 412); run the command again",
            status=status, repo_id=repo_id,
        ) from exc
    message = (exc.server_message or str(exc).splitlines()[0]).splitlines()[0]
    transient = status is None or status >= 500 or status in TRANSIENT_STATUS
    error = HubUnavailableError if transient else HubError
    raise error(
        f"Hub request for {kind} '{repo_id}' failed (HTTP {status}): {message}",
        status=status,
        repo_id=repo_id,
    ) from exc


def split_card(text: str) -> tuple[dict[str, Any], str]:
    """A README's YAML metadata (``{}`` when none) and its body."""
    m = re.match(r"^\ufeff?---\s*\n(.*?)\n---\s*(\n|$)", text, flags=re.DOTALL)
    if m is None:
        return {}, text
    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        meta = None
    return (meta if isinstance(meta, dict) else {}), text[m.end() :]
