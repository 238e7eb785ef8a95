"""The HTTP layer: Label Studio's ML backend routes, parsed and validated, as a Flask app.

Routes: GET /health, POST /setup, POST /predict, POST /webhook, GET /metrics (Prometheus' text format,
metrics.py's), /jobs (bulk jobs), /evaluations (a project's pre-annotations measured); GET / in a browser: the
service's page (page.py's, which adds its own routes). Every other answer is JSON, errors included ({"error":
"..."} with a 4xx/5xx status; 503 with Retry-After when the scheduler refuses).
With BASIC_AUTH_USER and BASIC_AUTH_PASS set, every route but /health needs those credentials.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import orjson
from flask import Flask, g, jsonify, request
from flask.json.provider import DefaultJSONProvider
from prometheus_client import CONTENT_TYPE_LATEST
from werkzeug.exceptions import HTTPException

from errors import (
    InteractiveError,
    LabelConfigError,
    LabelStudioError,
    LabelStudioNotFound,
    LabelStudioRefused,
    LabelStudioUnavailable,
    ModelsNotReady,
    NotFound,
    ParamsError,
    PromptError,
    ServiceError,
    Unauthorized,
)
from jobs import JobService
from metrics import ServiceMetrics
from mlbase import LabelStudioMLBase
from scheduler import Busy, Caller, peer_connected
from store import project_key

if TYPE_CHECKING:
    from evaluate import Evaluations

logger = logging.getLogger(__name__)


class RequestError(ServiceError):
    """A request body this layer can't parse (not JSON, missing fields): 400."""


# The one place domain errors become HTTP statuses: an error takes its nearest class's (ServiceError: the rest).
ERROR_STATUS: dict[type[ServiceError], int] = {
    RequestError: 400,
    ParamsError: 400,
    LabelConfigError: 422,
    PromptError: 422,
    InteractiveError: 422,
    ModelsNotReady: 503,
    Busy: 503,
    Unauthorized: 401,
    NotFound: 404,
    LabelStudioRefused: 403,
    LabelStudioNotFound: 404,
    LabelStudioUnavailable: 503,
    LabelStudioError: 502,
    ServiceError: 400,
}


def status_of(error: ServiceError) -> int:
    """The HTTP status of a domain error: its nearest class in ERROR_STATUS."""
    return next(ERROR_STATUS[cls] for cls in type(error).__mro__ if cls in ERROR_STATUS)

ModelFactory = Callable[[str | None, str | None], LabelStudioMLBase]


def json_object(data: str | bytes, what: str) -> dict:
    """Parse `data` as a JSON object, or raise RequestError naming `what` and the problem."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise RequestError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise RequestError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def parse_extra_params(raw) -> dict:
    """extra_params arrives as an object (set through the API), a JSON string (typed into the UI's
    "Extra params" box), or null/empty. Returns a dict or raises RequestError."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return {}
    if isinstance(raw, str):
        return json_object(raw, "extra_params")
    if not isinstance(raw, dict):
        raise RequestError(f"extra_params must be a JSON object, got {type(raw).__name__}")
    return raw


class FastJSON(DefaultJSONProvider):
    """orjson for request and response bodies: a brush RLE is a list of up to millions of ints, which the
    standard library encodes several times slower."""

    def dumps(self, obj, **kwargs) -> str:
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY).decode()

    def loads(self, s, **kwargs):
        return orjson.loads(s)

    def response(self, *args, **kwargs):
        body = orjson.dumps(self._prepare_response_obj(args, kwargs), option=orjson.OPT_SERIALIZE_NUMPY)
        return self._app.response_class(body, mimetype="application/json")


def request_caller() -> Caller:
    """The current request's caller: it arrived when the app first saw it, and is connected while its socket is
    (gunicorn's, or the development server's). One per request (the metrics read its kind)."""
    caller = g.get("caller")
    if caller is None:
        sock = request.environ.get("gunicorn.socket") or request.environ.get("werkzeug.socket")
        caller = g.caller = Caller(time.monotonic(), lambda: peer_connected(sock))
    return caller


def _json_body() -> dict:
    data = request.get_data(cache=True)
    if not data:
        raise RequestError("request body is empty: expected a JSON object")
    return json_object(data, "request body")


