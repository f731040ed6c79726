"""The Hub webhook service (integrations/hub_webhook) end to end on loopback, against the session's
LocalHub: payloads of the Hub's real shape (v3), the secret, the event filter, the answer on the Hub
(a discussion comment, and a pull request on refs/pr/N with the purified model), deduplication, the
bounded queue, one job at a time per repo, retries decided by the error's type, the HTTP edges of the
FastAPI app, and a SIGKILL in the middle of the queue.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # integrations/ is not installed; it runs from a checkout
    sys.path.insert(0, str(ROOT))

from test_integrations import integration_models, model_card  # noqa: E402

from integrations.hub_webhook import Config, Service  # noqa: E402
from integrations.hub_webhook.service import MARKER, Auditor  # noqa: E402

SECRET = "webhook-s3cret"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return integration_models(tmp_path_factory)


@pytest.fixture(scope="module")
def hub_dataset(local_hub, models) -> str:
    """The digits' test split as a Hub dataset repo (parquet, as ``push_to_hub`` lays it out)."""
    import datasets

    repo = f"tester/wh-digits-{uuid.uuid4().hex[:8]}"
    buf = io.BytesIO()
    datasets.load_from_disk(str(models["data"]))["test"].to_parquet(buf)
    local_hub.commit_files(
        repo,
        {
            "data/test-00000-of-00001.parquet": buf.getvalue(),
            "README.md": b"---\nlicense: bsd-3-clause\n---\n",
        },
        repo_type="dataset",
    )
    return repo


def push_model(local_hub, repo: str, folder: Path, dataset: str, note: str = "") -> str:
    """Commit a model folder and a card naming ``dataset`` to ``repo``'s main; returns the commit."""
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    files["README.md"] = (model_card([dataset]) + note).encode()
    return local_hub.commit_files(repo, files, message=f"upload {folder.name}")


def payload(local_hub, repo: str, sha: str, *, scope="repo.content", action="update", ref="refs/heads/main"):
    """A webhook payload as the Hub sends it (v3)."""
    web = f"{local_hub.endpoint}/{repo}"
    body = {
        "event": {"action": action, "scope": scope},
        "repo": {
            "type": "model",
            "name": repo,
            "id": uuid.uuid4().hex[:24],
            "private": False,
            "headSha": sha,
            "owner": {"id": uuid.uuid4().hex[:24]},
            "url": {"web": web, "api": f"{local_hub.endpoint}/api/models/{repo}"},
            "subdomain": None,
            "tags": ["timm", "image-classification"],
        },
        "webhook": {"id": uuid.uuid4().hex[:24], "version": 3},
        "updatedRefs": [{"ref": ref, "oldSha": "0" * 40, "newSha": sha}],
    }
    if scope.startswith("discussion"):
        body["discussion"] = {
            "id": uuid.uuid4().hex[:24],
            "num": 1,
            "author": {"id": "x"},
            "url": {"web": f"{web}/discussions/1"},
            "title": "hub-backdoor: backdoor audits",
            "isPullRequest": False,
            "status": "open",
        }
        del body["updatedRefs"]
    return body


