"""A small Hugging Face Hub look-alike for tests: the real ``huggingface_hub`` client talks to it.

``LocalHub`` serves, on 127.0.0.1 and a free port, the subset of the Hub HTTP API that the client
uses to create repos, commit (also as pull requests), list, resolve and download files, read repo
info and model cards, and open and comment discussions. State lives in memory; every commit gets a
fresh 40-hex sha and keeps a full snapshot of the tree, so old shas keep resolving.

Point the client at it with ``HF_ENDPOINT=<hub.endpoint>`` set *before* ``huggingface_hub`` is
imported (the client reads the endpoint at import time); ``tests/conftest.py`` does this. Any
token is accepted. Files are always uploaded inline ("regular" upload mode: no LFS, no Xet) and
downloads carry no Xet headers, so everything goes over plain HTTP.

This module must not import ``huggingface_hub`` (importing it would freeze the default endpoint).

Standalone: ``python tests/hubserver.py --port 0`` prints the endpoint on stdout and serves until
interrupted.
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import itertools
import json
import re
import signal
import sys
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

USER = "local-user"
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_PR_RE = re.compile(r"^refs/pr/(\d+)$")
_GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
)
_DISCUSSIONS_PAGE = 50


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_sha(data: bytes) -> str:
    """The git object id of a blob, as the Hub reports it for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def card_metadata(readme: bytes | None) -> dict | None:
    """YAML front matter of a README as a dict, or None when there is none (or it is invalid)."""
    if readme is None:
        return None
    text = readme.decode("utf-8", errors="replace").lstrip("\ufeff")
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, flags=re.DOTALL)
    if match is None:
        return None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


