"""The webhook service: HTTP endpoint, event filter, background workers and the answer on the Hub.

HTTP (FastAPI on uvicorn, the stack huggingface_hub's ``WebhooksServer`` builds on; install with
``pip install 'hub-backdoor[webhook]'``):

- ``POST /`` or ``POST /webhook``: a Hub webhook delivery. 401 without the right
  ``X-Webhook-Secret``; 400 for a body that is not a Hub webhook payload (parsed with
  huggingface_hub's ``WebhookPayload`` model); 413 for a body over ``max_body`` bytes; 200
  ``{"status": "ignored"}`` for events the service does not act on (not a content update, not a
  model, repo not watched, no watched branch moved); 202 ``{"status": "accepted", "jobs": [...]}``
  otherwise, each job ``queued`` or ``duplicate`` (that commit is already queued, running or
  audited); 503 when the queue is full (the Hub may deliver again later).
- ``GET /healthz``: ``{"ok": true, "jobs": {status: count}}``.
- ``GET /jobs`` (with the secret header): the latest jobs and events.

Each job audits ``repo@commit`` with :func:`hub_backdoor.audit` (the data: the operator's mapping,
else the model card's ``datasets:``), then answers in the repo's discussion titled
:attr:`Config.discussion_title` (created when missing): the verdict, the per-class table and, when a
backdoor was found and ``open_pr`` is on, the link to a pull request (``refs/pr/N``) with the model
from :func:`hub_backdoor.purify` and its security card
(:func:`hub_backdoor.outputs.publish.open_purification_pr`; main is never written). Failures are
retried unless they are the input's fault (see :func:`is_transient`).
"""

from __future__ import annotations

import argparse
import fnmatch
import hmac
import inspect
import json
import logging
import os
import re
import shlex
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hub_backdoor.jobs import audit_loaded
from hub_backdoor.options import AuditOptions, PurifyOptions
from hub_backdoor.sources.hub import TRANSIENT_STATUS

from .store import Job, JobStore

log = logging.getLogger("hub_backdoor.webhook")

ENV_PREFIX = "HUB_BACKDOOR_WEBHOOK_"
SECRET_HEADER = "X-Webhook-Secret"
CONTENT_SCOPE = "repo.content"
_SHA_RE = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_ZERO_SHA = re.compile(r"^0+$")
#: Marks the service's comments (with the commit), so a retried job never comments twice.
MARKER = "<!-- hub-backdoor-webhook audit {sha} -->"
DISCUSSION_INTRO = (
    "This discussion collects the automatic backdoor audits of this repository by a hub-backdoor "
    "webhook service: one comment per audited revision, with the verdict and the per-class table. A "
    "backdoor is suspected when one class can be reached by an abnormally small change of the model's "
    "penultimate embedding (a shortcut that a trigger would use)."
)
#: ``hub_backdoor.audit`` keywords an operator may set (``--audit-option KEY=VALUE``); the data, the
#: threshold and the sample count have their own options, the rest belongs to the service.
AUDIT_OPTIONS = tuple(n for n in AuditOptions.names() if n not in ("threshold", "max_samples"))
#: :class:`~hub_backdoor.options.PurifyOptions` an operator may set (``--purify-option KEY=VALUE``); the
#: epochs and the accuracy budget have their own options.
PURIFY_OPTIONS = tuple(n for n in PurifyOptions.names() if n not in ("epochs", "max_accuracy_drop"))


class BadPayload(ValueError):
    """The body is not a Hub webhook payload (HTTP 400)."""