def post(url: str, body, secret: str | None = SECRET) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers["X-Webhook-Secret"] = secret
    req = urllib.request.Request(url + "/webhook", data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def get(url: str, path: str, secret: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url + path, headers={"X-Webhook-Secret": secret} if secret else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def wait_for(predicate, timeout: float = 240.0, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def audit_comments(local_hub, repo: str, sha: str) -> list[str]:
    marker = MARKER.format(sha=sha)
    return [
        c
        for d in local_hub.discussions(repo)
        if not d["is_pull_request"]
        for c in d["comments"]
        if marker in c
    ]


# -- end to end, in process ---------------------------------------------------------------------------------
def test_webhook_audits_comments_and_opens_pr(local_hub, models, hub_dataset, tmp_path):
    repo = f"tester/wh-bd-{uuid.uuid4().hex[:8]}"
    sha = push_model(local_hub, repo, models["backdoored"], hub_dataset)
    main_files = local_hub.files(repo)
    config = Config(
        secret=SECRET,
        repos=["tester/wh-*"],
        db=tmp_path / "queue.sqlite3",
        port=0,
        open_pr=True,
        purify_epochs=1,
        max_accuracy_drop=1.0,  # the pull-request path, not the budget (1 epoch on a tiny model)
        threads=1,
    )
    service = Service(config).start()
    try:
        url = service.url
        # a wrong or missing secret: 401, and no work
        assert post(url, payload(local_hub, repo, sha), secret="wrong")[0] == 401
        assert post(url, payload(local_hub, repo, sha), secret=None)[0] == 401
        # malformed payloads: 400
        assert post(url, b"{not json")[0] == 400
        assert post(url, [1, 2])[0] == 400
        assert post(url, {"event": {"action": "update", "scope": "repo.content"}})[0] == 400
        bad = payload(local_hub, repo, sha)
        bad["updatedRefs"][0]["newSha"] = "not-a-sha"
        assert post(url, bad)[0] == 400
        # events the service does not act on: 200, ignored
        for body in (
            payload(local_hub, repo, sha, scope="discussion", action="create"),
            payload(local_hub, repo, sha, scope="discussion.comment", action="create"),
            payload(local_hub, "other-org/model", sha),
            payload(local_hub, repo, sha, ref="refs/pr/7"),
            payload(local_hub, repo, sha, action="delete", scope="repo"),
        ):
            status, answer = post(url, body)
            assert (status, answer["status"]) == (200, "ignored"), answer
        assert service.store.counts() == {"queued": 0, "running": 0, "done": 0, "failed": 0}

        # a content update of main: queued, audited in the background
        status, answer = post(url, payload(local_hub, repo, sha))
        assert status == 202 and answer["jobs"][0]["status"] == "queued", answer
        job_id = answer["jobs"][0]["job"]
        job = wait_for(
            lambda: (j := service.store.get(job_id)) and j.status in ("done", "failed") and j,
            what="the audit",
        )
        assert job.status == "done", job.error
        assert (job.verdict, job.target, job.attempts) == ("backdoor", 7, 1)

        # the answer on the Hub: one comment with the verdict and the table ...
        (comment,) = audit_comments(local_hub, repo, sha)
        assert "Backdoor suspected: target class 7" in comment
        assert "| **7** | **7** |" in comment and comment.count("\n| ") >= 11
        assert f"hub-backdoor audit {repo}@{sha}" in comment
        (disc,) = [d for d in local_hub.discussions(repo) if not d["is_pull_request"]]
        assert disc["title"] == config.discussion_title
        # ... and a pull request on refs/pr/N with the purified model and its security card
        (pr,) = [d for d in local_hub.discussions(repo) if d["is_pull_request"]]
        assert job.pr_url.endswith(f"/discussions/{pr['num']}") and job.pr_url in comment
        pr_files = local_hub.files(repo, f"refs/pr/{pr['num']}")
        assert pr_files["model.safetensors"] != main_files["model.safetensors"]
        assert "backdoor_purification.json" in pr_files
        assert "hub-backdoor" in pr_files["README.md"].decode()
        assert local_hub.files(repo) == main_files  # main is never written

        # a repeated delivery is not audited twice; the PR's own push is ignored
        status, answer = post(url, payload(local_hub, repo, sha))
        assert status == 202 and answer["jobs"][0] == {
            **answer["jobs"][0],
            "status": "duplicate",
            "job": job_id,
        }
        assert (
            post(
                url,
                payload(
                    local_hub,
                    repo,
                    local_hub.branch_sha(repo, f"refs/pr/{pr['num']}"),
                    ref=f"refs/pr/{pr['num']}",
                ),
            )[1]["status"]
            == "ignored"
        )
        time.sleep(0.5)
        assert service.store.counts()["done"] == 1 and service.store.get(job_id).deliveries == 2
        assert len(audit_comments(local_hub, repo, sha)) == 1

        # the log of events and outcomes; the jobs endpoint needs the secret
        outcomes = [e["outcome"] for e in service.store.events()]
        assert outcomes.count("unauthorized") == 0 and outcomes.count("bad payload") == 4  # never stored
        assert outcomes.count("ignored") == 6 and outcomes.count("accepted") == 2
        assert get(url, "/jobs")[0] == 401

        # a revision that cannot be audited (its card names no data): failed, with one comment saying why
        bad_repo = f"tester/wh-nodata-{uuid.uuid4().hex[:8]}"
        files = {p.name: p.read_bytes() for p in models["clean"].iterdir()}
        bad_sha = local_hub.commit_files(bad_repo, {**files, "README.md": model_card().encode()})
        status, answer = post(url, payload(local_hub, bad_repo, bad_sha))
        bad_id = answer["jobs"][0]["job"]
        bad = wait_for(lambda: (j := service.store.get(bad_id)) and j.status in ("done", "failed") and j)
        assert bad.status == "failed" and "names no dataset" in bad.error and bad.attempts == 1
        (why,) = audit_comments(local_hub, bad_repo, bad_sha)
        assert "could not audit" in why and "names no dataset" in why
        status, listing = get(url, "/jobs", SECRET)
        assert status == 200 and listing["jobs"][1]["id"] == job_id and listing["counts"]["done"] == 1
        assert get(url, "/healthz") == (
            200,
            {"ok": True, "jobs": {"queued": 0, "running": 0, "done": 1, "failed": 1}},
        )
    finally:
        service.stop()


# -- queue: bounded, one job at a time per repo, retries (stub audits: no models) --------------------------
class StubAuditor(Auditor):
    """Records which jobs run at the same time; blocks each job until released."""

    def __init__(self, config, store):
        super().__init__(config, store)
        self.lock = threading.Lock()
        self.running: set[str] = set()
        self.overlaps: list[tuple[str, str]] = []
        self.started: list[str] = []
        self.release = threading.Event()
        self.fail_once = {"bbbb"}

    def run(self, job):
        with self.lock:
            for other in self.running:
                self.overlaps.append((other, job.repo + "@" + job.sha[:4]))
            self.running.add(job.repo + "@" + job.sha[:4])
            self.started.append(job.sha[:4])
        try:
            self.release.wait(30)
            if job.sha[:4] in self.fail_once:
                self.fail_once.discard(job.sha[:4])
                raise RuntimeError("the Hub hiccuped")
            return {"verdict": "clean", "target": None}
        finally:
            with self.lock:
                self.running.discard(job.repo + "@" + job.sha[:4])


def test_queue_is_bounded_serial_per_repo_and_retries(local_hub, tmp_path):
    config = Config(
        secret=SECRET,
        repos=["org/*"],
        db=tmp_path / "q.sqlite3",
        port=0,
        workers=2,
        queue_size=3,
        retry_delay=0.05,
    )
    service = Service(config)
    stub = service.auditor = StubAuditor(config, service.store)
    service.start()
    with pytest.raises(RuntimeError, match="another webhook service"):
        Service(config)  # one service per queue file
    try:
        url = service.url
        shas = {k: k * 10 for k in ("aaaa", "bbbb", "cccc", "dddd")}
        assert post(url, payload(local_hub, "org/a", shas["aaaa"]))[0] == 202
        wait_for(lambda: stub.started == ["aaaa"], 10, "the first job")
        assert post(url, payload(local_hub, "org/a", shas["bbbb"]))[0] == 202
        assert post(url, payload(local_hub, "org/b", shas["cccc"]))[0] == 202
        wait_for(lambda: len(stub.started) == 2, 10, "a job of the other repo")
        assert stub.started == ["aaaa", "cccc"]  # org/a's second job waits for its first
        status, answer = post(url, payload(local_hub, "org/c", shas["dddd"]))  # 3 jobs active: full
        assert status == 503 and answer["jobs"][0]["status"] == "full"
        stub.release.set()
        wait_for(lambda: service.store.counts()["done"] == 3, 20, "all jobs")
        assert not [o for o in stub.overlaps if o[0].split("@")[0] == o[1].split("@")[0]]
        jobs = {j.sha[:4]: j for j in service.store.jobs()}
        assert jobs["bbbb"].attempts == 2 and jobs["aaaa"].attempts == 1  # failed once, retried
        assert post(url, payload(local_hub, "org/c", shas["dddd"]))[0] == 202  # room again
    finally:
        stub.release.set()
        service.stop()


# -- kill -9 in the middle of the queue, restart -----------------------------------------------------------
def _start(db: Path, log: Path) -> tuple[subprocess.Popen, str]:
    env = {
        **os.environ,
        "HUB_BACKDOOR_WEBHOOK_SECRET": SECRET,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable,
        "-m",
        "integrations.hub_webhook",
        "--port",
        "0",
        "--db",
        str(db),
        "--repo",
        "tester/whk-*",
    ]
    cmd += ["--workers", "2", "--threads", "1", "--max-samples", "200"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log.open("ab"), text=True)
    line = proc.stdout.readline()
    assert "listening on http://" in line, log.read_text()
    return proc, line.strip().rsplit(" ", 1)[-1]


def _statuses(db: Path) -> dict[str, tuple[str, int]]:
    with sqlite3.connect(db, timeout=10) as c:
        return {
            sha: (status, attempts)
            for sha, status, attempts in c.execute("SELECT sha, status, attempts FROM jobs")
        }


def test_restart_after_kill_loses_no_queued_event(local_hub, models, hub_dataset, tmp_path):
    x, y = (f"tester/whk-{n}-{uuid.uuid4().hex[:6]}" for n in ("x", "y"))
    sha1 = push_model(local_hub, x, models["clean"], hub_dataset)
    sha2 = push_model(local_hub, x, models["backdoored"], hub_dataset, note="\nv2\n")
    sha3 = push_model(local_hub, y, models["clean"], hub_dataset)
    db, log = tmp_path / "queue.sqlite3", tmp_path / "service.log"
    proc, url = _start(db, log)
    try:
        for repo, sha in ((x, sha1), (x, sha2), (y, sha3)):
            status, answer = post(url, payload(local_hub, repo, sha))
            assert status == 202 and answer["jobs"][0]["status"] == "queued", answer
        # kill -9 once a job is being audited (it is "running" in the queue file) and others wait
        wait_for(lambda: ": auditing " in log.read_text(), 60, "an audit to start")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    at_kill = _statuses(db)  # the store as the dead service left it
    running = {sha for sha, (st, _) in at_kill.items() if st == "running"}
    assert running and at_kill[sha2][0] == "queued"  # x's second job waits for its first
    assert all(st in ("queued", "running", "done") for st, _ in at_kill.values())

    proc, url = _start(db, log)  # same queue file
    try:
        wait_for(lambda: get(url, "/healthz")[1]["jobs"]["done"] == 3, 240, "the queue to drain")
        # a repeated delivery after the restart is not redone
        assert post(url, payload(local_hub, x, sha1))[1]["jobs"][0]["status"] == "duplicate"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    final = _statuses(db)
    for sha in (sha1, sha2, sha3):
        assert final[sha][0] == "done"
        assert final[sha][1] == (2 if sha in running else 1), (sha, final, running)
    # exactly one answer per revision on the Hub; x@sha2 is the backdoored one (PRs are off)
    for repo, sha in ((x, sha1), (x, sha2), (y, sha3)):
        assert len(audit_comments(local_hub, repo, sha)) == 1, (repo, sha)
    assert "Backdoor suspected: target class 7" in audit_comments(local_hub, x, sha2)[0]
    assert f"hub-backdoor purify {x}@{sha2} --open-pr" in audit_comments(local_hub, x, sha2)[0]
    assert "No backdoor found" in audit_comments(local_hub, y, sha3)[0]
    assert not [d for d in local_hub.discussions(x) if d["is_pull_request"]]
    text = log.read_text()
    assert "was interrupted; queued again" in text and "done in" in text


# -- the payload: huggingface_hub's WebhookPayload, and the event filter on it -----------------------------
def test_parse_event_reads_the_hubs_payload_model(local_hub):
    from huggingface_hub import WebhookPayload

    from integrations.hub_webhook.service import BadPayload, parse_event, parse_payload

    config = Config(secret=SECRET, repos=["org/*"], branches=["main", "dev"])
    sha, other = "a" * 40, "b" * 40
    event = parse_payload(payload(local_hub, "org/m", sha))
    assert isinstance(event, WebhookPayload) and event.repo.head_sha == sha  # headSha on the wire
    body = payload(local_hub, "org/m", sha)
    body["updatedRefs"] += [
        {"ref": "refs/heads/dev", "oldSha": sha, "newSha": other},
        {"ref": "refs/heads/gone", "oldSha": sha, "newSha": "0" * 40},
    ]
    targets, _ = parse_event(body, config)
    assert [(t.sha, t.ref) for t in targets] == [(sha, "refs/heads/main"), (other, "refs/heads/dev")]
    # a deleted watched branch (zero sha) moves nothing to audit
    deleted = payload(local_hub, "org/m", sha)
    deleted["updatedRefs"][0]["newSha"] = "0" * 40
    targets, reason = parse_event(deleted, config)
    assert targets == [] and "no watched branch updated" in reason
    # no ref list: the head of the default branch (either spelling of the field)
    for key in ("headSha", "head_sha"):
        body = payload(local_hub, "org/m", sha)
        del body["updatedRefs"], body["repo"]["headSha"]
        body["repo"][key] = other
        assert [(t.sha, t.ref) for t in parse_event(body, config)[0]] == [(other, None)]
    space = payload(local_hub, "org/m", sha)
    space["repo"]["type"] = "space"
    assert parse_event(space, config) == ([], "not a model repo (space)")

    # what the Hub's model refuses, and what the filter adds to it
    for change, message in (
        (lambda b: b.pop("webhook"), "webhook: Field required"),
        (lambda b: b["webhook"].update(version=2), "webhook.version"),
        (lambda b: b["event"].update(action="explode"), "event.action"),
        (lambda b: b["repo"].pop("owner"), "repo.owner: Field required"),
        (lambda b: b["repo"].update(name="not a repo"), "is not a repo id"),
        (lambda b: b["repo"].update(headSha="xyz"), "repo.headSha is not a commit sha"),
        (lambda b: b["updatedRefs"][0].update(newSha=7), "updatedRefs.0.newSha"),
    ):
        body = payload(local_hub, "org/m", sha)
        change(body)
        with pytest.raises(BadPayload, match=message.replace(".", r"\.")):
            parse_event(body, config)


def test_http_edges(local_hub, tmp_path):
    from fastapi import FastAPI

    config = Config(secret=SECRET, repos=["org/*"], db=tmp_path / "q.sqlite3", port=0, max_body=4096)
    service = Service(config)
    service.auditor = StubAuditor(config, service.store)
    service.start()
    try:
        assert isinstance(service.app, FastAPI) and service.url.startswith("http://127.0.0.1:")
        big = json.dumps({"padding": "x" * 5000}).encode()
        assert post(service.url, big) == (413, {"error": "the body is over 4096 bytes"})
        assert get(service.url, "/nothing")[0] == 404 and "error" in get(service.url, "/nothing")[1]
        assert get(service.url, "/webhook")[0] == 405  # a GET of the webhook
        # POST / is the webhook too; an event without the secret is refused before any work
        req = urllib.request.Request(service.url + "/", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        assert err.value.code == 401
        assert service.store.events() == []  # refused before its body was read, and not stored
        # a stranger's oversized body: 401 before reading it (not 413), and still nothing stored
        assert post(service.url, big, secret="wrong")[0] == 401 and service.store.events() == []
        # a client that stops mid-body gets 408 instead of holding the connection
        import socket

        from integrations.hub_webhook import app as webhook_app

        host, port = service.url.rsplit("/", 1)[1].split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            head = (f"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nX-Webhook-Secret: {SECRET}"
                    "\r\nContent-Type: application/json\r\n\r\n{")
            sock.sendall(head.encode())
            t0 = time.time()
            answer = sock.recv(4096).decode()
        assert answer.startswith("HTTP/1.1 408") and time.time() - t0 < webhook_app.BODY_TIMEOUT + 10
        # a taken port fails in the constructor and leaves that queue free for the next try
        port = int(service.url.rsplit(":", 1)[1])
        other = Config(secret=SECRET, repos=["org/*"], db=tmp_path / "other.sqlite3", port=port)
        with pytest.raises(OSError):
            Service(other)
        Service(Config(secret=SECRET, repos=["org/*"], db=other.db, port=0)).stop()
    finally:
        service.stop()


# -- retries: decided by the error's type, not its text ------------------------------------------------------
def _hub_error(status: int | None):
    """A real huggingface_hub error as the library raises it: the HTTP client's, mapped to a one-line
    HubBackdoorError by hub_backdoor.sources.hub (status None: the connection was refused)."""
    import http.server

    from huggingface_hub.utils import get_session, hf_raise_for_status

    from hub_backdoor.errors import HubBackdoorError
    from hub_backdoor.sources.hub import raise_hub_error

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - stdlib name
            self.send_response(status or 500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Answer)
    port = server.server_address[1]
    if status is None:
        server.server_close()  # nobody listens there now
    else:
        threading.Thread(target=server.handle_request, daemon=True).start()
    try:
        try:
            hf_raise_for_status(get_session().get(f"http://127.0.0.1:{port}/api/models/org/m", timeout=10))
        except Exception as exc:  # noqa: BLE001 - mapped as the library maps it
            try:
                raise_hub_error(exc, repo_id="org/m", revision=None, writing=True)
            except HubBackdoorError as mapped:
                return mapped
    finally:
        server.server_close()
    raise AssertionError("no error raised")


def test_transient_errors_are_told_by_type(local_hub):
    from hub_backdoor.errors import DatasetError, RepoNotFoundError, RevisionNotFoundError
    from hub_backdoor.sources.hub import download_model
    from integrations.hub_webhook.service import PermanentError, is_permanent, is_transient

    for status in (None, 500, 503, 429, 412):
        e = _hub_error(status)
        assert is_transient(e) and not is_permanent(e), (status, e)
    for status in (403, 404, 400):
        e = _hub_error(status)
        assert not is_transient(e) and is_permanent(e), (status, e)
    # the Hub's "no such repo / revision": input errors, failed at once
    repo = f"tester/wh-tr-{uuid.uuid4().hex[:8]}"
    local_hub.commit_files(repo, {"README.md": b"---\nlicense: mit\n---\n"})
    for source, kind in ((f"tester/missing-{uuid.uuid4().hex[:8]}", RepoNotFoundError), (repo, None)):
        with pytest.raises(kind or RevisionNotFoundError) as info:
            download_model(source, revision="f" * 40 if kind is None else None)
        assert is_permanent(info.value) and not is_transient(info.value)
    # a message that merely reads like a network error is still an input error
    assert is_permanent(DatasetError("cannot reach the data (HTTP 503)"))
    assert is_permanent(PermanentError("bad options"))
    assert not is_permanent(RuntimeError("a bug")) and not is_transient(RuntimeError("a bug"))
    try:
        try:
            raise ConnectionResetError("peer went away")
        except OSError:
            raise DatasetError("cannot load dataset org/d") from None
    except DatasetError as e:
        assert is_transient(e) and not is_permanent(e)


def test_worker_retries_transient_and_fails_input_errors(local_hub, tmp_path):
    repo = f"tester/wh-rt-{uuid.uuid4().hex[:8]}"
    local_hub.commit_files(repo, {"README.md": b"---\nlicense: mit\n---\n"})
    config = Config(
        secret=SECRET, repos=["tester/wh-rt-*"], db=tmp_path / "q.sqlite3", port=0, retry_delay=0.05
    )
    service = Service(config)
    auditor, real_load = service.auditor, service.auditor.load
    loads: list[str] = []

    def flaky_load(job):
        loads.append(job.sha)
        if len(loads) == 1:
            raise _hub_error(503)  # the Hub had a bad moment: tried again
        return real_load(job)  # the commit does not exist: RevisionNotFoundError, failed at once

    auditor.load = flaky_load
    service.start()
    try:
        missing = "e" * 40
        status, answer = post(service.url, payload(local_hub, repo, missing))
        assert status == 202, answer
        job_id = answer["jobs"][0]["job"]
        job = wait_for(lambda: (j := service.store.get(job_id)) and j.status == "failed" and j, 30, "the job")
        assert job.attempts == 2 and loads == [missing, missing]
        assert "revision" in job.error and "not found" in job.error and "HTTP 503" not in job.error
        (why,) = audit_comments(local_hub, repo, missing)
        assert "could not audit" in why and "not found" in why
    finally:
        service.stop()


def test_audit_options_are_library_keywords(monkeypatch):
    from integrations.hub_webhook.service import build_parser, config_from_args, parse_audit_options

    assert parse_audit_options(["rule=mad", "seed=1", "image-column=img"]) == {
        "rule": "mad",
        "seed": 1,
        "image_column": "img",
    }
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_audit_options(["threads=4"])  # not an audit keyword
    with pytest.raises(ValueError, match="unknown audit options"):
        Config(secret=SECRET, repos=["org/*"], audit_options={"progress": True})
    monkeypatch.setenv("HUB_BACKDOOR_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("HUB_BACKDOOR_WEBHOOK_AUDIT_OPTIONS", "rule=mad,soft_margin=10")
    args = build_parser().parse_args(["--repo", "org/*", "--max-samples", "50", "--dataset", "org/d"])
    config = config_from_args(args)
    from hub_backdoor.options import AuditOptions

    assert config.audit_kwargs() == AuditOptions(rule="mad", soft_margin=10, max_samples=50).kwargs()
    assert config.reproduce_args("org/m") == [
        "--dataset", "org/d", "--max-samples", "50", "--rule", "mad", "--soft-margin", "10",
    ]


def test_the_event_log_keeps_only_the_newest_events(tmp_path, monkeypatch):
    from integrations.hub_webhook import store as store_module

    monkeypatch.setattr(store_module, "KEEP_EVENTS", 5)
    st = store_module.JobStore(tmp_path / "q.sqlite3")
    try:
        for i in range(12):
            st.log_event(repo=f"org/m{i}", scope="repo.content", action="update", status=200,
                         outcome="ignored")
        assert [e["repo"] for e in st.events()] == [f"org/m{i}" for i in range(11, 6, -1)]
    finally:
        st.close()
