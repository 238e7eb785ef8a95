"""The connection to Label Studio: which URL and key to use, the Authorization header a key needs,
label_studio_sdk's REST client for it, and a project's calls the bulk job makes (`LabelStudioProject`: paged task
listing, the bulk prediction import, predictions by task and their clean-up), retried with backoff.

Label Studio accepts two kinds of key: a legacy token (``Authorization: Token <key>``) and JWTs. A personal
access token (PAT) is a JWT *refresh* token that must first be exchanged for a short-lived access JWT
(``Authorization: Bearer <access>``, 5 minutes). The exchange is label_studio_sdk's (`TokensClientExt.refresh`,
the call its own client makes); what is ours is the cache policy around it, because the SDK's cache can't do two
things a long-running service needs (tests/test_images.py shows both): it reuses an access token until the second
it expires (we refresh 30 s early, so none expires in flight), and it can't drop an access token Label Studio
refused (after a restart with a new secret; we refresh once and retry).

Keys never reach logs or messages: `Connection` leaves the key out of its repr, and messages name the variables.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import urlsplit

from config import Settings
from errors import LabelStudioError, LabelStudioNotFound, LabelStudioRefused, LabelStudioUnavailable

logger = logging.getLogger(__name__)

# Refresh a cached access token this long before its `exp`, so it cannot expire in flight.
ACCESS_TOKEN_MARGIN_S = 30.0
# Used when an access token carries no `exp`; Label Studio's access tokens live 5 minutes.
ACCESS_TOKEN_DEFAULT_TTL_S = 300.0
# Distinct connections (Label Studio URL, key) whose clients and access tokens are kept; more means keys keep
# changing.
CLIENT_CACHE_SIZE = 8
PAGE_SIZE = 100  # tasks per page listed from Label Studio
ID_QUERY_SIZE = 500  # task ids per listing query for an explicit selection
KEY_HINT = (
    "set LABEL_STUDIO_API_KEY (or LABEL_STUDIO_ACCESS_TOKEN) to a Label Studio legacy token or personal access "
    "token of a user who can see the project, and LABEL_STUDIO_URL (or LABEL_STUDIO_HOST) to the URL the backend "
    "can reach Label Studio at"
)


def normalise_base(base: str | None) -> str:
    """Label Studio base URL with a scheme and no trailing slash; '' when unset."""
    base = (base or "").strip().rstrip("/")
    if base and "://" not in base:
        # Users often write LABEL_STUDIO_HOST=localhost:8080; no HTTP client can fetch that.
        base = "http://" + base
    return base


def origin(url: str) -> tuple[str, int | None] | None:
    """(lower-case host, effective port) of an absolute http(s) URL; None when it has none."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    if port is None:
        port = {"http": 80, "https": 443}.get(parts.scheme.lower())
    return parts.hostname.lower(), port