@dataclass
class Config:
    """Service settings (``hub-backdoor-webhook --help`` documents each).

    ``repos``: watched model repos, ``fnmatch`` patterns (``org/*``), case-insensitive.
    ``datasets``: ``(repo pattern, dataset)`` pairs, first match wins; no match: the model card's
    ``datasets:``. ``audit_options``: more :func:`hub_backdoor.audit` keywords (names in
    :data:`AUDIT_OPTIONS`, e.g. ``{"rule": "mad"}``); the purification uses the ones it shares.
    ``purify_options``: more :class:`~hub_backdoor.options.PurifyOptions` (names in
    :data:`PURIFY_OPTIONS`, e.g. ``{"beta": 5.0}``); with ``purify_epochs`` and
    ``max_accuracy_drop`` (a share), :meth:`purification` reads them.
    """

    secret: str
    repos: list[str]
    db: Path = Path("hub-backdoor-webhook.sqlite3")
    host: str = "127.0.0.1"
    port: int = 8080
    branches: list[str] = field(default_factory=lambda: ["main"])
    open_pr: bool = False
    datasets: list[tuple[str, str]] = field(default_factory=list)
    split: str | None = None
    threshold: float | None = None
    max_samples: int | None = None
    audit_options: dict[str, Any] = field(default_factory=dict)
    purify_epochs: int | None = None  # None: purify's default (auto)
    max_accuracy_drop: float = 0.01  # accuracy budget of the purified model: beyond it no pull request
    purify_options: dict[str, Any] = field(default_factory=dict)
    queue_size: int = 100
    max_attempts: int = 3
    retry_delay: float = 30.0
    workers: int = 1
    comment_errors: bool = True
    discussion_title: str = "hub-backdoor: backdoor audits"
    max_body: int = 1 << 20
    threads: int | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.audit_options) - set(AUDIT_OPTIONS))
        if unknown:
            raise ValueError(f"unknown audit options {unknown}; known: {', '.join(AUDIT_OPTIONS)}")
        unknown = sorted(set(self.purify_options) - set(PURIFY_OPTIONS))
        if unknown:
            raise ValueError(f"unknown purify options {unknown}; known: {', '.join(PURIFY_OPTIONS)}")

    def watches(self, repo: str) -> bool:
        return any(fnmatch.fnmatchcase(repo.lower(), p.lower()) for p in self.repos)

    def dataset_for(self, repo: str) -> str | None:
        for pattern, dataset in self.datasets:
            if fnmatch.fnmatchcase(repo.lower(), pattern.lower()):
                return dataset
        return None

    def options(self) -> AuditOptions:
        """The audit options of every job (data and model aside)."""
        return AuditOptions.from_mapping(
            {**self.audit_options, "max_samples": self.max_samples or None, "threshold": self.threshold},
            where="audit options",
        )

    def purification(self) -> PurifyOptions:
        """The purification options of every pull request (the ones shared with the audit aside)."""
        return PurifyOptions.from_mapping(
            {**self.purify_options, "epochs": self.purify_epochs,
             "max_accuracy_drop": self.max_accuracy_drop},
            where="purify options",
        )

    def audit_kwargs(self) -> dict[str, Any]:
        """Keywords of :func:`hub_backdoor.audit` for every job (data and model aside)."""
        return self.options().kwargs()

    def reproduce_args(self, repo: str) -> list[str]:
        """The ``hub-backdoor audit`` options that redo a job's audit of ``repo`` (for the comment)."""
        argv: list[str] = []
        dataset = self.dataset_for(repo)
        if dataset:
            argv += ["--dataset", dataset]
        if self.split:
            argv += ["--split", self.split]
        if self.max_samples:
            argv += ["--max-samples", str(self.max_samples)]
        if self.threshold is not None:
            argv += ["--threshold", str(self.threshold)]
        for key, value in self.audit_options.items():
            if key != "device":  # where it ran, not what it found
                argv += [f"--{key.replace('_', '-')}", str(value)]
        return argv


# -- events ----------------------------------------------------------------------------------------------
@dataclass
class Target:
    """A revision to audit: ``repo`` at commit ``sha`` (``ref`` that moved there, if known)."""

    repo: str
    sha: str
    ref: str | None


def _validation_message(error: Any) -> str:
    """The first few problems of a pydantic ``ValidationError``, as ``where: what``."""
    parts = []
    for e in error.errors()[:3]:
        where = ".".join(str(x) for x in e.get("loc", ())) or "payload"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    more = error.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def parse_payload(payload: Any) -> Any:
    """Validate a decoded body as huggingface_hub's :class:`~huggingface_hub.WebhookPayload` (v3).

    Raises :class:`BadPayload` when it is not one: a missing or mistyped field, an unsupported
    ``webhook.version``, a repo name that is not a repo id, or a commit that is not a sha.
    """
    import pydantic
    from huggingface_hub import WebhookPayload

    if not isinstance(payload, dict):
        raise BadPayload("the body is not a JSON object")
    repo = payload.get("repo")
    if isinstance(repo, dict) and "headSha" in repo and "head_sha" not in repo:
        # the Hub sends repo.headSha; huggingface_hub's model names the field head_sha
        payload = {**payload, "repo": {**repo, "head_sha": repo["headSha"]}}
    try:
        event = WebhookPayload.model_validate(payload)
    except pydantic.ValidationError as e:
        raise BadPayload(_validation_message(e)) from None
    if not _REPO_RE.match(event.repo.name):
        raise BadPayload(f"repo.name {event.repo.name!r} is not a repo id")
    head = event.repo.head_sha
    if head is not None and not _SHA_RE.match(head):
        raise BadPayload("repo.headSha is not a commit sha")
    for i, ref in enumerate(event.updatedRefs or []):
        if ref.newSha is not None and not (_SHA_RE.match(ref.newSha) or _ZERO_SHA.match(ref.newSha)):
            raise BadPayload(f"updatedRefs[{i}].newSha is not a commit sha")
    return event


