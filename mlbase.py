"""The Label Studio ML backend contract, in the shape of label_studio_ml's LabelStudioMLBase.

(The maintained label_studio_ml framework is not installable with Flask 3; see README.)
A backend subclasses LabelStudioMLBase; api.create_app serves it. One instance is made per
request for that request's project; heavy models live elsewhere and are shared.
"""

from __future__ import annotations

from typing import Any

from store import ProjectStore, project_key


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
        """Check that this backend can serve the project (raise an errors.ServiceError otherwise)."""

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs) -> list[dict]:
        """One prediction ({"result": [...], "score": float, "model_version": str}) per task, same order."""
        raise NotImplementedError

    def fit(self, event: str, data: dict, **kwargs) -> dict | None:
        """Called for Label Studio webhook events (ANNOTATION_CREATED, ...). Default: nothing to learn."""
        return None