def create_app(
    factory: ModelFactory,
    health: Callable[[], dict] = dict,
    basic_auth: tuple[str, str] | None = None,
    jobs: JobService | None = None,
    page: Callable[[], object] | None = None,
    metrics: ServiceMetrics | None = None,
    evaluations: Evaluations | None = None,
) -> Flask:
    """A Flask app serving the backend that `factory(project, label_config)` creates per request.

    health: extra fields for GET /health (e.g. the model load state); it must answer instantly.
    jobs: the bulk jobs behind /jobs (None: no such routes).
    page: GET /'s answer to a browser (Accept: text/html before JSON); anything else gets /health's JSON there.
    metrics: what GET /metrics serves (a registry of its own when None).
    evaluations: the project evaluations behind /evaluations (None: no such routes).
    """
    app = Flask(__name__)
    app.json = FastJSON(app)
    metrics = metrics or ServiceMetrics()

    @app.before_request
    def start_clock():
        request_caller()  # the request's arrival, before anything else runs

    @app.after_request
    def observe(response):
        caller = g.get("caller")
        if caller is not None:
            route = request.url_rule.rule if request.url_rule is not None else "unmatched"
            metrics.requests.labels(route, caller.kind, str(response.status_code)).observe(
                time.monotonic() - caller.arrived)
        return response

    @app.before_request
    def check_auth():
        if not basic_auth or request.path == "/health":
            return None
        auth = request.authorization
        ok = (
            auth is not None
            and hmac.compare_digest((auth.username or "").encode(), basic_auth[0].encode())
            and hmac.compare_digest((auth.password or "").encode(), basic_auth[1].encode())
        )
        if ok:
            return None
        response = jsonify(error="authentication required: HTTP basic auth with BASIC_AUTH_USER/BASIC_AUTH_PASS")
        response.status_code = 401
        response.headers["WWW-Authenticate"] = 'Basic realm="ml-backend"'
        return response

    @app.errorhandler(ServiceError)
    def service_error(e: ServiceError):
        status = status_of(e)
        metrics.errors.labels(str(status)).inc()
        logger.warning("%s %s -> %d: %s", request.method, request.path, status, e)
        response = jsonify(error=str(e))
        if isinstance(e, Busy):
            response.headers["Retry-After"] = str(e.retry_after)
        return response, status

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        return jsonify(error=e.description), e.code

    @app.errorhandler(Exception)
    def unexpected(e: Exception):
        metrics.errors.labels("500").inc()
        logger.exception("%s %s failed", request.method, request.path)
        return jsonify(error=f"internal error: {type(e).__name__}: {e}"), 500

    @app.get("/health")
    def health_route():
        return jsonify(status="UP", **health())

    @app.get("/")
    def index():
        if page is not None and request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html":
            return page()
        return health_route()

    @app.post("/setup")
    def setup():
        body = _json_body()
        project, schema = body.get("project"), body.get("schema")
        if not isinstance(schema, str) or not schema.strip():
            raise RequestError("'schema' (the project's labeling config) is missing")
        extra_params = parse_extra_params(body.get("extra_params"))
        model = factory(project, schema)
        model.extra_params = extra_params
        model.setup()  # raises a ServiceError for a config or params it can't serve: nothing is stored then
        state = {"extra_params": extra_params, "label_config": schema}
        state.update({key: body[key] for key in ("hostname", "access_token") if body.get(key)})
        model.update(state)
        metrics.setups.inc()
        return jsonify(model_version=model.model_version)

    @app.post("/predict")
    def predict():
        caller = request_caller()
        body = _json_body()
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            raise RequestError(f"'tasks' must be a list of task objects, got {type(tasks).__name__}")
        bad = [i for i, task in enumerate(tasks) if not isinstance(task, dict)]
        if bad:
            raise RequestError(f"tasks {bad} are not JSON objects")
        params = body.get("params") or {}
        if not isinstance(params, dict):
            raise RequestError("'params' must be an object")
        context = params.get("context")
        if context is not None and not isinstance(context, dict):
            raise RequestError("'params.context' must be an object or null")
        project = body.get("project")
        model = factory(project, body.get("label_config"))
        started = time.perf_counter()
        results = model.predict(tasks, context=context, caller=caller, login=params.get("login"),
                                password=params.get("password"))
        elapsed = time.perf_counter() - started
        metrics.predicted_tasks.inc(len(tasks))
        logger.info("project %s: %d task(s) predicted in %.2f s", project_key(project), len(tasks), elapsed)
        return jsonify(results=results)

    @app.post("/webhook")
    def webhook():
        body = _json_body()
        event = body.get("action")
        if not isinstance(event, str):
            raise RequestError("'action' (the webhook event name) is missing")
        project = (body.get("project") or {}).get("id") if isinstance(body.get("project"), dict) else None
        model = factory(str(project) if project is not None else None, None)
        result = model.fit(event, body)
        metrics.webhooks.inc()
        return jsonify(result or {}), 201

    @app.get("/metrics")
    def metrics_route():
        return app.response_class(metrics.text(), content_type=CONTENT_TYPE_LATEST)

    def caller_key() -> str:
        """The Label Studio key the caller presents; the jobs routes never act with the one /setup stored."""
        key = request.headers.get("X-Label-Studio-Key", "").strip()
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if not key and scheme.lower() in ("token", "bearer"):
            key = value.strip()
        if not key:
            raise Unauthorized("this route acts in Label Studio with your key: send 'Authorization: Token <key>' "
                               "(a legacy token or personal access token), or 'X-Label-Studio-Key: <key>' when the "
                               "backend uses basic auth")
        return key

    if jobs is not None:
        @app.post("/jobs")
        def create_job():
            key = caller_key()
            status = jobs.create(_json_body(), key)
            metrics.jobs_submitted.inc()
            return jsonify(status), 201

        @app.get("/jobs")
        def list_jobs():
            return jsonify(jobs=jobs.list())

        @app.get("/jobs/<job_id>")
        def get_job(job_id: str):
            return jsonify(jobs.status(job_id))

        @app.delete("/jobs/<job_id>")
        def cancel_job(job_id: str):
            return jsonify(jobs.cancel(job_id, caller_key()))

    if evaluations is not None:
        @app.post("/evaluations")
        def start_evaluation():
            key = caller_key()
            return jsonify(evaluations.start(_json_body(), key)), 201

        @app.get("/evaluations/<evaluation_id>")
        def get_evaluation(evaluation_id: str):
            return jsonify(evaluations.status(evaluation_id, caller_key()))

        @app.get("/evaluations/<evaluation_id>/report")
        def evaluation_report(evaluation_id: str):
            response = app.response_class(evaluations.html(evaluation_id, caller_key()), mimetype="text/html")
            response.headers["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'"
            return response

        @app.post("/evaluations/<evaluation_id>/apply")
        def apply_evaluation(evaluation_id: str):
            return jsonify(evaluations.apply(evaluation_id, caller_key()))

    return app