def parse_event(payload: Any, config: Config) -> tuple[list[Target], str]:
    """What a webhook payload asks for: ``(targets, reason)``; no targets means ignored, for ``reason``.

    ``payload`` is the decoded body (or an already parsed ``WebhookPayload``). Raises
    :class:`BadPayload` when it does not have the Hub's shape (see :func:`parse_payload`).
    """
    from huggingface_hub import WebhookPayload

    event = payload if isinstance(payload, WebhookPayload) else parse_payload(payload)
    scope, action = event.event.scope, event.event.action
    name, refs = event.repo.name, event.updatedRefs
    if scope != CONTENT_SCOPE or action != "update":
        return [], f"not a content update (scope {scope}, action {action})"
    if event.repo.type != "model":
        return [], f"not a model repo ({event.repo.type})"
    if not config.watches(name):
        return [], f"repo {name} is not watched"
    watched = {f"refs/heads/{b}" for b in config.branches}
    targets = [
        Target(name, r.newSha, r.ref)
        for r in refs or []
        if r.ref in watched and r.newSha and not _ZERO_SHA.match(r.newSha)  # zero: the branch was deleted
    ]
    if not refs and event.repo.head_sha:  # no ref list: the head of the default branch
        targets.append(Target(name, event.repo.head_sha, None))
    if not targets:
        moved = ", ".join(r.ref for r in refs or []) or "none"
        return [], f"no watched branch updated (refs: {moved}; watched: {', '.join(config.branches)})"
    return targets, "content update"


