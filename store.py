"""Per-project state that every worker process sees: SQLite under DATA_DIR."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from typing import Any


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
                    db.execute("CREATE TABLE IF NOT EXISTS state (project TEXT, key TEXT, value TEXT, "
                               "PRIMARY KEY (project, key))")
                self._ready = True
        db = sqlite3.connect(self.path, timeout=10)
        db.execute("PRAGMA synchronous=NORMAL")
        return db

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