def jwt_payload(token: str) -> dict | None:
    """The decoded (not verified) payload of a JWT; None when `token` is not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    segment = parts[1]
    try:
        payload = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (binascii.Error, ValueError):  # also covers JSONDecodeError and UnicodeDecodeError
        return None
    return payload if isinstance(payload, dict) else None


@dataclass(frozen=True)
class Connection:
    """Where Label Studio is and the key to use there. url: scheme://host[:port][/path], no trailing slash,
    '' when unknown; key: '' when none."""

    url: str
    key: str = field(repr=False)

    @property
    def key_kind(self) -> str:
        """'none', 'legacy', 'access' (a JWT access token) or 'personal' (a personal access token)."""
        if not self.key:
            return "none"
        payload = jwt_payload(self.key)
        if payload is None:
            return "legacy"
        return "personal" if payload.get("token_type") == "refresh" else "access"

    def serves(self, url: str) -> bool:
        """Whether an absolute URL points at this Label Studio (same host and port)."""
        return bool(self.url) and origin(url) == origin(self.url)


def resolve_connection(settings: Settings, hostname: str | None = None, access_token: str | None = None
                       ) -> Connection:
    """LABEL_STUDIO_URL/HOST and LABEL_STUDIO_API_KEY/ACCESS_TOKEN first, then the host and token that Label
    Studio sent on /setup (`hostname`, `access_token`)."""
    url = normalise_base(settings.label_studio_url) or normalise_base(hostname)
    return Connection(url, (settings.label_studio_api_key or access_token or "").strip())


class LabelStudioClient:
    """Talks to Label Studio for the service: Authorization headers for a connection's key (personal access
    tokens exchanged and refreshed), authenticated GETs, and label_studio_sdk's REST client per connection.

    Shared by a process's threads; its caches are bounded and guarded by a lock.
    """

    def __init__(self, settings: Settings):
        self._settings = settings
        self._lock = threading.RLock()  # held across a token exchange, so that concurrent requests share one
        self._clients: OrderedDict[Connection, object] = OrderedDict()
        self._access: dict[Connection, tuple[str, float]] = {}  # access JWT, expiry as time.time()

    def connection(self, hostname: str | None = None, access_token: str | None = None) -> Connection:
        return resolve_connection(self._settings, hostname, access_token)

    def sdk(self, connection: Connection):
        """label_studio_sdk's `LabelStudio` client for the connection (one per connection, kept)."""
        if not connection.url:
            raise LabelStudioError("the Label Studio URL is unknown: " + KEY_HINT)
        with self._lock:
            client = self._clients.get(connection)
            if client is None:
                from label_studio_sdk import LabelStudio
                from label_studio_sdk.core.api_error import ApiError

                try:
                    client = LabelStudio(base_url=connection.url, api_key=connection.key,
                                         timeout=self._settings.image_fetch_timeout)
                except ApiError as e:  # an expired personal access token, or a JWT without exp
                    raise LabelStudioError(f"Label Studio key refused before use: {_api_detail(e)}; {KEY_HINT}"
                                           ) from None
                if len(self._clients) >= CLIENT_CACHE_SIZE:
                    old = next(iter(self._clients))
                    self._clients.pop(old)
                    self._access.pop(old, None)
                self._clients[connection] = client
            self._clients.move_to_end(connection)
            return client

    def authorization(self, connection: Connection, stale: str | None = None) -> tuple[dict[str, str], bool]:
        """(headers, whether the access token came from the cache) for a request to `connection`'s Label Studio.

        stale: an access token Label Studio just refused: it is replaced unless another thread already did.
        Raises LabelStudioError when a personal access token can't be exchanged."""
        kind = connection.key_kind
        if kind == "none":
            return {}, False
        if kind == "legacy":
            return {"Authorization": f"Token {connection.key}"}, False
        if kind == "access":
            return {"Authorization": f"Bearer {connection.key}"}, False
        token, cached = self._access_token(connection, stale)
        return {"Authorization": f"Bearer {token}"}, cached

    def get(self, connection: Connection, url: str, download: Callable[[dict[str, str], str], bytes]) -> bytes:
        """GET `url` on Label Studio with the connection's key: `download(headers, hint)` does the transfer and
        raises an exception with `status == 401` when refused (`hint` says what to do then). A refused access
        token from the cache is refreshed once and the GET retried."""
        hint = {
            "none": "no Label Studio API key is configured: " + KEY_HINT,
            "legacy": "the key is a legacy token; legacy tokens may be disabled for this organization (use a "
                      "personal access token instead). " + KEY_HINT,
            "access": "the key is a JWT access token, which expires after minutes; use a personal access token. "
                      + KEY_HINT,
            "personal": "the personal access token's access token was refused. " + KEY_HINT,
        }[connection.key_kind]
        headers, cached = self.authorization(connection)
        try:
            return download(headers, hint)
        except Exception as e:
            # A 401 from a storage host Label Studio redirected to says nothing about the key.
            if getattr(e, "status", None) != 401 or getattr(e, "redirected", False) or not cached:
                raise
        logger.info("Label Studio refused a cached access token; refreshing it once")
        headers, _ = self.authorization(connection, stale=headers["Authorization"].removeprefix("Bearer "))
        return download(headers, hint)

    def _access_token(self, connection: Connection, stale: str | None) -> tuple[str, bool]:
        with self._lock:
            entry = self._access.get(connection)
            if entry is not None:
                token, expires_at = entry
                if token != stale and expires_at - ACCESS_TOKEN_MARGIN_S > time.time():
                    return token, stale is None
            token = self._exchange(connection)
            exp = (jwt_payload(token) or {}).get("exp")
            expires_at = float(exp) if isinstance(exp, int | float) else time.time() + ACCESS_TOKEN_DEFAULT_TTL_S
            self._access[connection] = (token, expires_at)
            return token, False

    def _exchange(self, connection: Connection) -> str:
        """A new access JWT for the connection's personal access token, through the SDK's token client."""
        from label_studio_sdk.tokens.client_ext import TokensClientExt

        client = self.sdk(connection)
        where = connection.url + "/api/token/refresh/"
        started = time.monotonic()
        try:
            # The SDK's own exchange (its client keeps the HTTP session in _client_wrapper, 2.1.2). A base URL with
            # a trailing slash keeps a Label Studio under a sub-path: the SDK urljoins the route onto it.
            tokens = TokensClientExt(base_url=connection.url + "/", api_key=connection.key,
                                     client_wrapper=client._client_wrapper)
            access = tokens.refresh().access
        except Exception as e:
            status = getattr(e, "status_code", None)
            if status is not None:
                raise LabelStudioError(f"Label Studio refused the personal access token at {where}: HTTP {status}"
                                       f"{_api_detail(e, prefix=': ')}; it may be revoked or expired: {KEY_HINT}"
                                       ) from None
            raise LabelStudioError(f"could not exchange the personal access token at {where}: "
                                   f"{type(e).__name__}: {_short(e)}") from None
        if not isinstance(access, str) or not access:
            raise LabelStudioError(f"{where} answered without an access token; is LABEL_STUDIO_URL Label Studio?")
        logger.info("exchanged personal access token at %s in %.0f ms", where, (time.monotonic() - started) * 1000)
        return access