# -- the audit job ------------------------------------------------------------------------------------------
class PermanentError(Exception):
    """The job cannot succeed by trying again (bad model, no data); it fails at once."""


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors: the HTTP clients huggingface_hub and datasets use, and the OS's."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    found: list[type[BaseException]] = [ConnectionError, TimeoutError, LocalEntryNotFoundError]
    for module, names in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        mod = sys.modules.get(module)  # a client nobody imported raised nothing
        found += [getattr(mod, n) for n in names if mod is not None and hasattr(mod, n)]
    return tuple(found)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling (hub_backdoor's one-line
    errors are raised ``from None``, which hides the Hub's error from tracebacks, not from here)."""
    out: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and all(e is not o for o in out):
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def is_transient(exc: BaseException) -> bool:
    """Whether trying again later may succeed: the Hub answered 5xx, 408, 409, 412, 425 or 429, or a
    connection failed, anywhere in ``exc``'s chain. A 4xx answer (no such repo or revision, no
    access) and hub_backdoor's input errors without such a cause are not transient."""
    from huggingface_hub.errors import HfHubHTTPError

    transport = _transport_errors()
    for e in _chain(exc):
        if isinstance(e, HfHubHTTPError):
            status = e.response.status_code if e.response is not None else None
            return status is None or status >= 500 or status in TRANSIENT_STATUS
        if isinstance(e, transport):
            return True
    return False


def is_permanent(exc: BaseException) -> bool:
    """Whether a job that raised ``exc`` should fail at once: :class:`PermanentError`, or one of
    hub_backdoor's input errors (:class:`~hub_backdoor.errors.HubBackdoorError`) that is not
    :func:`transient <is_transient>`. Anything else (a bug, an unexpected error) is retried."""
    from hub_backdoor.errors import HubBackdoorError

    if isinstance(exc, PermanentError):
        return True
    return isinstance(exc, HubBackdoorError) and not is_transient(exc)


@dataclass
class Revision:
    """A Hub model at one commit, ready to audit: the classifier, its card and the reference data."""

    repo: str
    sha: str
    model: Any  # hub_backdoor.adapters.loading.LoadedModel
    data: Any  # hub_backdoor.sources.datasets.LoadedDataset
    card_metadata: dict[str, Any]
    card_body: str

    @property
    def clf(self) -> Any:
        return self.model.clf


def _quiet_libraries() -> None:
    """No progress bars or per-request lines from the libraries in the service's log."""
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    for name in ("timm", "transformers", "datasets", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover - a dependency of hub_backdoor
        pass


class Auditor:
    """Audits one job and answers on the Hub. Replace :meth:`run` to change what a job does."""

    def __init__(self, config: Config, store: JobStore) -> None:
        self.config = config
        self.store = store

    def load(self, job: Job) -> Revision:
        """Download ``job.repo@job.sha`` (safetensors only), its card and its reference data."""
        from hub_backdoor.jobs import load_inputs

        # safetensors only, never the repo's own code (refused); pinned to the pushed commit
        model, data = load_inputs(job.repo, revision=job.sha, dataset=self.config.dataset_for(job.repo),
                                  split=self.config.split, options=self.config.options())
        return Revision(job.repo, job.sha, model, data, model.card_metadata, model.card_body)

    def run(self, job: Job) -> dict[str, Any]:
        """Audit ``job.repo@job.sha``; comment; open a PR when asked. Returns the fields to store.

        Errors propagate; :meth:`Service.process` decides from their type whether to retry.
        """

        if self.config.threads:
            import torch

            torch.set_num_threads(self.config.threads)
        rev = self.load(job)
        report = audit_loaded(rev.model, rev.data, self.config.options())
        log.info("job %s: %s@%s is %s", job.id, job.repo, job.sha, report.verdict)
        pr_url, pr_error = job.pr_url, None
        if report.backdoor_found and self.config.open_pr and not pr_url:
            try:
                pr_url = self.open_pr(job, rev, report)
            except Exception as e:  # noqa: BLE001 - the verdict is still worth telling
                if is_transient(e):
                    raise
                pr_error = " ".join(str(e).split())[:300] or type(e).__name__
                log.error("job %s: could not open a pull request: %s", job.id, pr_error)
            else:
                log.info("job %s: opened pull request %s", job.id, pr_url)
                self.store.update(job.id, pr_url=pr_url)
        text = self.comment_text(job, report, pr_url, pr_error)
        comment_url = job.comment_url or self.comment(job, text)
        self.store.update(job.id, comment_url=comment_url)
        return {
            "verdict": report.verdict,
            "target": report.target,
            "report": report.to_json(indent=None),
            "error": None,
        }

    def open_pr(self, job: Job, rev: Revision, report: Any) -> str:
        """Purify ``rev`` against ``report``'s target, audit the result, open the pull request;
        returns its URL."""
        import hub_backdoor
        from hub_backdoor.outputs.publish import open_purification_pr
        from hub_backdoor.sources.reference import ReferenceData

        opts = self.config.audit_options
        shared = set(inspect.signature(hub_backdoor.purify).parameters) & set(opts)
        result = hub_backdoor.purify(
            rev.clf,
            rev.data.dataset,
            report=report,
            progress=False,
            **self.config.purification().kwargs(),
            **{k: opts[k] for k in shared},
        )
        result.classifier.model.to("cpu")
        # the purified model is audited on the part it was fine-tuned on, as `hub-backdoor purify` does
        data = ReferenceData(
            rev.data.dataset, image_column=opts.get("image_column"), label_column=opts.get("label_column")
        )
        fit = data.split(float(result.params["holdout"]), int(result.params["seed"]))[0]
        after = audit_loaded(rev.model, rev.data, self.config.options(), dataset=fit,
                             classifier=result.classifier)
        return open_purification_pr(
            result,
            repo_id=job.repo,
            sha=job.sha,
            dataset=rev.data,
            report_after=after,
            card_metadata=rev.card_metadata,
            card_body=rev.card_body,
        )

    def comment_text(self, job: Job, report: Any, pr_url: str | None, pr_error: str | None = None) -> str:
        from hub_backdoor.integrations import summary_markdown

        ref = f" ({job.ref})" if job.ref else ""
        text = summary_markdown(
            report,
            title=f"hub-backdoor audit of {job.repo}@{job.sha[:10]}{ref}",
            reproduce=f"hub-backdoor audit {job.repo}@{job.sha}"
            + "".join(f" {shlex.quote(a)}" for a in self.config.reproduce_args(job.repo)),
        )
        if report.backdoor_found:
            if pr_error:
                text += f"\nThe service could not open a pull request with the purified model: {pr_error}\n"
            if pr_url:
                text += (
                    f"\nA pull request with the purified model and its security card: {pr_url}. "
                    "Review it before merging; until then, do not use this revision.\n"
                )
            else:
                text += (
                    "\nTo remove the backdoor: `hub-backdoor purify "
                    f"{job.repo}@{job.sha} --open-pr` opens a pull request with the purified model.\n"
                )
        return MARKER.format(sha=job.sha) + "\n" + text

    def error_text(self, job: Job, message: str) -> str:
        return (
            MARKER.format(sha=job.sha)
            + f"\n### :x: hub-backdoor could not audit {job.repo}@{job.sha[:10]}\n\n{message}\n\n"
            "Fix the model or its card (e.g. name the reference data in `datasets:`), or ask the "
            "operator of this service to map the repo to a dataset; the next push is audited again.\n"
        )

    # -- the Hub ----------------------------------------------------------------------------------------
    def _discussion(self, api: Any, repo: str) -> int:
        title = self.config.discussion_title
        for d in api.get_repo_discussions(repo, discussion_type="discussion", discussion_status="open"):
            if d.title == title:
                return int(d.num)
        return int(api.create_discussion(repo, title=title, description=DISCUSSION_INTRO).num)

    def comment(self, job: Job, text: str) -> str:
        """Post ``text`` in the repo's audit discussion, unless a comment for this commit is there."""
        from huggingface_hub import HfApi
        from huggingface_hub import constants as hf_constants

        api = HfApi()
        num = self._discussion(api, job.repo)
        url = f"{hf_constants.ENDPOINT}/{job.repo}/discussions/{num}"
        marker = MARKER.format(sha=job.sha)
        details = api.get_discussion_details(job.repo, num)
        for ev in details.events:
            if getattr(ev, "type", None) == "comment" and marker in (getattr(ev, "content", "") or ""):
                log.info("job %s: already commented (%s#%s)", job.id, url, ev.id)
                return f"{url}#{ev.id}"
        posted = api.comment_discussion(job.repo, num, text)
        log.info("job %s: commented on %s", job.id, url)
        return f"{url}#{posted.id}"


# -- the service ---------------------------------------------------------------------------------------------
def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one), bound before the server runs so
    that :attr:`Service.url` is known at once and a taken port fails in the constructor."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=128)


class Service:
    """The HTTP endpoint, the queue and the workers. ``start()``, then ``stop()``."""

    def __init__(self, config: Config, auditor: Auditor | None = None) -> None:
        if not config.secret:
            raise ValueError("a webhook secret is required")
        try:  # fail here, with the way out, rather than in the HTTP thread
            import uvicorn  # noqa: F401

            from .app import create_app
        except ImportError as e:
            raise RuntimeError(
                f"the webhook service needs {e.name}: pip install 'hub-backdoor[webhook]'"
            ) from None
        self.config = config
        self._queue_lock = _lock_queue(Path(config.db))
        self.store = JobStore(config.db)
        self.auditor = auditor or Auditor(config, self.store)
        self._stop = threading.Event()
        self._cv = threading.Condition()
        self._generation = 0  # bumped by every wake-up, so none is lost between claim() and wait()
        self._workers: list[threading.Thread] = []
        requeued, failed = self.store.recover(config.max_attempts)
        for j in requeued:
            log.warning(
                "job %s: %s@%s was interrupted; queued again (try %s)", j.id, j.repo, j.sha, j.attempts + 1
            )
        for j in failed:
            log.error("job %s: %s@%s failed: interrupted %s times", j.id, j.repo, j.sha, j.attempts)
        self.app = create_app(self)
        try:
            self._socket = _listen(config.host, config.port)
        except OSError:  # e.g. the port is taken: let another service have the queue
            self.store.close()
            if self._queue_lock is not None:
                self._queue_lock.close()
            raise
        host, port = self._socket.getsockname()[:2]  # kept: uvicorn closes the socket when it stops
        self._url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        self._server: Any = None
        self._http_thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self._url

    def start(self) -> Service:
        import uvicorn

        _quiet_libraries()
        server_config = uvicorn.Config(
            self.app,
            log_config=None,  # the service's logging, not uvicorn's
            access_log=False,  # every delivery is logged by handle()
            lifespan="off",
            loop="asyncio",
            http="h11",
            ws="none",
            limit_concurrency=64,  # more open requests at once get 503
            timeout_keep_alive=5,
            timeout_graceful_shutdown=5,
            server_header=False,
        )
        self._server = uvicorn.Server(server_config)  # in a thread: it leaves signals to main()
        self._http_thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="webhook-http", daemon=True
        )
        self._http_thread.start()
        deadline = time.time() + 30
        while not self._server.started:
            if not self._http_thread.is_alive() or time.time() > deadline:
                raise RuntimeError(f"the HTTP server did not start on {self.url}")
            time.sleep(0.01)
        for i in range(max(1, self.config.workers)):
            t = threading.Thread(target=self._work, name=f"webhook-worker-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def _notify(self) -> None:
        with self._cv:
            self._generation += 1
            self._cv.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking events and jobs; wait up to ``timeout`` s for running jobs (the others stay
        ``running`` in the store and are retried at the next start)."""
        self._stop.set()
        self._notify()
        if self._server is not None and self._http_thread is not None:
            self._server.should_exit = True
            self._http_thread.join(10)
        self._socket.close()
        deadline = time.time() + timeout
        for t in self._workers:
            t.join(max(0.0, deadline - time.time()))
        if not any(t.is_alive() for t in self._workers):  # else the process exit releases them
            self.store.close()
            if self._queue_lock is not None:
                self._queue_lock.close()
                self._queue_lock = None

    # -- events -----------------------------------------------------------------------------------------
    def authorized(self, secret: str | None) -> bool:
        return secret is not None and hmac.compare_digest(secret.encode(), self.config.secret.encode())

    def handle(self, secret: str | None, body: bytes) -> tuple[int, dict[str, Any]]:
        """One delivery: ``(HTTP status, JSON answer)``; logged, and recorded in the event log."""
        if not self.authorized(secret):
            # logged, never stored: anyone can send these, and the event log is for deliveries
            log.warning("event refused: missing or wrong %s", SECRET_HEADER)
            return 401, {"error": f"missing or wrong {SECRET_HEADER}"}
        try:
            payload = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            log.warning("event refused: body is not JSON (%s)", e)
            self.store.log_event(
                repo=None, scope=None, action=None, status=400, outcome="bad payload", detail=str(e)
            )
            return 400, {"error": f"the body is not JSON ({e})"}
        meta = {
            "repo": _text_at(payload, "repo", "name"),
            "scope": _text_at(payload, "event", "scope"),
            "action": _text_at(payload, "event", "action"),
        }
        try:
            targets, reason = parse_event(payload, self.config)
        except BadPayload as e:
            log.warning("event refused: %s", e)
            self.store.log_event(**meta, status=400, outcome="bad payload", detail=str(e))
            return 400, {"error": f"not a Hub webhook payload: {e}"}
        if not targets:
            log.info("event %s %s on %s: ignored (%s)", meta["scope"], meta["action"], meta["repo"], reason)
            self.store.log_event(**meta, status=200, outcome="ignored", detail=reason)
            return 200, {"status": "ignored", "reason": reason}
        answers = []
        for t in targets:
            outcome, job_id = self.store.enqueue(t.repo, t.sha, t.ref, queue_size=self.config.queue_size)
            answers.append({"repo": t.repo, "sha": t.sha, "ref": t.ref, "job": job_id, "status": outcome})
            log.info(
                "event %s on %s@%s (%s): %s (job %s)", meta["scope"], t.repo, t.sha, t.ref, outcome, job_id
            )
        self._notify()
        detail = "; ".join(f"{a['sha'][:12]} {a['status']} job {a['job']}" for a in answers)
        if all(a["status"] == "full" for a in answers):
            self.store.log_event(**meta, status=503, outcome="queue full", detail=detail)
            return 503, {"error": "the queue is full; deliver again later", "jobs": answers}
        self.store.log_event(**meta, status=202, outcome="accepted", detail=detail)
        return 202, {"status": "accepted", "jobs": answers}

    # -- workers ----------------------------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stop.is_set():
            with self._cv:
                generation = self._generation
            job = self.store.claim()
            if job is None:
                due = self.store.next_due()  # a job waiting to be retried
                timeout = 30.0 if due is None else min(30.0, max(0.05, due - time.time()))
                with self._cv:
                    if self._generation == generation and not self._stop.is_set():
                        self._cv.wait(timeout)
                continue
            try:
                self.process(job)
            finally:
                self._notify()  # the next job of this repo may go now

    def process(self, job: Job) -> None:
        """Run one claimed job and record how it ended: done, failed at once (:func:`is_permanent`),
        or queued again with back-off until ``max_attempts``."""
        log.info("job %s: auditing %s@%s (try %s)", job.id, job.repo, job.sha, job.attempts)
        t0 = time.time()
        try:
            fields = self.auditor.run(job)
        except Exception as e:  # noqa: BLE001 - any failure of a job is logged, then failed or retried
            message = " ".join(str(e).split())[:500] or type(e).__name__
            if is_permanent(e):
                self._fail_permanently(job, message)
                return
            message = f"{type(e).__name__}: {message}"
            if job.attempts < self.config.max_attempts:
                delay = self.config.retry_delay * 2 ** (job.attempts - 1)
                log.warning(
                    "job %s: try %s failed (%s); again in %.0f s", job.id, job.attempts, message, delay
                )
                self.store.retry(job.id, message, delay)
            else:
                log.error("job %s: failed after %s tries: %s", job.id, job.attempts, message)
                self.store.fail(job.id, message)
            if not is_transient(e):  # not the network: maybe a bug, keep the traceback
                log.debug("job %s traceback", job.id, exc_info=True)
            return
        self.store.finish(job.id, **fields)
        log.info("job %s: done in %.1f s: %s", job.id, time.time() - t0, fields.get("verdict"))

    def _fail_permanently(self, job: Job, message: str) -> None:
        log.error("job %s: %s@%s cannot be audited: %s", job.id, job.repo, job.sha, message)
        if self.config.comment_errors and not job.comment_url:
            try:
                url = self.auditor.comment(job, self.auditor.error_text(job, message))
                self.store.update(job.id, comment_url=url)
            except Exception as ce:  # noqa: BLE001 - the job has failed anyway
                log.error("job %s: could not comment the error: %s", job.id, ce)
        self.store.fail(job.id, message)


def _text_at(payload: Any, key: str, field: str) -> str | None:
    """``payload[key][field]`` when it is a string (for the event log), else None."""
    inner = payload.get(key) if isinstance(payload, dict) else None
    value = inner.get(field) if isinstance(inner, dict) else None
    return value if isinstance(value, str) else None


def _lock_queue(db: Path) -> Any:
    """Hold an exclusive lock on ``<db>.lock`` while the service runs: two services on one queue would
    retry each other's running jobs. The OS releases it when the process dies, ``kill -9`` included."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        return None
    db.parent.mkdir(parents=True, exist_ok=True)
    f = open(f"{db}.lock", "a")  # noqa: SIM115 - held open for the life of the service
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise RuntimeError(f"another webhook service is using the queue {db}") from None
    return f


# -- command line -------------------------------------------------------------------------------------------
def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(ENV_PREFIX + name, default)


def _split_list(text: str | None) -> list[str]:
    return [p for p in re.split(r"[,\s]+", text or "") if p]


def _truthy(text: str | None) -> bool:
    return (text or "").strip().lower() in ("1", "true", "yes", "on")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hub-backdoor-webhook",
        description="Hugging Face Hub webhook service: audits each new revision of watched model repos "
        "with hub-backdoor and answers in a discussion (and a pull request with the purified model when "
        f"--open-pr). Every option also reads {ENV_PREFIX}<NAME> (e.g. {ENV_PREFIX}REPOS).",
    )
    p.add_argument(
        "--secret-file", metavar="FILE", help=f"file with the webhook secret (or {ENV_PREFIX}SECRET)"
    )
    p.add_argument(
        "--repo",
        dest="repos",
        action="append",
        metavar="PATTERN",
        help=f"watched model repo, fnmatch pattern such as org/* (repeatable; {ENV_PREFIX}REPOS: comma list)",
    )
    p.add_argument(
        "--branch",
        dest="branches",
        action="append",
        metavar="NAME",
        help=f"audit pushes to this branch (repeatable; default main; {ENV_PREFIX}BRANCHES)",
    )
    p.add_argument(
        "--dataset",
        dest="datasets",
        action="append",
        metavar="[PATTERN=]DATA",
        help="reference data for repos matching PATTERN (default *), first match wins; without one, "
        f"the model card's datasets: ({ENV_PREFIX}DATASETS: comma list)",
    )
    p.add_argument(
        "--db", default=_env("DB", "hub-backdoor-webhook.sqlite3"), help="SQLite file of the queue"
    )
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(_env("PORT", "8080") or 8080), help="port (0: a free one)")
    p.add_argument(
        "--open-pr",
        action="store_true",
        default=_truthy(_env("OPEN_PR")),
        help="open a pull request with the purified model when a backdoor is found",
    )
    p.add_argument("--split", default=_env("SPLIT"), help="split of the reference data, slices allowed")
    p.add_argument("--threshold", type=float, default=_env("THRESHOLD"), help="anomaly-index threshold")
    p.add_argument("--max-samples", type=int, default=_env("MAX_SAMPLES"), help="audit at most N images")
    p.add_argument(
        "--audit-option",
        dest="audit_options",
        action="append",
        metavar="KEY=VALUE",
        help=f"a hub_backdoor.audit keyword ({', '.join(AUDIT_OPTIONS)}), e.g. rule=mad; VALUE is read as "
        f"JSON when it parses, else as text (repeatable; {ENV_PREFIX}AUDIT_OPTIONS: comma list)",
    )
    p.add_argument(
        "--purify-epochs", type=int, default=int(_env("PURIFY_EPOCHS", "0") or 0) or None,
        help="default: purify's own (10, or more on a small clean set)"
    )
    p.add_argument(
        "--purify-option",
        dest="purify_options",
        action="append",
        metavar="KEY=VALUE",
        help=f"a purification option ({', '.join(PURIFY_OPTIONS)}), e.g. beta=5; VALUE is read as JSON "
        f"when it parses, else as text (repeatable; {ENV_PREFIX}PURIFY_OPTIONS: comma list)",
    )
    p.add_argument(
        "--max-accuracy-drop", type=float, default=float(_env("MAX_ACCURACY_DROP", "1") or 1),
        metavar="POINTS",
        help="no pull request for a purified model that loses more held-out clean accuracy (default 1 point)",
    )
    p.add_argument(
        "--queue-size", type=int, default=int(_env("QUEUE_SIZE", "100") or 100), help="queued + running jobs"
    )
    p.add_argument("--max-attempts", type=int, default=int(_env("MAX_ATTEMPTS", "3") or 3))
    p.add_argument("--retry-delay", type=float, default=float(_env("RETRY_DELAY", "30") or 30))
    p.add_argument(
        "--workers", type=int, default=int(_env("WORKERS", "1") or 1), help="parallel jobs (other repos)"
    )
    p.add_argument("--threads", type=int, default=_env("THREADS"), help="torch CPU threads per job")
    p.add_argument(
        "--no-error-comments",
        action="store_true",
        default=_truthy(_env("NO_ERROR_COMMENTS")),
        help="do not comment when a revision cannot be audited (bad model, no data)",
    )
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"))
    return p