class HubError(Exception):
    """An HTTP error answered to the client (with the X-Error-Code the client maps to exceptions)."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}
        self.body: dict = {"error": message}


@dataclass
class Commit:
    sha: str
    parent: str | None
    files: dict[str, bytes]  # full snapshot of the tree at this commit
    title: str
    message: str
    date: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    prs: dict[int, str] = field(default_factory=dict)  # num -> head sha of refs/pr/num
    discussions: dict[int, dict] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        """Commit sha a revision (branch, tag, refs/pr/N, refs/heads/x, full sha) points to."""
        rev = revision
        if rev.startswith("refs/heads/"):
            return self.branches.get(rev[len("refs/heads/") :])
        if rev.startswith("refs/tags/"):
            return self.tags.get(rev[len("refs/tags/") :])
        if (m := _PR_RE.match(rev)) is not None:
            return self.prs.get(int(m.group(1)))
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        if _SHA_RE.match(rev) and rev in self.commits:
            return rev
        return None

    @property
    def url_path(self) -> str:
        return _URL_PREFIX[self.repo_type] + self.repo_id


class HubState:
    """All repos, behind one lock. Methods raise HubError for the client to see."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self._counter = itertools.count()
        self.endpoint = ""

    # -- repos and revisions -------------------------------------------------------------------

    def repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id.lower()))
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def sha(self, repo: Repo, revision: str) -> str:
        sha = repo.resolve(revision)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha

    def new_sha(self, seed: str) -> str:
        return hashlib.sha1(f"{seed}:{next(self._counter)}:{_now()}".encode()).hexdigest()

    def create_repo(self, repo_type: str, repo_id: str, private: bool = False) -> tuple[Repo, bool]:
        with self.lock:
            key = (repo_type, repo_id.lower())
            if key in self.repos:
                return self.repos[key], False
            repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now())
            self.repos[key] = repo
            self._add_commit(repo, None, {".gitattributes": _GITATTRIBUTES}, "initial commit", "")
            repo.branches["main"] = next(iter(repo.commits))
            return repo, True

    def _add_commit(self, repo: Repo, parent: str | None, files: dict, title: str, message: str) -> str:
        sha = self.new_sha(f"{repo.repo_id}:{parent}:{title}")
        repo.commits[sha] = Commit(sha, parent, dict(files), title, message, _now())
        return sha

    def commit(
        self,
        repo: Repo,
        revision: str,
        changes: list[tuple[str, str, bytes | None]],
        *,
        title: str,
        message: str = "",
        parent_commit: str | None = None,
        create_pr: bool = False,
    ) -> tuple[str, int | None]:
        """Apply ("file"|"deletedFile"|"deletedFolder", path, content) changes; returns (sha, pr num)."""
        with self.lock:
            base = self.sha(repo, revision)
            if _SHA_RE.match(revision) and not create_pr:
                raise HubError(400, f"Cannot commit to a commit sha ({revision}): use a branch or refs/pr/N")
            if parent_commit is not None:
                if parent_commit not in repo.commits:
                    raise HubError(404, f"Invalid parent commit: {parent_commit}", "RevisionNotFound")
                if create_pr:
                    base = parent_commit
                elif parent_commit != base:
                    raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo.commits[base].files)
            for kind, path, content in changes:
                if kind == "file":
                    files[path] = content or b""
                elif kind == "deletedFile":
                    if path not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del files[path]
                elif kind == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    for p in [p for p in files if p.startswith(prefix)]:
                        del files[p]
            sha = self._add_commit(repo, base, files, title, message)
            event = self._event("commit", {"subject": title, "oid": sha})
            if create_pr:
                num = self._new_discussion(
                    repo,
                    title,
                    message or title,
                    is_pr=True,
                    status="open",
                    base_ref=self._ref_of(repo, revision),
                )
                repo.prs[num] = sha
                repo.discussions[num]["forkSha"] = base
                repo.discussions[num]["events"].append(event)
                return sha, num
            if (m := _PR_RE.match(revision)) is not None:
                num = int(m.group(1))
                repo.prs[num] = sha
                repo.discussions[num]["events"].append(event)
            else:
                branch = revision[len("refs/heads/") :] if revision.startswith("refs/heads/") else revision
                if branch not in repo.branches:
                    raise HubError(400, f"Cannot commit to {revision}: not a branch")
                repo.branches[branch] = sha
            return sha, None

    @staticmethod
    def _ref_of(repo: Repo, revision: str) -> str:
        if revision.startswith("refs/"):
            return revision
        if revision in repo.branches:
            return f"refs/heads/{revision}"
        if revision in repo.tags:
            return f"refs/tags/{revision}"
        return revision

    # -- discussions --------------------------------------------------------------------------

    def _event(self, kind: str, data: dict) -> dict:
        return {
            "id": self.new_sha(kind)[:24],
            "type": kind,
            "createdAt": _now(),
            "author": {"name": USER},
            "data": data,
        }

    def comment_event(self, text: str) -> dict:
        return self._event(
            "comment", {"edited": False, "hidden": False, "latest": {"raw": text, "html": text}}
        )

    def _new_discussion(
        self, repo: Repo, title: str, description: str, *, is_pr: bool, status: str, base_ref: str = ""
    ) -> int:
        num = max(repo.discussions, default=0) + 1
        repo.discussions[num] = {
            "num": num,
            "title": title,
            "status": status,
            "isPullRequest": is_pr,
            "createdAt": _now(),
            "author": {"name": USER},
            "events": [self.comment_event(description)],
            "base": base_ref or "refs/heads/main",
        }
        return num

    def create_discussion(self, repo: Repo, title: str, description: str, pull_request: bool) -> int:
        with self.lock:
            num = self._new_discussion(repo, title, description, is_pr=pull_request, status="open")
            if pull_request:
                repo.discussions[num]["status"] = "draft"
                fork = repo.branches["main"]
                repo.prs[num] = fork
                repo.discussions[num]["forkSha"] = fork
            return num

    def discussion(self, repo: Repo, num: int) -> dict:
        if num not in repo.discussions:
            raise HubError(404, f"Discussion {num} not found")
        return repo.discussions[num]

    def merge(self, repo: Repo, num: int) -> str:
        with self.lock:
            disc = self.discussion(repo, num)
            if not disc["isPullRequest"] or disc["status"] in ("merged", "closed"):
                raise HubError(400, f"Discussion {num} is not an open pull request")
            branch = disc["base"][len("refs/heads/") :]
            fork = repo.commits[disc["forkSha"]].files
            head = repo.commits[repo.prs[num]].files
            changes: list[tuple[str, str, bytes | None]] = []
            for path in sorted(set(fork) | set(head)):
                if path not in head:
                    changes.append(("deletedFile", path, None))
                elif fork.get(path) != head[path]:
                    changes.append(("file", path, head[path]))
            current = repo.commits[repo.branches[branch]].files
            changes = [c for c in changes if c[0] == "file" or c[1] in current]
            sha, _ = self.commit(repo, branch, changes, title=f"Merge pull request #{num}: {disc['title']}")
            disc["status"] = "merged"
            disc["mergeCommitId"] = sha
            disc["events"].append(self._event("status-change", {"status": "merged"}))
            return sha


