"""State that every worker process (and the command line) sees: one SQLite file under DATA_DIR.

`ProjectStore`: per-project key/value state (extra params, the host and token from /setup).
`JobStore`: bulk jobs (their parameters, state and counts) and each task's outcome in them, so that a job killed at
any moment resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from typing import Any

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS state (project TEXT, key TEXT, value TEXT, PRIMARY KEY (project, key))",
    # state: queued | running | paused (Label Studio unavailable) | stopped | done | cancelled | failed;
    # params: JSON (never a key or token)
    "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, project TEXT, params TEXT, state TEXT, reason TEXT, "
    "created REAL, updated REAL, heartbeat REAL, chunk INTEGER DEFAULT 0)",
    # status: pending | importing | done | failed | skipped; chunk: the import chunk a task went out in
    "CREATE TABLE IF NOT EXISTS job_tasks (job TEXT, task INTEGER, status TEXT, kind TEXT, reason TEXT, "
    "chunk INTEGER, seconds REAL, PRIMARY KEY (job, task))",
    "CREATE INDEX IF NOT EXISTS job_tasks_status ON job_tasks (job, status)",
)


class ProjectStore:
    """Per-project key/value state (extra params, the Label Studio host and token from /setup).

    Kept in SQLite under DATA_DIR so that every gunicorn worker sees what /setup stored,
    whichever worker served it. The file may hold an access token: it is created mode 0600.
    WAL without fsync per commit: /setup must answer in Label Studio's 3 s even on a busy disk,
    and all of it is sent again on the next /setup.
    """

    def __init__(self, directory: str):
        self.path = os.path.join(directory, "projects.sqlite3")
        self._lock = threading.Lock()
        self._ready = False

    def _connect(self) -> sqlite3.Connection:
        with self._lock:
            if not self._ready:
                os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
                fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
                os.close(fd)
                with sqlite3.connect(self.path, timeout=10) as db:
                    db.execute("PRAGMA journal_mode=WAL")
                    for statement in _SCHEMA:
                        db.execute(statement)
                self._ready = True
        db = sqlite3.connect(self.path, timeout=30)
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def _run(self, sql: str, args: Iterable = (), many: bool = False) -> list[tuple]:
        """One statement in its own transaction; the rows it selects."""
        db = self._connect()
        try:
            with db:
                cursor = db.executemany(sql, args) if many else db.execute(sql, tuple(args))
                return cursor.fetchall()
        finally:
            db.close()

    def get(self, project: str, key: str, default: Any = None) -> Any:
        db = self._connect()
        try:
            row = db.execute("SELECT value FROM state WHERE project=? AND key=?", (project, key)).fetchone()
        finally:
            db.close()
        return default if row is None else json.loads(row[0])

    def update(self, project: str, values: dict[str, Any]) -> None:
        """Set several keys of a project in one transaction."""
        db = self._connect()
        try:
            with db:
                db.executemany("INSERT OR REPLACE INTO state VALUES (?, ?, ?)",
                               [(project, key, json.dumps(value)) for key, value in values.items()])
        finally:
            db.close()


def project_key(project: Any) -> str:
    """Label Studio sends the project as "<id>.<created_at timestamp>"; state is keyed by the id."""
    return str(project or "").split(".")[0]


# Outcomes a job keeps per task; 'pending' and 'importing' are not final.
FINAL = ("done", "failed", "skipped")
ACTIVE_JOB_STATES = ("queued", "running")


class JobStore(ProjectStore):
    """Bulk jobs and their tasks' outcomes, in the same file as the project state."""

    def create(self, job_id: str, project: str, params: dict, state: str = "queued") -> None:
        now = time.time()
        self._run("INSERT INTO jobs (id, project, params, state, created, updated, heartbeat) VALUES (?,?,?,?,?,?,?)",
                  (job_id, project, json.dumps(params), state, now, now, now))

    def job(self, job_id: str) -> dict | None:
        rows = self._run("SELECT id, project, params, state, reason, created, updated, heartbeat, chunk FROM jobs "
                         "WHERE id=?", (job_id,))
        if not rows:
            return None
        keys = ("id", "project", "params", "state", "reason", "created", "updated", "heartbeat", "chunk")
        job = dict(zip(keys, rows[0], strict=True))
        job["params"] = json.loads(job["params"])
        return job

    def jobs(self, project: str | None = None) -> list[str]:
        """Job ids, newest first."""
        if project is None:
            return [r[0] for r in self._run("SELECT id FROM jobs ORDER BY created DESC")]
        return [r[0] for r in self._run("SELECT id FROM jobs WHERE project=? ORDER BY created DESC", (project,))]

    def set_state(self, job_id: str, state: str, reason: str | None = None) -> None:
        now = time.time()
        self._run("UPDATE jobs SET state=?, reason=?, updated=?, heartbeat=? WHERE id=?",
                  (state, reason, now, now, job_id))

    def beat(self, job_id: str) -> None:
        self._run("UPDATE jobs SET heartbeat=? WHERE id=?", (time.time(), job_id))

    def next_chunk(self, job_id: str) -> int:
        """A new import chunk number for the job (1, 2, ...)."""
        return self._run("UPDATE jobs SET chunk=chunk+1 WHERE id=? RETURNING chunk", (job_id,))[0][0]

    def record(self, job_id: str, rows: Iterable[tuple]) -> None:
        """rows: (task id, status, failure kind, reason, chunk, seconds), written in one transaction."""
        self._run("INSERT OR REPLACE INTO job_tasks VALUES (?, ?, ?, ?, ?, ?, ?)",
                  ((job_id, *row) for row in rows), many=True)

    def statuses(self, job_id: str, task_ids: Iterable[int]) -> dict[int, str]:
        ids = list(task_ids)
        found: dict[int, str] = {}
        for start in range(0, len(ids), 500):  # SQLite's parameter limit
            part = ids[start:start + 500]
            found.update(self._run(f"SELECT task, status FROM job_tasks WHERE job=? AND task IN "
                                   f"({','.join('?' * len(part))})", (job_id, *part)))
        return found

    def tasks_in(self, job_id: str, status: str) -> list[int]:
        return [r[0] for r in self._run("SELECT task FROM job_tasks WHERE job=? AND status=? ORDER BY task",
                                        (job_id, status))]

    def counts(self, job_id: str) -> dict[str, int]:
        counts = dict.fromkeys(("pending", "importing", *FINAL), 0)
        counts.update(self._run("SELECT status, COUNT(*) FROM job_tasks WHERE job=? GROUP BY status", (job_id,)))
        return counts

    def seconds(self, job_id: str) -> float:
        """The summed pipeline time of the job's finished tasks."""
        return self._run("SELECT COALESCE(SUM(seconds), 0) FROM job_tasks WHERE job=? AND status IN "
                         "('done', 'failed')", (job_id,))[0][0]

    def failures(self, job_id: str, limit: int = 20) -> list[dict]:
        rows = self._run("SELECT task, kind, reason FROM job_tasks WHERE job=? AND status='failed' ORDER BY rowid DESC "
                         "LIMIT ?", (job_id, limit))
        return [{"task": task, "kind": kind, "reason": reason} for task, kind, reason in rows]

    def totals(self) -> dict[str, int]:
        """Jobs by state and their tasks by status, over every job: jobs_<state>, job_tasks_<status>."""
        totals = {f"jobs_{state}": n for state, n in self._run("SELECT state, COUNT(*) FROM jobs GROUP BY state")}
        totals.update({f"job_tasks_{status}": n for status, n in
                       self._run("SELECT status, COUNT(*) FROM job_tasks GROUP BY status")})
        return totals

    def claimed(self, project: str, task_ids: Iterable[int]) -> set[int]:
        """Which of these tasks a queued or running job of the project still has to predict or import."""
        ids = list(task_ids)
        found: set[int] = set()
        for start in range(0, len(ids), 500):
            part = ids[start:start + 500]
            found.update(r[0] for r in self._run(
                f"SELECT t.task FROM job_tasks t JOIN jobs j ON j.id = t.job WHERE j.project=? AND j.state IN "
                f"({','.join('?' * len(ACTIVE_JOB_STATES))}) AND t.status IN ('pending', 'importing') AND t.task IN "
                f"({','.join('?' * len(part))})", (project, *ACTIVE_JOB_STATES, *part)))
        return found
