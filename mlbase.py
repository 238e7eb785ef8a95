"""The Label Studio ML backend contract, in the shape of label_studio_ml's LabelStudioMLBase.

(The maintained label_studio_ml framework is not installable with Flask 3; see README.)
A backend subclasses LabelStudioMLBase; api.create_app serves it. One instance is made per
request for that request's project; heavy models live elsewhere and are shared.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from typing import Any


class RequestError(Exception):
    """A request the backend can't serve; `status` is the HTTP code, the message goes to the client."""

    status = 400

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


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


class LabelStudioMLBase:
    """Base class of a backend: override setup(), predict(), fit() and model_version."""

    def __init__(self, project_id: str | None = None, label_config: str | None = None,
                 store: ProjectStore | None = None):
        self.project_id = project_key(project_id)
        self.label_config = label_config
        self.store = store
        self._extra_params: dict | None = None

    # Per-project state, shared by all workers.
    def get(self, key: str, default: Any = None) -> Any:
        return default if self.store is None else self.store.get(self.project_id, key, default)

    def set(self, key: str, value: Any) -> None:
        self.update({key: value})

    def update(self, values: dict[str, Any]) -> None:
        if self.store is not None:
            self.store.update(self.project_id, values)

    @property
    def extra_params(self) -> dict:
        """The project's extra params: those /setup is checking, else the stored ones."""
        if self._extra_params is not None:
            return self._extra_params
        return self.get("extra_params") or {}

    @extra_params.setter
    def extra_params(self, value: dict) -> None:
        self._extra_params = value

    @property
    def model_version(self) -> str:
        return "0.0.1"

    def setup(self) -> None:
        """Check that this backend can serve the project (raise RequestError otherwise)."""

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs) -> list[dict]:
        """One prediction ({"result": [...], "score": float, "model_version": str}) per task, same order."""
        raise NotImplementedError

    def fit(self, event: str, data: dict, **kwargs) -> dict | None:
        """Called for Label Studio webhook events (ANNOTATION_CREATED, ...). Default: nothing to learn."""
        return None