# -- HTTP layer -----------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # keep-alive + small writes would otherwise add ~40 ms per request
    server_version = "LocalHub/1.0"
    state: HubState  # set on the subclass built by LocalHub
    verbose = False

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        if self.verbose:
            sys.stderr.write("LocalHub: " + format % args + "\n")

    # -- plumbing -----------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, headers: dict | None = None, content_type: str = "") -> None:
        """Queue the response; ``_dispatch`` writes it once the state lock is released."""
        headers = {"Content-Type": content_type or "application/json; charset=utf-8", **(headers or {})}
        self._pending = (status, body, headers)

    def _flush(self) -> None:
        status, body, headers = self._pending
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: Any, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _error(self, err: HubError) -> None:
        headers = dict(err.headers)
        if err.code:
            headers["X-Error-Code"] = err.code
        headers["X-Error-Message"] = (
            " ".join(err.message.split()).encode("latin-1", "replace").decode("latin-1")
        )
        self._json(err.body, err.status, headers)

    def _dispatch(self) -> None:
        body = self._read_body()
        split = urlsplit(self.path)
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        failure: Exception | None = None
        try:
            with self.state.lock:
                self._route(segments, query, body)
        except HubError as err:
            self._error(err)
        except Exception as exc:  # a bug in the fake hub: answer 400 (not 5xx, which the client retries)
            self._error(HubError(400, f"LocalHub internal error: {type(exc).__name__}: {exc}"))
            failure = exc
        self._flush()
        if failure is not None:
            raise failure

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    def _route(self, seg: list[str], query: dict, body: bytes) -> None:
        method = self.command
        if seg[:1] == ["api"]:
            rest = seg[1:]
            if rest == ["whoami-v2"]:
                return self._json(_whoami())
            if rest == ["validate-yaml"] and method == "POST":
                return self._validate_yaml(json.loads(body or b"{}"))
            if rest == ["repos", "create"] and method == "POST":
                return self._create_repo(json.loads(body))
            if rest == ["repos", "delete"] and method in ("POST", "DELETE"):
                return self._delete_repo(json.loads(body))
            if len(rest) >= 3 and rest[0] in _TYPES:
                repo = self.state.repo(_TYPES[rest[0]], f"{rest[1]}/{rest[2]}")
                return self._repo_api(repo, rest[3:], query, body)
        # /{ns}/{name}/resolve/{rev}/{path} or /{types}/{ns}/{name}/resolve/...
        repo_type = "model"
        if seg and seg[0] in ("datasets", "spaces") and len(seg) > 3 and seg[3] == "resolve":
            repo_type, seg = _TYPES[seg[0]], seg[1:]
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            repo = self.state.repo(repo_type, f"{seg[0]}/{seg[1]}")
            return self._resolve(repo, seg[3], "/".join(seg[4:]))
        raise HubError(404, f"LocalHub: no route for {method} {self.path}")

    # -- endpoints ----------------------------------------------------------------------------

    def _validate_yaml(self, payload: dict) -> None:
        content = payload.get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content.lstrip("\ufeff"), flags=re.DOTALL)
        errors = []
        if match is not None:
            try:
                data = yaml.safe_load(match.group(1))
                if data is not None and not isinstance(data, dict):
                    errors.append({"message": "YAML metadata must be a mapping"})
            except yaml.YAMLError as exc:
                errors.append({"message": f"Invalid YAML: {exc}"})
        if errors:
            err = HubError(400, "Invalid metadata in README.md")
            err.body = {"errors": errors, "warnings": []}
            raise err
        self._json({"errors": [], "warnings": []})

    def _create_repo(self, payload: dict) -> None:
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo, created = self.state.create_repo(repo_type, repo_id, private)
        url = f"{self.state.endpoint}/{repo.url_path}"
        if not created:
            err = HubError(409, "You already created this model repo")
            err.body["url"] = url
            raise err
        self._json({"url": url, "name": repo.repo_id, "id": repo.repo_id})

    def _delete_repo(self, payload: dict) -> None:
        repo_type = payload.get("type") or "model"
        repo = self.state.repo(repo_type, f"{payload.get('organization') or USER}/{payload['name']}")
        del self.state.repos[(repo_type, repo.repo_id.lower())]
        self._json({})

    def _repo_api(self, repo: Repo, rest: list[str], query: dict, body: bytes) -> None:
        method, state = self.command, self.state
        action = rest[0] if rest else ""
        if action == "" and method == "GET":
            return self._json(self._info(repo, state.sha(repo, "main"), blobs=_truthy(query.get("blobs"))))
        if action == "revision" and len(rest) == 2 and method == "GET":
            return self._json(self._info(repo, state.sha(repo, rest[1]), blobs=_truthy(query.get("blobs"))))
        if action == "tree" and len(rest) >= 2 and method == "GET":
            sha = state.sha(repo, rest[1])
            entries = self._tree(repo, sha, "/".join(rest[2:]), _truthy(query.get("recursive")))
            if _truthy(query.get("expand")):
                for entry in entries:
                    entry["lastCommit"] = self._last_commit(repo, sha, entry["path"])
            return self._json(entries)
        if action == "paths-info" and len(rest) == 2 and method == "POST":
            return self._paths_info(repo, state.sha(repo, rest[1]), body)
        if action == "refs" and method == "GET":
            return self._json(self._refs(repo, _truthy(query.get("include_prs"))))
        if action == "commits" and len(rest) == 2 and method == "GET":
            return self._json(self._history(repo, state.sha(repo, rest[1])))
        if action == "preupload" and len(rest) == 2 and method == "POST":
            return self._preupload(repo, rest[1], json.loads(body))
        if action == "commit" and len(rest) == 2 and method == "POST":
            return self._commit(repo, rest[1], body, create_pr=_truthy(query.get("create_pr")))
        if action == "branch" and len(rest) == 2:
            return self._branch(repo, rest[1], json.loads(body or b"{}"))
        if action == "tag" and len(rest) == 2:
            return self._tag(repo, rest[1], json.loads(body or b"{}"))
        if action == "discussions":
            return self._discussions(repo, rest[1:], query, json.loads(body or b"null"))
        raise HubError(404, f"LocalHub: no route for {method} {self.path}")

    def _info(self, repo: Repo, sha: str, *, blobs: bool) -> dict:
        commit = repo.commits[sha]
        siblings = []
        for path in sorted(commit.files):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=len(commit.files[path]), blobId=git_blob_sha(commit.files[path]))
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": sha,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "createdAt": repo.created_at,
            "lastModified": commit.date,
            "siblings": siblings,
        }
        card = card_metadata(commit.files.get("README.md"))
        if card is not None:
            info["cardData"] = card
            tags = card.get("tags")
            info["tags"] = [str(t) for t in tags] if isinstance(tags, list) else []
            if repo.repo_type == "model":
                for key in ("library_name", "pipeline_tag"):
                    if isinstance(card.get(key), str):
                        info[key] = card[key]
        return info

    @staticmethod
    def _tree(repo: Repo, sha: str, path: str, recursive: bool) -> list[dict]:
        files = repo.commits[sha].files
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in files):
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        entries: dict[str, dict] = {}
        for name in sorted(files):
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix) :].split("/")
            for depth in range(1, len(parts)):  # folders on the way
                folder = prefix + "/".join(parts[:depth])
                if depth > 1 and not recursive:
                    break
                entries.setdefault(
                    folder, {"type": "directory", "path": folder, "oid": _folder_oid(sha, folder)}
                )
            if len(parts) == 1 or recursive:
                data = files[name]
                entries[name] = {"type": "file", "path": name, "size": len(data), "oid": git_blob_sha(data)}
        return [entries[k] for k in sorted(entries)]

    def _paths_info(self, repo: Repo, sha: str, body: bytes) -> None:
        form = parse_qs(body.decode())
        files = repo.commits[sha].files
        out = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in files:
                out.append(
                    {"type": "file", "path": path, "size": len(files[path]), "oid": git_blob_sha(files[path])}
                )
            elif any(p.startswith(path + "/") for p in files):
                out.append({"type": "directory", "path": path, "oid": _folder_oid(sha, path)})
        self._json(out)

    @staticmethod
    def _last_commit(repo: Repo, sha: str, path: str) -> dict:
        commit = repo.commits[sha]
        while commit.parent is not None:
            parent = repo.commits[commit.parent]
            if _subtree(parent.files, path) != _subtree(commit.files, path):
                break
            commit = parent
        return {"id": commit.sha, "title": commit.title, "date": commit.date}

    @staticmethod
    def _refs(repo: Repo, include_prs: bool) -> dict:
        out: dict[str, Any] = {
            "branches": [
                {"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in repo.branches.items()
            ],
            "converts": [],
            "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": s} for t, s in repo.tags.items()],
        }
        if include_prs:
            out["pullRequests"] = [
                {"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": s}
                for n, s in sorted(repo.prs.items())
            ]
        return out

    @staticmethod
    def _history(repo: Repo, sha: str) -> list[dict]:
        out = []
        commit: Commit | None = repo.commits[sha]
        while commit is not None:
            out.append(
                {
                    "id": commit.sha,
                    "title": commit.title,
                    "message": commit.message,
                    "authors": [{"user": USER}],
                    "date": commit.date,
                }
            )
            commit = repo.commits[commit.parent] if commit.parent else None
        return out

    def _preupload(self, repo: Repo, revision: str, payload: dict) -> None:
        sha = self.state.sha(repo, revision)
        files = repo.commits[sha].files
        answer = []
        for item in payload.get("files", []):
            path = item["path"]
            oid = git_blob_sha(files[path]) if path in files else None
            answer.append({"path": path, "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        self._json({"files": answer, "commitOid": sha})

    def _commit(self, repo: Repo, revision: str, body: bytes, *, create_pr: bool) -> None:
        header: dict = {}
        changes: list[tuple[str, str, bytes | None]] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                content = value["content"]
                data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                changes.append(("file", value["path"], data))
            elif key in ("deletedFile", "deletedFolder"):
                changes.append((key, value["path"], None))
            elif key == "lfsFile":
                raise HubError(400, "LocalHub stores files inline only (no LFS): preupload answers 'regular'")
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        sha, num = self.state.commit(
            repo,
            revision,
            changes,
            title=header.get("summary") or "Commit",
            message=header.get("description") or "",
            parent_commit=header.get("parentCommit"),
            create_pr=create_pr,
        )
        base = f"{self.state.endpoint}/{repo.url_path}"
        self._json(
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{base}/commit/{sha}",
                "pullRequestUrl": f"{base}/discussions/{num}" if num is not None else None,
                "hookOutput": "",
            }
        )

    def _branch(self, repo: Repo, branch: str, payload: dict) -> None:
        if self.command == "DELETE":
            if branch not in repo.branches:
                raise HubError(404, f"Branch {branch} not found", "RevisionNotFound")
            if branch == "main":
                raise HubError(403, "Cannot delete the main branch")
            del repo.branches[branch]
            return self._json({})
        if branch in repo.branches:
            raise HubError(409, f"Branch {branch} already exists")
        repo.branches[branch] = self.state.sha(repo, payload.get("startingPoint") or "main")
        self._json({})

    def _tag(self, repo: Repo, name: str, payload: dict) -> None:
        if self.command == "DELETE":
            if repo.tags.pop(name, None) is None:
                raise HubError(404, f"Tag {name} not found", "RevisionNotFound")
            return self._json({})
        tag = payload["tag"]
        if tag in repo.tags:
            raise HubError(409, f"Tag {tag} already exists")
        repo.tags[tag] = self.state.sha(repo, name)  # POST .../tag/{revision} {"tag": name}
        self._json({})

    def _discussions(self, repo: Repo, rest: list[str], query: dict, payload: Any) -> None:
        state, method = self.state, self.command
        if not rest and method == "GET":
            items = [d for _, d in sorted(repo.discussions.items(), reverse=True)]
            if query.get("type") in ("discussion", "pull_request"):
                items = [d for d in items if d["isPullRequest"] == (query["type"] == "pull_request")]
            if query.get("status") == "open":
                items = [d for d in items if d["status"] in ("open", "draft")]
            elif query.get("status") == "closed":
                items = [d for d in items if d["status"] in ("closed", "merged")]
            start = int(query.get("p") or 0) * _DISCUSSIONS_PAGE
            page = [self._discussion_summary(repo, d) for d in items[start : start + _DISCUSSIONS_PAGE]]
            return self._json(
                {"discussions": page, "count": len(items), "start": start, "numClosedDiscussions": 0}
            )
        if not rest and method == "POST":
            num = state.create_discussion(
                repo, payload["title"], payload.get("description") or "", bool(payload.get("pullRequest"))
            )
            return self._json({"num": num, "url": f"{state.endpoint}/{repo.url_path}/discussions/{num}"})
        disc = state.discussion(repo, int(rest[0]))
        if len(rest) == 1 and method == "GET":
            out = self._discussion_summary(repo, disc)
            out["events"] = disc["events"]
            if disc["isPullRequest"]:
                out["changes"] = {"base": disc["base"]}
                if "mergeCommitId" in disc:
                    out["changes"]["mergeCommitId"] = disc["mergeCommitId"]
                out["filesWithConflicts"] = []
                out["diff"] = self._diff(repo, disc)
            return self._json(out)
        if len(rest) == 2 and method == "POST":
            action = rest[1]
            if action == "comment":
                event = state.comment_event(payload["comment"])
                disc["events"].append(event)
                return self._json({"newMessage": event})
            if action == "status":
                disc["status"] = payload["status"]
                event = state._event("status-change", {"status": payload["status"]})
                disc["events"].append(event)
                if payload.get("comment"):
                    disc["events"].append(state.comment_event(payload["comment"]))
                return self._json({"newStatus": event})
            if action == "title":
                event = state._event("title-change", {"from": disc["title"], "to": payload["title"]})
                disc["title"] = payload["title"]
                disc["events"].append(event)
                return self._json({"newTitle": event})
            if action == "merge":
                state.merge(repo, disc["num"])
                return self._json({})
        raise HubError(404, f"LocalHub: no route for {method} {self.path}")

    @staticmethod
    def _discussion_summary(repo: Repo, disc: dict) -> dict:
        keys = ("num", "title", "status", "isPullRequest", "createdAt", "author")
        out = {k: disc[k] for k in keys}
        out["repo"] = {"name": repo.repo_id, "type": repo.repo_type}
        return out

    @staticmethod
    def _diff(repo: Repo, disc: dict) -> str:
        fork = repo.commits[disc["forkSha"]].files
        head = repo.commits[repo.prs[disc["num"]]].files
        changed = sorted(p for p in set(fork) | set(head) if fork.get(p) != head.get(p))
        return "".join(f"diff --git a/{p} b/{p}\n" for p in changed)

    def _resolve(self, repo: Repo, revision: str, path: str) -> None:
        sha = self.state.sha(repo, revision)
        files = repo.commits[sha].files
        if path not in files:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        data = files[path]
        etag = git_blob_sha(data)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        status = 200
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if match and (match.group(1) or match.group(2)) and self.command == "GET":
            start, end = match.groups()
            if start:
                lo, hi = int(start), (int(end) if end else len(data) - 1)
            else:
                lo, hi = max(len(data) - int(end), 0), len(data) - 1
            headers["Content-Range"] = f"bytes {lo}-{hi}/{len(data)}"
            data, status = data[lo : hi + 1], 206
        self._send(status, data, headers, content_type="application/octet-stream")


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes")


def _whoami() -> dict:
    return {
        "type": "user",
        "id": "0" * 24,
        "name": USER,
        "fullname": "Local User",
        "email": "local-user@example.invalid",
        "emailVerified": True,
        "isPro": False,
        "orgs": [],
        "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}},
    }


def _folder_oid(sha: str, folder: str) -> str:
    return hashlib.sha1(f"{sha}:{folder}".encode()).hexdigest()


def _subtree(files: dict[str, bytes], path: str) -> dict[str, bytes]:
    return {p: d for p, d in files.items() if p == path or p.startswith(path.rstrip("/") + "/")}


class LocalHub:
    """In-memory Hub served over loopback; ``start()`` it, point ``HF_ENDPOINT`` at ``.endpoint``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, verbose: bool = False) -> None:
        self.host, self.port, self.verbose = host, port, verbose
        self.state = HubState()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("LocalHub is not started")
        return f"http://{self.host}:{self._server.server_address[1]}"

    url = endpoint

    def start(self) -> LocalHub:
        handler = type("LocalHubHandler", (_Handler,), {"state": self.state, "verbose": self.verbose})
        self._server = ThreadingHTTPServer((self.host, self.port), handler)
        self._server.daemon_threads = True
        self.state.endpoint = self.endpoint
        self._thread = threading.Thread(target=self._server.serve_forever, name="LocalHub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers for tests (read the state directly, no HTTP) ---------------------------------

    def _repo(self, repo_id: str, repo_type: str) -> Repo:
        try:
            return self.state.repo(repo_type, repo_id)
        except HubError as err:
            raise KeyError(f"no {repo_type} repo {repo_id!r} on LocalHub") from err

    def branch_sha(self, repo_id: str, branch: str = "main", *, repo_type: str = "model") -> str:
        """Commit sha of a branch (or any revision: tag, refs/pr/N, sha); KeyError if unknown."""
        with self.state.lock:
            sha = self._repo(repo_id, repo_type).resolve(branch)
        if sha is None:
            raise KeyError(f"no revision {branch!r} in {repo_id!r}")
        return sha

    def files(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> dict[str, bytes]:
        """All files of the repo at a revision (including the initial ``.gitattributes``)."""
        with self.state.lock:
            repo = self._repo(repo_id, repo_type)
            return dict(repo.commits[self.branch_sha(repo_id, revision, repo_type=repo_type)].files)

    def refs(self, repo_id: str, *, repo_type: str = "model") -> dict[str, str]:
        """Every ref name (``main``, ``refs/pr/1``, tags) mapped to its commit sha."""
        with self.state.lock:
            repo = self._repo(repo_id, repo_type)
            return {**repo.branches, **repo.tags, **{f"refs/pr/{n}": s for n, s in repo.prs.items()}}

    def discussions(self, repo_id: str, *, repo_type: str = "model") -> list[dict]:
        """Discussions and PRs, oldest first: num, title, status, is_pull_request, description
        (the opening post), comments (later comment texts, in order) and the raw events."""
        with self.state.lock:
            repo = self._repo(repo_id, repo_type)
            out = []
            for num, disc in sorted(repo.discussions.items()):
                texts = [e["data"]["latest"]["raw"] for e in disc["events"] if e["type"] == "comment"]
                out.append(
                    {
                        "num": num,
                        "title": disc["title"],
                        "status": disc["status"],
                        "is_pull_request": disc["isPullRequest"],
                        "description": texts[0] if texts else "",
                        "comments": texts[1:],
                        "events": copy.deepcopy(disc["events"]),
                    }
                )
            return out

    def commit_files(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        message: str = "seed",
        branch: str = "main",
        repo_type: str = "model",
    ) -> str:
        """Create the repo if needed and commit ``files`` to ``branch`` without HTTP; returns the sha."""
        with self.state.lock:
            repo, _ = self.state.create_repo(repo_type, repo_id)
            sha, _ = self.state.commit(
                repo, branch, [("file", p, d) for p, d in files.items()], title=message
            )
            return sha


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve an in-memory Hugging Face Hub look-alike.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--verbose", action="store_true", help="log every request on stderr")
    args = parser.parse_args(argv)
    hub = LocalHub(args.host, args.port, verbose=args.verbose).start()
    print(hub.endpoint, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    hub.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