def parse_audit_options(specs: list[str], *, names: tuple[str, ...] = AUDIT_OPTIONS,
                        flag: str = "--audit-option") -> dict[str, Any]:
    """``["rule=mad", "seed=1"]`` -> ``{"rule": "mad", "seed": 1}`` (values as JSON, else text;
    keys in ``names``, the options ``flag`` may set)."""
    out: dict[str, Any] = {}
    for spec in specs:
        key, sep, text = spec.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in names:
            known = ", ".join(names)
            raise ValueError(f"{flag} {spec!r}: expected KEY=VALUE with KEY in {known}")
        try:
            out[key] = json.loads(text)
        except ValueError:
            out[key] = text
    return out


def parse_purify_options(specs: list[str]) -> dict[str, Any]:
    """``["beta=5", "augment=true"]`` -> ``{"beta": 5, "augment": True}`` (values as JSON, else text)."""
    return parse_audit_options(specs, names=PURIFY_OPTIONS, flag="--purify-option")


def config_from_args(args: argparse.Namespace) -> Config:
    if args.secret_file:
        secret = Path(args.secret_file).read_text().strip()
    else:
        secret = (_env("SECRET") or "").strip()
    if not secret:
        raise ValueError(f"no webhook secret: set {ENV_PREFIX}SECRET or pass --secret-file")
    repos = args.repos or _split_list(_env("REPOS"))
    if not repos:
        raise ValueError(f"no watched repos: pass --repo org/name (or org/*) or set {ENV_PREFIX}REPOS")
    datasets = []
    for spec in args.datasets or _split_list(_env("DATASETS")):
        pattern, sep, data = spec.partition("=")
        datasets.append((pattern, data) if sep else ("*", spec))
    return Config(
        secret=secret,
        repos=repos,
        db=Path(args.db),
        host=args.host,
        port=args.port,
        branches=args.branches or _split_list(_env("BRANCHES")) or ["main"],
        open_pr=bool(args.open_pr),
        datasets=datasets,
        split=args.split,
        threshold=float(args.threshold) if args.threshold is not None else None,
        max_samples=int(args.max_samples) if args.max_samples else None,
        audit_options=parse_audit_options(args.audit_options or _split_list(_env("AUDIT_OPTIONS"))),
        purify_epochs=args.purify_epochs,
        purify_options=parse_purify_options(args.purify_options or _split_list(_env("PURIFY_OPTIONS"))),
        max_accuracy_drop=args.max_accuracy_drop / 100.0,
        queue_size=args.queue_size,
        max_attempts=args.max_attempts,
        retry_delay=args.retry_delay,
        workers=args.workers,
        threads=int(args.threads) if args.threads else None,
        comment_errors=not args.no_error_comments,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for name in ("httpx", "httpx2", "urllib3", "filelock"):  # one line per HTTP request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        config = config_from_args(args)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        service = Service(config).start()
    except (OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.info(
        "listening on %s; watching %s (branches %s); pull requests %s; queue %s",
        service.url,
        ", ".join(config.repos),
        ", ".join(config.branches),
        "on" if config.open_pr else "off",
        config.db,
    )
    print(f"hub-backdoor webhook listening on {service.url}", flush=True)
    stopped = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        log.info("signal %s: stopping (a running job finishes, or is retried at the next start)", signum)
        stopped.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    while not stopped.wait(1.0):
        pass
    service.stop(timeout=float(_env("STOP_TIMEOUT", "60") or 60))
    return 0
