"""The service's persistent queue: one SQLite file (WAL), safe to kill at any moment.

``jobs`` holds one row per ``(repo, commit)``: ``queued`` -> ``running`` -> ``done`` | ``failed``.
Every state change is a committed transaction, so a killed service loses nothing: at the next start
:meth:`JobStore.recover` puts the jobs that were ``running`` back in the queue (or fails them after
``max_attempts`` tries, so a model that crashes the service cannot loop forever). A commit already
``done`` or queued is never queued twice. The steps that answer on the Hub record what they did
(``comment_url``, ``pr_url``), so a retried job does not comment or open a pull request twice.

``events`` logs every webhook delivery and what became of it.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    repo TEXT NOT NULL,
    repo_key TEXT NOT NULL,
    sha TEXT NOT NULL,
    ref TEXT,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    deliveries INTEGER NOT NULL DEFAULT 1,
    not_before REAL NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    verdict TEXT,
    target INTEGER,
    comment_url TEXT,
    pr_url TEXT,
    error TEXT,
    report TEXT,
    UNIQUE (repo_key, sha)
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, not_before, id);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received REAL NOT NULL,
    repo TEXT,
    scope TEXT,
    action TEXT,
    status INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT
);
"""

ACTIVE = ("queued", "running")
#: Events the log keeps (the newest).
KEEP_EVENTS = 10_000


@dataclass
class Job:
    """One audit of one commit of one repo."""

    id: int
    repo: str
    sha: str
    ref: str | None
    status: str
    attempts: int
    deliveries: int
    created: float
    started: float | None = None
    finished: float | None = None
    verdict: str | None = None
    target: int | None = None
    comment_url: str | None = None
    pr_url: str | None = None
    error: str | None = None
    report: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("report")
        return d


_JOB_COLUMNS = (
    "id, repo, sha, ref, status, attempts, deliveries, created, started, finished, verdict, target, "
    "comment_url, pr_url, error, report"
)