def _api_detail(error: Exception, prefix: str = "") -> str:
    """Label Studio's {"detail": ...} of an SDK ApiError, or ''."""
    body = getattr(error, "body", None)
    detail = body.get("detail") if isinstance(body, dict) else body if isinstance(body, str) else None
    return f"{prefix}{detail[:200]}" if isinstance(detail, str) and detail else ""


def _short(error: Exception) -> str:
    text = str(error)
    return text if len(text) <= 300 else text[:300] + "..."


# --------------------------------------------------------------------------- a project's tasks and predictions


@dataclass(frozen=True)
class Selection:
    """Which tasks of the project: these ids, a Data Manager view, or (neither) all of them."""

    task_ids: tuple[int, ...] = ()
    view: int | None = None

    def describe(self) -> str:
        if self.task_ids:
            return f"{len(self.task_ids)} selected task(s)"
        return f"view {self.view}" if self.view is not None else "all tasks"


def has_prediction(task: dict, model_version: str) -> bool:
    """Whether a task, as Label Studio lists it, holds a prediction of `model_version`."""
    for prediction in task.get("predictions") or ():
        if isinstance(prediction, dict) and prediction.get("model_version") == model_version:
            return True
    versions = task.get("predictions_model_versions")
    if isinstance(versions, str):
        versions = [v.strip() for v in versions.split(",")]
    return model_version in (versions or ())


