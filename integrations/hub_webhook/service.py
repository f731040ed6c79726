"""The webhook service: HTTP endpoint, event filter, background workers and the answer on the Hub.

HTTP (stdlib ``http.server``):

- ``POST /`` or ``POST /webhook``: a Hub webhook delivery. 401 without the right
  ``X-Webhook-Secret``; 400 for a body that is not a Hub webhook payload; 200 ``{"status":
  "ignored"}`` for events the service does not act on (not a content update, not a model, repo not
  watched, no watched branch moved); 202 ``{"status": "accepted", "jobs": [...]}`` otherwise, each job
  ``queued`` or ``duplicate`` (that commit is already queued, running or audited); 503 when the queue
  is full (the Hub may deliver again later).
- ``GET /healthz``: ``{"ok": true, "jobs": {status: count}}``.
- ``GET /jobs`` (with the secret header): the latest jobs and events.

Each job audits ``repo@commit`` with ``hub-backdoor audit`` (the data: the operator's mapping, else
the model card's ``datasets:``), then answers in the repo's discussion titled
:attr:`Config.discussion_title` (created when missing): the verdict, the per-class table and, when a
backdoor was found and ``open_pr`` is on, the link to a pull request (``refs/pr/N``) with the
purified model and its security card (``hub-backdoor purify --open-pr``; main is never written).
"""

from __future__ import annotations

import argparse
import fnmatch
import hmac
import json
import logging
import os
import re
import shlex
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

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


class BadPayload(ValueError):
    """The body is not a Hub webhook payload (HTTP 400)."""


@dataclass
class Config:
    """Service settings (``--help`` of ``python -m integrations.hub_webhook`` documents each).

    ``repos``: watched model repos, ``fnmatch`` patterns (``org/*``), case-insensitive.
    ``datasets``: ``(repo pattern, dataset)`` pairs, first match wins; no match: the model card's
    ``datasets:``. ``audit_args``: more ``hub-backdoor audit`` options (e.g. ``["--rule", "mad"]``).
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
    audit_args: list[str] = field(default_factory=list)
    purify_epochs: int | None = None  # None: purify's default (auto)
    queue_size: int = 100
    max_attempts: int = 3
    retry_delay: float = 30.0
    workers: int = 1
    comment_errors: bool = True
    discussion_title: str = "hub-backdoor: backdoor audits"
    max_body: int = 1 << 20
    threads: int | None = None

    def watches(self, repo: str) -> bool:
        return any(fnmatch.fnmatchcase(repo.lower(), p.lower()) for p in self.repos)

    def dataset_for(self, repo: str) -> str | None:
        for pattern, dataset in self.datasets:
            if fnmatch.fnmatchcase(repo.lower(), pattern.lower()):
                return dataset
        return None

    def data_args(self, repo: str, *, runtime: bool = True) -> list[str]:
        """``hub-backdoor`` options for ``repo``'s data and detection (and ``--threads`` if ``runtime``)."""
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
        if self.threads and runtime:
            argv += ["--threads", str(self.threads)]
        return argv + list(self.audit_args)


# -- events ----------------------------------------------------------------------------------------------
@dataclass
class Target:
    """A revision to audit: ``repo`` at commit ``sha`` (``ref`` that moved there, if known)."""

    repo: str
    sha: str
    ref: str | None


def _get(d: Any, key: str, kind: type | tuple[type, ...], where: str, *, required: bool = True) -> Any:
    if not isinstance(d, dict):
        raise BadPayload(f"{where} is not an object")
    value = d.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise BadPayload(f"{where}.{key} is missing or not a {getattr(kind, '__name__', kind)}")
    return value