class JobStore:
    """The queue and the event log in one SQLite file; thread-safe (one connection behind a lock)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            str(self.path), check_same_thread=False, isolation_level=None, timeout=30
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @staticmethod
    def _job(row: tuple | None) -> Job | None:
        if row is None:
            return None
        return Job(*row)

    # -- queue ----------------------------------------------------------------------------------------
    def enqueue(self, repo: str, sha: str, ref: str | None, *, queue_size: int) -> tuple[str, int | None]:
        """Queue an audit of ``repo@sha``. Returns ``(outcome, job id)``: ``"queued"``, ``"duplicate"``
        (already queued, running or done), ``"requeued"`` (it had failed) or ``"full"``."""
        now = time.time()
        with self._tx() as c:
            row = c.execute(
                "SELECT id, status FROM jobs WHERE repo_key = ? AND sha = ?", (repo.lower(), sha)
            ).fetchone()
            if row is not None and row[1] != "failed":
                c.execute("UPDATE jobs SET deliveries = deliveries + 1 WHERE id = ?", (row[0],))
                return "duplicate", row[0]
            (active,) = c.execute(
                f"SELECT COUNT(*) FROM jobs WHERE status IN {ACTIVE}"  # noqa: S608 (constant)
            ).fetchone()
            if active >= queue_size:
                return "full", None
            if row is not None:  # failed before: a new delivery is a new try
                c.execute(
                    "UPDATE jobs SET status = 'queued', attempts = 0, not_before = 0, error = NULL, "
                    "deliveries = deliveries + 1, ref = COALESCE(?, ref) WHERE id = ?",
                    (ref, row[0]),
                )
                return "requeued", row[0]
            cur = c.execute(
                "INSERT INTO jobs (repo, repo_key, sha, ref, status, created) "
                "VALUES (?, ?, ?, ?, 'queued', ?)",
                (repo, repo.lower(), sha, ref, now),
            )
            return "queued", int(cur.lastrowid)

    def claim(self) -> Job | None:
        """Take the oldest queued job whose repo has no running job (one at a time per repo)."""
        now = time.time()
        with self._tx() as c:
            row = c.execute(
                "SELECT id FROM jobs WHERE status = 'queued' AND not_before <= ? AND repo_key NOT IN "
                "(SELECT repo_key FROM jobs WHERE status = 'running') ORDER BY id LIMIT 1",
                (now,),
            ).fetchone()
            if row is None:
                return None
            c.execute(
                "UPDATE jobs SET status = 'running', attempts = attempts + 1, started = ? WHERE id = ?",
                (now, row[0]),
            )
            return self._job(c.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (row[0],)).fetchone())

    def recover(self, max_attempts: int) -> tuple[list[Job], list[Job]]:
        """At start-up: jobs left ``running`` by a dead service go back to the queue, or fail when they
        were tried ``max_attempts`` times. Returns ``(requeued, failed)``."""
        now = time.time()
        with self._tx() as c:
            rows = c.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status = 'running'").fetchall()
            jobs = [j for j in map(self._job, rows) if j is not None]
            requeued = [j for j in jobs if j.attempts < max_attempts]
            failed = [j for j in jobs if j.attempts >= max_attempts]
            for j in requeued:
                c.execute("UPDATE jobs SET status = 'queued', not_before = 0 WHERE id = ?", (j.id,))
            for j in failed:
                c.execute(
                    "UPDATE jobs SET status = 'failed', finished = ?, error = ? WHERE id = ?",
                    (now, f"interrupted {j.attempts} times (the service stopped while auditing)", j.id),
                )
            return requeued, failed

    def update(self, job_id: int, **fields: Any) -> None:
        """Record a step (``comment_url``, ``pr_url``, ...) of a running job at once."""
        allowed = {"verdict", "target", "comment_url", "pr_url", "error", "report"}
        if not fields or set(fields) - allowed:
            raise ValueError(f"cannot update {sorted(set(fields) - allowed)}")
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._tx() as c:
            c.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))  # noqa: S608

    def finish(self, job_id: int, **fields: Any) -> None:
        """Mark a job done, with its results."""
        if fields:
            self.update(job_id, **fields)
        with self._tx() as c:
            c.execute("UPDATE jobs SET status = 'done', finished = ? WHERE id = ?", (time.time(), job_id))

    def retry(self, job_id: int, error: str, delay: float) -> None:
        """Put a job back in the queue, to run again no sooner than ``delay`` seconds from now."""
        with self._tx() as c:
            c.execute(
                "UPDATE jobs SET status = 'queued', error = ?, not_before = ? WHERE id = ?",
                (error, time.time() + delay, job_id),
            )

    def fail(self, job_id: int, error: str) -> None:
        with self._tx() as c:
            c.execute(
                "UPDATE jobs SET status = 'failed', error = ?, finished = ? WHERE id = ?",
                (error, time.time(), job_id),
            )

    # -- reading ----------------------------------------------------------------------------------------
    def get(self, job_id: int) -> Job | None:
        with self._lock:
            row = self._conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._job(row)

    def jobs(self, limit: int = 100) -> list[Job]:
        """The latest jobs, newest first."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
        return [j for j in map(self._job, rows) if j is not None]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        out = {"queued": 0, "running": 0, "done": 0, "failed": 0}
        out.update({status: n for status, n in rows})
        return out

    def next_due(self) -> float | None:
        """When the earliest queued job that waits for a retry becomes due (epoch seconds), or None."""
        with self._lock:
            (t,) = self._conn.execute(
                "SELECT MIN(not_before) FROM jobs WHERE status = 'queued' AND not_before > ?", (time.time(),)
            ).fetchone()
        return t

    # -- event log --------------------------------------------------------------------------------------
    def log_event(
        self,
        *,
        repo: str | None,
        scope: str | None,
        action: str | None,
        status: int,
        outcome: str,
        detail: str = "",
    ) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO events (received, repo, scope, action, status, outcome, detail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (time.time(), repo, scope, action, status, outcome, detail[:1000]),
            )
            # the log keeps the newest KEEP_EVENTS events: it cannot grow without bound
            c.execute("DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ?", (KEEP_EVENTS,))

    def events(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, received, repo, scope, action, status, outcome, detail FROM events "
                "ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        keys = ("id", "received", "repo", "scope", "action", "status", "outcome", "detail")
        return [dict(zip(keys, r)) for r in rows]
