"""The service's own page: GET / in a browser (ui/index.html, ui/page.css, ui/page.js, served from /ui/), and the
two JSON routes it uses besides /jobs: GET /status (models, memory, cache, recent requests) and POST /try (one
image and a prompt or clicks -> detections in pixels, drawn by the page).

Everything here is HTTP layer (like api.py): `register_page(app, ...)` adds the routes to the app api.create_app
built, so they share its basic auth and its JSON errors (ServiceError -> ERROR_STATUS).

POST /try, the image (exactly one of):
    multipart/form-data with a file field "image" (other fields as form fields), or a JSON body with
    "url" (fetched as a task's image URL is, under the same URL policy), "task" + "project" (a Label Studio task,
    read with the caller's key: 'Authorization: Token <key>' or 'X-Label-Studio-Key'), or "image_id" (an image this
    worker already holds: what an earlier /try answered).
and the query: "prompt" (the prompt box's syntax) with "box_threshold", "text_threshold", "max_detections",
"label_thresholds" ({label: {gate: value}}, as in a project's extra params), or
"clicks": [{"x", "y", "positive"}] in image pixels with an optional "label". "masks": false skips the segmenter.

The detector's outputs for an (image, prompt) are cached (dino.py), so the same image and prompt with other
thresholds re-filters them: no detector pass, no image encoder pass (the cache's `computed` counters, in the
answer and on /status, stay as they were). The boxes' masks are decoded again by SAM's light mask decoder.
"""

from __future__ import annotations

import collections
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flask import Blueprint, Flask, g, jsonify, request, send_from_directory

from api import json_object
from cache import image_digest
from config import Settings
from errors import NotFound, ParamsError, Unauthorized
from images import ImageError, ImageLoader, decode_image
from labeling import parse_label_config
from ls_client import Connection, LabelStudioProject, Selection, normalise_base
from pipeline import ClickQuery, Pipeline, TextQuery, detection_params
from prompts import EVERYTHING, prompt_labels, require_phrases
from regions import mask_to_polygons
from scheduler import Caller, Scheduler

UI_DIR = Path(__file__).resolve().parent / "ui"
IMAGE_KEY = "page-image"  # cache kind of the images /try holds: (IMAGE_KEY, digest) -> (H, W, 3) uint8
QUIET = ("/status", "/ui/", "/jobs", "/favicon.ico")  # the page's own polling: not listed in recent requests
STARTED = time.time()


class RequestLog:
    """The last `size` requests of this worker (method, path, status, milliseconds), for /status."""

    def __init__(self, size: int = 30):
        self._lock = threading.Lock()
        self._items: collections.deque = collections.deque(maxlen=size)

    def add(self, method: str, path: str, status: int, ms: float) -> None:
        with self._lock:
            self._items.appendleft({"method": method, "path": path, "status": status, "ms": round(ms, 1),
                                    "at": round(time.time(), 3)})

    def items(self) -> list[dict]:
        with self._lock:
            return list(self._items)


def memory() -> dict:
    """This worker's resident memory, and the GPU's when torch has initialised CUDA here (never initialises it)."""
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the peak, where /proc is missing
    result = {"rss_mb": round(rss / 2**20, 1), "gpu": None}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        free, total = torch.cuda.mem_get_info()
        result["gpu"] = {"allocated_mb": round(torch.cuda.memory_allocated() / 2**20, 1),
                         "reserved_mb": round(torch.cuda.memory_reserved() / 2**20, 1),
                         "used_mb": round((total - free) / 2**20, 1), "total_mb": round(total / 2**20, 1)}
    return result


def mask_runs(mask: np.ndarray) -> list[int]:
    """(H, W) bool -> run lengths of the row-major flattened mask, alternating, starting with a run of background
    (0 when the first pixel is foreground): what the page paints onto a canvas."""
    flat = np.asarray(mask, bool).reshape(-1)
    if not flat.size:
        return []
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    return [0, *runs] if flat[0] else runs


def request_key() -> str | None:
    """The caller's Label Studio key, as the /jobs routes read it (api.py): X-Label-Studio-Key, else
    'Authorization: Token|Bearer <key>'. Used for the request, never stored or logged."""
    key = request.headers.get("X-Label-Studio-Key", "").strip()
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if not key and scheme.lower() in ("token", "bearer"):
        key = value.strip()
    return key or None