class LabelStudioProject:
    """The bulk job's calls to one Label Studio project, on label_studio_sdk's client, each retried with backoff
    when Label Studio is unreachable or answers 5xx."""

    def __init__(self, client, project: int, retries: int = 5, backoff: float = 1.0):
        self.client, self.project, self.retries, self.backoff = client, project, retries, backoff
        # One request at a time: a job lists tasks while its importer imports, and Label Studio on SQLite serves
        # the two together slower than one after the other (benchmarks/bench_bulk.py).
        self._one_at_a_time = threading.Lock()

    def _call(self, what: str, call: Callable):
        from label_studio_sdk.core.api_error import ApiError

        for attempt in range(self.retries + 1):
            try:
                with self._one_at_a_time:
                    return call()
            except ApiError as e:
                status = e.status_code or 0
                if status in (401, 403):
                    raise LabelStudioRefused(f"Label Studio refused the key ({what}: HTTP {status}): use a legacy "
                                             "token or personal access token of a user of the project") from None
                if status == 404:
                    raise LabelStudioNotFound(f"{what}: Label Studio answered 404 (no such project or view for "
                                              "this key)") from None
                if status < 500:
                    raise LabelStudioError(f"{what}: Label Studio answered HTTP {status}: {str(e.body)[:300]}"
                                           ) from None
                problem = f"HTTP {status}"
            except OSError as e:  # httpx's transport errors are OSErrors underneath, and the SDK lets them out
                problem = f"{type(e).__name__}: {e}"
            except Exception as e:
                if type(e).__module__.split(".")[0] != "httpx":
                    raise
                problem = f"{type(e).__name__}: {e}"
            if attempt == self.retries:
                raise LabelStudioUnavailable(f"{what}: Label Studio unavailable after {self.retries + 1} attempts "
                                             f"({problem})")
            delay = min(self.backoff * 2**attempt, 60)
            logger.warning("%s: %s; retrying in %.0f s", what, problem, delay)
            time.sleep(delay)

    def label_config(self) -> str:
        return self._call(f"project {self.project}", lambda: self.client.projects.get(id=self.project)).label_config

    def tasks(self, selection: Selection) -> Iterator[dict]:
        """The selected tasks as Label Studio lists them (data and predictions), a page at a time."""
        if selection.task_ids:
            ids = list(selection.task_ids)
            for start in range(0, len(ids), ID_QUERY_SIZE):
                query = json.dumps({"selectedItems": {"all": False, "included": ids[start:start + ID_QUERY_SIZE]}})
                yield from self._pages(query=query)
        else:
            yield from self._pages(view=selection.view)

    def _pages(self, **filters) -> Iterator[dict]:
        def page(number: int):
            return self.client.tasks.list(project=self.project, page=number, page_size=PAGE_SIZE, fields="all",
                                          **{k: v for k, v in filters.items() if v is not None})

        number = 1
        while True:
            try:
                pager = self._call(f"project {self.project}: tasks page {number}", lambda n=number: page(n))
            except LabelStudioNotFound:
                if number == 1:
                    raise
                return  # Label Studio answers 404 for the page after the last
            items = list(pager.items or ())
            for task in items:
                yield task.dict() if hasattr(task, "dict") else dict(task)
            if len(items) < PAGE_SIZE:
                return
            number += 1

    def total(self, selection: Selection) -> int | None:
        """How many tasks the selection holds (Label Studio's count for a view or the project)."""
        if selection.task_ids:
            return len(selection.task_ids)
        pager = self._call(f"project {self.project}: task count", lambda: self.client.tasks.list(
            project=self.project, page=1, page_size=1, fields="task_only",
            **({"view": selection.view} if selection.view is not None else {})))
        return getattr(pager.response, "total", None)

    def predicted(self, task_ids: Iterable[int], model_version: str, since: float) -> set[int]:
        """Which tasks hold a prediction of `model_version` created at or after `since` (unix time)."""
        found = set()
        for task_id in task_ids:
            predictions = self._call(f"predictions of task {task_id}",
                                     lambda t=task_id: self.client.predictions.list(task=t))
            for p in predictions:
                created = getattr(p, "created_at", None)
                stamp = created.timestamp() if isinstance(created, datetime) else 0.0
                if p.model_version == model_version and stamp >= since - 1.0:
                    found.add(task_id)
        return found

    def keep_newest(self, task_ids: Iterable[int], model_version: str) -> int:
        """Delete every prediction of `model_version` on these tasks but each task's newest (the highest id: Label
        Studio numbers them in order), so that none holds two and none is left without one; how many were
        deleted. One already gone (a resumed job deleting again) counts as deleted."""
        deleted = 0
        for task_id in task_ids:
            predictions = self._call(f"predictions of task {task_id}",
                                     lambda t=task_id: self.client.predictions.list(task=t))
            ids = sorted(p.id for p in predictions if p.model_version == model_version)
            for prediction_id in ids[:-1]:
                try:
                    self._call(f"delete of prediction {prediction_id}",
                               lambda i=prediction_id: self.client.predictions.delete(id=i))
                except LabelStudioNotFound:
                    pass
                deleted += 1
        return deleted

    def ml_connection(self):
        """The project's first model connection (Settings -> Model; .id, .url, .extra_params as stored: an object,
        a JSON string typed in the UI, or None), or None when it has none."""
        backends = self._call(f"project {self.project}: model connections",
                              lambda: self.client.ml.list(project=self.project))
        return backends[0] if backends else None

    def set_extra_params(self, ml, extra_params: dict) -> None:
        # With the connection's url and project, as the UI's form sends them: Label Studio 1.23.2 answers 500 to
        # a PATCH without them (its health check and /setup call then lack those arguments).
        self._call(f"model connection {ml.id}: extra params", lambda: self.client.ml.update(
            id=ml.id, url=ml.url, project=self.project, extra_params=extra_params))

    def import_predictions(self, predictions: list[dict]) -> int:
        """predictions: {"task", "result", "score", "model_version"} each; returns how many Label Studio created."""
        from label_studio_sdk import PredictionRequest

        request = [PredictionRequest(**p) for p in predictions]
        answer = self._call(f"project {self.project}: import of {len(predictions)} prediction(s)",
                            lambda: self.client.projects.import_predictions(id=self.project, request=request))
        return int(getattr(answer, "created", len(predictions)) or 0)