def parse_event(payload: Any, config: Config) -> tuple[list[Target], str]:
    """What a webhook payload asks for: ``(targets, reason)``; no targets means ignored, for ``reason``.

    Raises :class:`BadPayload` when the payload does not have the Hub's shape (v3: ``event.action``,
    ``event.scope``, ``repo.type``, ``repo.name``, optional ``repo.headSha`` and ``updatedRefs``).
    """
    if not isinstance(payload, dict):
        raise BadPayload("the body is not a JSON object")
    event = _get(payload, "event", dict, "payload")
    action = _get(event, "action", str, "event")
    scope = _get(event, "scope", str, "event")
    repo = _get(payload, "repo", dict, "payload")
    repo_type = _get(repo, "type", str, "repo")
    name = _get(repo, "name", str, "repo")
    webhook = payload.get("webhook")
    if isinstance(webhook, dict) and webhook.get("version") not in (None, 3):
        raise BadPayload(f"webhook version {webhook.get('version')!r} is not supported (expected 3)")
    if not _REPO_RE.match(name):
        raise BadPayload(f"repo.name {name!r} is not a repo id")
    refs = payload.get("updatedRefs")
    if refs is not None and not isinstance(refs, list):
        raise BadPayload("updatedRefs is not a list")
    head = repo.get("headSha", repo.get("head_sha"))
    if head is not None and (not isinstance(head, str) or not _SHA_RE.match(head)):
        raise BadPayload("repo.headSha is not a commit sha")

    if scope != CONTENT_SCOPE or action != "update":
        return [], f"not a content update (scope {scope}, action {action})"
    if repo_type != "model":
        return [], f"not a model repo ({repo_type})"
    if not config.watches(name):
        return [], f"repo {name} is not watched"
    watched = {f"refs/heads/{b}" for b in config.branches}
    targets: list[Target] = []
    for i, item in enumerate(refs or []):
        ref = _get(item, "ref", str, f"updatedRefs[{i}]")
        new = _get(item, "newSha", str, f"updatedRefs[{i}]", required=False)
        if new is not None and not (_SHA_RE.match(new) or _ZERO_SHA.match(new)):
            raise BadPayload(f"updatedRefs[{i}].newSha is not a commit sha")
        if ref in watched and new and not _ZERO_SHA.match(new):
            targets.append(Target(name, new, ref))
    if not refs and head:  # no ref list: the head of the default branch
        targets.append(Target(name, head, None))
    if not targets:
        moved = ", ".join(str(r.get("ref")) for r in refs or [] if isinstance(r, dict)) or "none"
        return [], f"no watched branch updated (refs: {moved}; watched: {', '.join(config.branches)})"
    return targets, "content update"


# -- the audit job ------------------------------------------------------------------------------------------
class PermanentError(Exception):
    """The job cannot succeed by trying again (bad model, no data); it fails at once."""


def _capture_ui() -> Any:
    """A quiet ``hub_backdoor.cli.UI`` that keeps the result lines (the PR url is one of them)."""
    from hub_backdoor import cli

    class CaptureUI(cli.UI):
        def __init__(self) -> None:
            super().__init__(quiet=True)
            self.results: list[str] = []

        def result(self, msg: str) -> None:
            self.results.append(msg)

    return CaptureUI()


def _run_cli(argv: list[str]) -> tuple[int, Any]:
    """Run one hub-backdoor command in this process; HubBackdoorError propagates."""
    from hub_backdoor import cli

    try:
        args = cli.build_parser().parse_args(argv)
    except SystemExit as e:
        raise PermanentError(f"bad hub-backdoor options {argv[2:]}: exit {e.code}") from None
    args.quiet = True
    cli._configure(args)  # noqa: SLF001 - the CLI's logging and progress-bar settings
    ui = _capture_ui()
    return int(args.func(args, ui)), ui


def _is_transient(exc: BaseException) -> bool:
    text = str(exc)
    return (
        "cannot reach" in text or "(HTTP 5" in text or "(HTTP 429" in text or "changed while pushing" in text
    )