def _number(body: dict, name: str, kind=float):
    """A form field (text) or JSON value as a number; ParamsError names the field."""
    value = body.get(name)
    if isinstance(value, str):
        try:
            return kind(value.strip()) if value.strip() else None
        except ValueError:
            raise ParamsError(f"'{name}' must be a number, got {value!r}") from None
    return value


class TryService:
    """POST /try's logic: the image (upload, URL, task, or one held already), the query, the detections."""

    def __init__(self, loader, settings: Settings, images: ImageLoader, scheduler: Scheduler | None = None):
        self.loader, self.settings, self.images = loader, settings, images
        self.scheduler = scheduler or Scheduler()

    def run(self, body: dict, upload: bytes | None, key: str | None, caller: Caller | None = None) -> dict:
        """The answer to one /try: its model passes go through the scheduler as a click or a prompt, with
        REQUEST_DEADLINE from when `caller`'s request arrived (scheduler.Busy when it can't be served by then)."""
        started = time.perf_counter()
        sources = [name for name in ("url", "task", "image_id") if body.get(name) not in (None, "")]
        sources += ["image"] if upload is not None else []
        if len(sources) != 1:
            raise ParamsError("say which image: exactly one of 'image' (a file, multipart/form-data), 'url', "
                              f"'task' (with 'project') or 'image_id'; got {sources or 'none'}")
        source = sources[0]
        models = self.loader.get()
        query = self._query(body)
        Pipeline(models, self.settings, self.images).check(query)
        image, image_id = self._image(source, body, upload, key, models)
        height, width = image.shape[:2]
        if isinstance(query, ClickQuery):
            query = _scaled_clicks(query, width, height)
        wants_masks = body.get("masks", True) not in (False, "false", "0")
        caller = caller or Caller(time.monotonic())
        kind = caller.kind = "click" if isinstance(query, ClickQuery) else "prompt"
        before = models.cache.computed_here()
        with self.scheduler.ticket(kind, caller.deadline(self.settings.request_deadline), caller.connected) as ticket:
            pipeline = Pipeline(models, self.settings, self.images, self.loader.model_version, ticket)
            detections = pipeline.detect(image, image_id, query, wants_masks=wants_masks)
        after = models.cache.computed_here()
        ran = {kind: n - before.get(kind, 0) for kind, n in after.items() if n > before.get(kind, 0)}
        found = []
        masks = iter(detections.masks) if detections.masks is not None else None
        for i in range(len(detections)):
            mask = next(masks) if masks is not None else None
            item = {"label": detections.labels[i], "score": round(float(detections.scores[i]), 4),
                    "box": [round(float(v), 1) for v in detections.xyxy[i]], "mask": None, "polygons": []}
            if mask is not None:
                item["mask"] = mask_runs(mask)
                item["polygons"] = [np.round(p, 1).tolist()
                                    for p in mask_to_polygons(mask, self.settings.polygon_tolerance)]
            found.append(item)
        answer = {"image_id": image_id, "width": width, "height": height, "source": source,
                  "detections": found, "model_version": self.loader.model_version,
                  "computed": models.cache.stats()["computed"], "ran": ran,
                  "seconds": round(time.perf_counter() - started, 3)}
        if isinstance(query, TextQuery):
            p = query.params
            answer.update(mode="prompt", phrases=[{"text": ph.text, "label": ph.label} for ph in query.phrases],
                          params={"box_threshold": p.box_threshold, "text_threshold": p.text_threshold,
                                  "max_detections": p.max_detections, "label_thresholds": p.label_thresholds})
        else:
            answer.update(mode="clicks")
        return answer

    def _query(self, body: dict) -> TextQuery | ClickQuery:
        clicks, prompt = body.get("clicks"), body.get("prompt")
        if clicks not in (None, "", []):
            return self._clicks(clicks, body.get("label") or "object")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ParamsError("'prompt' is missing: phrases separated by '.', like 'brown cat_cats. house' "
                              "(or send 'clicks')")
        values = {name: _number(body, name, int if name == "max_detections" else float)
                  for name in ("box_threshold", "text_threshold", "max_detections")}
        values["label_thresholds"] = body.get("label_thresholds") or None
        if isinstance(values["label_thresholds"], str):  # a form field
            values["label_thresholds"] = json_object(values["label_thresholds"], "label_thresholds")
        params = detection_params({k: v for k, v in values.items() if v is not None}, self.settings)
        labels = prompt_labels(prompt) or ("object",)
        plan = require_phrases(prompt, labels)
        params.check_labels(labels, source="the prompt")
        phrases = tuple(ph for ph in plan.phrases if ph.text != EVERYTHING) or plan.phrases
        return TextQuery(phrases, params)

    def _clicks(self, clicks, label) -> ClickQuery:
        if not isinstance(clicks, list) or len(clicks) > 50:
            raise ParamsError("'clicks' must be a list of up to 50 {\"x\", \"y\", \"positive\"} objects")
        if not isinstance(label, str):
            raise ParamsError(f"'label' must be a string, got {type(label).__name__}")
        for i, click in enumerate(clicks):
            if not (isinstance(click, dict) and all(isinstance(click.get(k), int | float)
                                                    and not isinstance(click.get(k), bool) for k in ("x", "y"))):
                raise ParamsError(f"'clicks[{i}]' must be {{\"x\": pixels, \"y\": pixels, \"positive\": true|false}}")
        # x, y in pixels here; ClickQuery wants percent: converted once the image size is known (_scaled_clicks).
        points = tuple((float(c["x"]), float(c["y"])) for c in clicks)
        return ClickQuery(points, tuple(0 if c.get("positive") is False else 1 for c in clicks), None, label)

    def _image(self, source: str, body: dict, upload: bytes | None, key: str | None, models) -> tuple[np.ndarray, str]:
        if source == "image_id":
            image_id = body["image_id"]
            if not isinstance(image_id, str):
                raise ParamsError("'image_id' must be a string")
            return self._held(models, image_id), image_id
        if source == "image":
            limit = self.settings.image_max_mb * 2**20
            if len(upload) > limit:
                raise ParamsError(f"'image' is {len(upload) / 2**20:.1f} MB, over IMAGE_MAX_MB "
                                  f"({self.settings.image_max_mb:g} MB)")
            try:
                image = decode_image(upload, self.settings.image_max_pixels)
            except ImageError as e:
                raise ParamsError(f"'image': {e}") from None
            image_id = image_digest(image)
        elif source == "url":
            image, image_id = self._url_image(body["url"], key, models)
        else:
            image, image_id = self._task_image(body, key, models)
        models.cache.put((IMAGE_KEY, image_id), image)
        return image, image_id

    def _url_image(self, url, key: str | None, models) -> tuple[np.ndarray, str]:
        """The image at a URL. One that Label Studio serves (its paths, an absolute URL on its host, a cloud storage
        URI) is read with the caller's key, never the service's, and not from the cache (which doesn't know who may
        read it); any other host's is fetched as a task's image is, without credentials."""
        if not isinstance(url, str):
            raise ParamsError("'url' must be a string")
        service = self.images.label_studio.connection()
        try:
            if not self.images.served_by_label_studio(url, service):
                return Pipeline(models, self.settings, self.images).load_image(url)
            if key is None:
                raise Unauthorized("'url' is read from Label Studio with your key: send 'X-Label-Studio-Key: <key>' "
                                   "(or 'Authorization: Token <key>')")
            image = self.images.load(url, caller=Connection(service.url, key))
        except ImageError as e:
            raise ParamsError(f"'url': {e}") from None
        return image, image_digest(image)

    def held(self, image_id: str) -> np.ndarray:
        """An image /try holds (NotFound when evicted or never seen by this worker)."""
        return self._held(self.loader.get(timeout=0), image_id)

    @staticmethod
    def _held(models, image_id: str) -> np.ndarray:
        def missing():
            raise NotFound(f"'image_id' {image_id!r} is not held by this worker (evicted, or another worker's): "
                           "send the image again")

        return models.cache.get((IMAGE_KEY, image_id), missing)

    def _task_image(self, body: dict, key: str | None, models) -> tuple[np.ndarray, str]:
        task, project = body.get("task"), body.get("project")
        for name, value in (("task", task), ("project", project)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParamsError(f"'{name}' must be a Label Studio {name} id (a positive integer), got {value!r}")
        if key is None:
            raise Unauthorized("'task' is read from Label Studio with your key: send 'X-Label-Studio-Key: <key>' "
                               "(or 'Authorization: Token <key>')")
        url = body.get("label_studio_url") or self.settings.label_studio_url
        if not isinstance(url, str) or not url:
            raise ParamsError("the Label Studio URL is unknown: send 'label_studio_url' or set LABEL_STUDIO_URL")
        connection = Connection(normalise_base(url), key)
        project_api = LabelStudioProject(self.images.label_studio.sdk(connection), project, retries=1)
        config = parse_label_config(project_api.label_config())
        found = next(iter(project_api.tasks(Selection(task_ids=(task,)))), None)
        if found is None:
            raise NotFound(f"'task' {task} is not in project {project}")
        image_url = config.image_url(found.get("data"))
        if image_url is None:
            raise ParamsError(f"'task' {task} has no image URL under {config.image_key!r}")
        try:
            return Pipeline(models, self.settings, self.images).load_image(image_url, connection.url, key, task)
        except ImageError as e:
            raise ParamsError(f"'task' {task}: {e}") from None


def _scaled_clicks(query, width: int, height: int):
    """A ClickQuery with pixel points -> percent, as pipeline.ClickQuery wants them."""
    points = tuple((100.0 * x / width, 100.0 * y / height) for x, y in query.points)
    for x, y in points:
        if not (0 <= x <= 100 and 0 <= y <= 100):
            raise ParamsError(f"'clicks' must lie inside the {width}x{height} image")
    return ClickQuery(points, query.point_labels, None, query.label)


def register_page(app: Flask, service: TryService, status: Callable[[], dict]) -> None:
    """Add GET /ui/<file>, GET /status and POST /try to `app`, and the recent-requests log /status shows.
    GET / itself is api.create_app's (`page=index_response`)."""
    log = RequestLog()

    @app.before_request
    def _start_clock():
        g.page_started = time.perf_counter()

    @app.after_request
    def _log_request(response):
        started = getattr(g, "page_started", None)
        if started is not None and request.path != "/" and not request.path.startswith(QUIET):
            log.add(request.method, request.path, response.status_code, (time.perf_counter() - started) * 1000)
        return response

    ui = Blueprint("ui", __name__, static_folder=str(UI_DIR), static_url_path="/ui")
    app.register_blueprint(ui)

    @app.get("/status")
    def status_route():
        state = status()
        cache = None
        if state.get("models") == "ready":
            cache = dict(service.loader.get(timeout=0).cache.stats())
            looked = cache["hits"] + cache["misses"]
            cache["hit_rate"] = round(cache["hits"] / looked, 3) if looked else None
        return jsonify(status="UP", **{k: v for k, v in state.items() if k != "embedding_cache"}, cache=cache,
                       queue=service.scheduler.snapshot(), memory=memory(), requests=log.items(), pid=os.getpid(),
                       uptime_seconds=round(time.time() - STARTED, 1))

    @app.post("/try")
    def try_route():
        from api import json_object, request_caller  # the HTTP layer's; imported late: api imports nothing of ours

        if request.mimetype == "multipart/form-data":
            body = request.form.to_dict()
            file = request.files.get("image")
            upload = file.read() if file is not None else None
            if "clicks" in body:
                import orjson

                try:
                    body["clicks"] = orjson.loads(body["clicks"])
                except orjson.JSONDecodeError:
                    raise ParamsError("'clicks' is not valid JSON") from None
        else:
            data = request.get_data(cache=True)
            if not data:
                raise ParamsError("request body is empty: expected a JSON object or multipart/form-data")
            body, upload = json_object(data, "request body"), None
        return jsonify(service.run(body, upload, request_key(), request_caller()))

    @app.get("/try/image/<image_id>")
    def try_image(image_id: str):
        """An image /try holds, as PNG: what the page draws the detections over (the server's orientation)."""
        import io

        from PIL import Image

        image = service.held(image_id)
        out = io.BytesIO()
        Image.fromarray(image).save(out, "PNG", compress_level=1)
        return app.response_class(out.getvalue(), mimetype="image/png",
                                  headers={"Cache-Control": "private, max-age=600"})


def index_response():
    """The page itself (GET / from a browser)."""
    response = send_from_directory(UI_DIR, "index.html", max_age=0)
    response.headers["Vary"] = "Accept"
    response.headers["Content-Security-Policy"] = ("default-src 'self'; img-src 'self' data: blob:; "
                                                   "style-src 'self'; script-src 'self'; connect-src 'self'")
    return response