class Auditor:
    """Audits one job and answers on the Hub. Replace :meth:`run` to change what a job does."""

    def __init__(self, config: Config, store: JobStore) -> None:
        self.config = config
        self.store = store

    def run(self, job: Job) -> dict[str, Any]:
        """Audit ``job.repo@job.sha``; comment; open a PR when asked. Returns the fields to store."""
        from hub_backdoor.errors import HubBackdoorError
        from hub_backdoor.report import AuditReport

        source = f"{job.repo}@{job.sha}"
        data = self.config.data_args(job.repo)
        with tempfile.TemporaryDirectory(prefix="hub-backdoor-webhook-") as tmp:
            report_path = Path(tmp) / "audit.json"
            try:
                code, _ = _run_cli(["audit", source, *data, "--json", str(report_path)])
            except HubBackdoorError as e:
                if _is_transient(e):
                    raise
                raise PermanentError(str(e)) from None
            report = AuditReport.from_json(report_path)
            log.info("job %s: %s is %s (exit %s)", job.id, source, report.verdict, code)
            pr_url, pr_error = job.pr_url, None
            if report.backdoor_found and self.config.open_pr and not pr_url:
                try:
                    pr_url = self.open_pr(job, report_path, data)
                except Exception as e:  # noqa: BLE001 - the verdict is still worth telling
                    if isinstance(e, HubBackdoorError) and _is_transient(e):
                        raise
                    pr_error = " ".join(str(e).split())[:300] or type(e).__name__
                    log.error("job %s: could not open a pull request: %s", job.id, pr_error)
                else:
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

    def open_pr(self, job: Job, report_path: Path, data: list[str]) -> str:
        source = f"{job.repo}@{job.sha}"
        argv = ["purify", source, *data, "--open-pr", "--report", str(report_path)]
        if self.config.purify_epochs:
            argv += ["--epochs", str(self.config.purify_epochs)]
        code, ui = _run_cli(argv)
        for line in ui.results:
            m = re.match(r"opened pull request on \S+: (\S+)", line)
            if m:
                log.info("job %s: opened pull request %s", job.id, m.group(1))
                return m.group(1)
        raise RuntimeError(f"purify --open-pr did not open a pull request (exit {code}): {ui.results}")

    def comment_text(self, job: Job, report: Any, pr_url: str | None, pr_error: str | None = None) -> str:
        from hub_backdoor.integrations import summary_markdown

        ref = f" ({job.ref})" if job.ref else ""
        text = summary_markdown(
            report,
            title=f"hub-backdoor audit of {job.repo}@{job.sha[:10]}{ref}",
            reproduce=f"hub-backdoor audit {job.repo}@{job.sha}"
            + "".join(f" {shlex.quote(a)}" for a in self.config.data_args(job.repo, runtime=False)),
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
class Service:
    """The HTTP endpoint, the queue and the workers. ``start()``, then ``stop()``."""

    def __init__(self, config: Config, auditor: Auditor | None = None) -> None:
        if not config.secret:
            raise ValueError("a webhook secret is required")
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
        handler = type("Handler", (_Handler,), {"service": self})
        self.httpd = ThreadingHTTPServer((config.host, config.port), handler)
        self.httpd.daemon_threads = True
        self._http_thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Service:
        self._http_thread = threading.Thread(
            target=self.httpd.serve_forever, name="webhook-http", daemon=True
        )
        self._http_thread.start()
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
        self.httpd.shutdown()
        self.httpd.server_close()
        deadline = time.time() + timeout
        for t in self._workers:
            t.join(max(0.0, deadline - time.time()))
        if not any(t.is_alive() for t in self._workers):  # else the process exit releases them
            self.store.close()
            if self._queue_lock is not None:
                self._queue_lock.close()
                self._queue_lock = None

    # -- events -----------------------------------------------------------------------------------------
    def handle(self, secret: str | None, body: bytes) -> tuple[int, dict[str, Any]]:
        """One delivery: ``(HTTP status, JSON answer)``; logged, and recorded in the event log."""
        if secret is None or not hmac.compare_digest(secret.encode(), self.config.secret.encode()):
            log.warning("event refused: missing or wrong %s", SECRET_HEADER)
            self.store.log_event(repo=None, scope=None, action=None, status=401, outcome="unauthorized")
            return 401, {"error": f"missing or wrong {SECRET_HEADER}"}
        try:
            payload = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
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
        """Run one claimed job and record how it ended."""
        log.info("job %s: auditing %s@%s (try %s)", job.id, job.repo, job.sha, job.attempts)
        t0 = time.time()
        from hub_backdoor.errors import HubBackdoorError  # the first job pays for importing torch

        try:
            fields = self.auditor.run(job)
        except PermanentError as e:
            log.error("job %s: %s@%s cannot be audited: %s", job.id, job.repo, job.sha, e)
            if self.config.comment_errors and not job.comment_url:
                try:
                    url = self.auditor.comment(job, self.auditor.error_text(job, str(e)))
                    self.store.update(job.id, comment_url=url)
                except Exception as ce:  # noqa: BLE001 - the job has failed anyway
                    log.error("job %s: could not comment the error: %s", job.id, ce)
            self.store.fail(job.id, str(e))
            return
        except Exception as e:  # noqa: BLE001 - any failure of a job is logged and retried
            message = f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"
            transient = isinstance(e, HubBackdoorError) and _is_transient(e)
            if job.attempts < self.config.max_attempts:
                delay = self.config.retry_delay * 2 ** (job.attempts - 1)
                log.warning(
                    "job %s: try %s failed (%s); again in %.0f s", job.id, job.attempts, message, delay
                )
                self.store.retry(job.id, message, delay)
            else:
                log.error("job %s: failed after %s tries: %s", job.id, job.attempts, message)
                self.store.fail(job.id, message)
            if not transient:
                log.debug("job %s traceback", job.id, exc_info=True)
            return
        self.store.finish(job.id, **fields)
        log.info("job %s: done in %.1f s: %s", job.id, time.time() - t0, fields.get("verdict"))


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


class _Handler(BaseHTTPRequestHandler):
    service: Service
    server_version = "hub-backdoor-webhook/1"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("http %s " + format, self.client_address[0], *args)

    def _answer(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = (json.dumps(body) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        if self.path.split("?")[0].rstrip("/") not in ("", "/webhook"):
            self.close_connection = True
            return self._answer(404, {"error": "POST the webhook to / or /webhook"})
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > self.service.config.max_body:
            self.close_connection = True
            return self._answer(413 if length > 0 else 400, {"error": "missing or too large Content-Length"})
        body = self.rfile.read(length)
        status, answer = self.service.handle(self.headers.get(SECRET_HEADER), body)
        self._answer(status, answer, {"Retry-After": "60"} if status == 503 else None)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        path = self.path.split("?")[0].rstrip("/")
        store = self.service.store
        if path == "/healthz":
            return self._answer(200, {"ok": True, "jobs": store.counts()})
        if path == "/jobs":
            secret = self.headers.get(SECRET_HEADER)
            if secret is None or not hmac.compare_digest(
                secret.encode(), self.service.config.secret.encode()
            ):
                return self._answer(401, {"error": f"missing or wrong {SECRET_HEADER}"})
            jobs = [j.to_dict() for j in store.jobs()]
            return self._answer(200, {"jobs": jobs, "events": store.events(), "counts": store.counts()})
        self._answer(404, {"error": "GET /healthz or /jobs"})


# -- command line -------------------------------------------------------------------------------------------
def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(ENV_PREFIX + name, default)


def _split_list(text: str | None) -> list[str]:
    return [p for p in re.split(r"[,\s]+", text or "") if p]


def _truthy(text: str | None) -> bool:
    return (text or "").strip().lower() in ("1", "true", "yes", "on")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m integrations.hub_webhook",
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
        "--audit-args", default=_env("AUDIT_ARGS", ""), help="more hub-backdoor audit options, in one string"
    )
    p.add_argument(
        "--purify-epochs", type=int, default=int(_env("PURIFY_EPOCHS", "0") or 0) or None,
        help="default: purify's own (10, or more on a small clean set)"
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
        audit_args=shlex.split(args.audit_args or ""),
        purify_epochs=args.purify_epochs,
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
