"""A real Label Studio and our service, both on 127.0.0.1, for the end-to-end tests.

Used by tests/test_label_studio.py (through the API) and tests/test_browser.py (through the labeling UI): each
names this module in `pytest_plugins`, so the session fixtures below are shared and Label Studio starts once.

- Label Studio (`LS_VERSION`) and moto's S3-compatible server (`MOTO_VERSION`) live in their own virtualenv,
  cached between runs on this machine (`~/.cache/grounded-sam/ls-venv-<LS version>-moto-<moto version>`, or
  `$GROUNDED_SAM_LS_VENV`), installed with `-c tests/label-studio-constraints.txt` (every dependency pinned;
  `make constraints-label-studio` refreshes it) and a stamp file holding that file's SHA-256, written only after
  a complete install: a machine without the virtualenv, or with one built from other constraints, builds it afresh
  (about 1.2 GB, a few minutes from PyPI).
- It runs with a temporary data dir, a legacy token, loopback backends allowed and no outbound calls (see
  `label_studio_env`): `LABEL_STUDIO_USER_TOKEN` becomes the legacy token, `ML_BLOCK_LOCAL_IP=false` and
  `SSRF_PROTECTION_ENABLED=false` let it connect a backend on 127.0.0.1, and `--internal-host 127.0.0.1` keeps it
  off other interfaces (it binds 0.0.0.0 by default, and a busy port silently becomes the next one).
- Our service runs as a user runs it, `gunicorn _wsgi:app` (gunicorn.conf.py; HOST/PORT from the environment),
  with the session's small random-weight checkpoints passed through the documented variables.
- The tests marked `label_studio` run last, together (see pytest_collection_modifyitems).
- Every process starts in its own process group and is stopped by that group's id, also when a test fails;
  each stop checks that its port is closed. Logs go to artifacts/logs/, and a failing test gets their tails.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import mimetypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import requests
from conftest import metric_samples
from model_factory import make_image
from servers import LoopbackServer
from test_e2e_gunicorn import encode, free_port
from test_labeling import GUIDE_CONFIG

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
LOGS = ARTIFACTS / "logs"

LS_VERSION = "1.23.2"
MOTO_VERSION = "5.2.5"  # moto's standalone S3-compatible server, installed beside Label Studio (cloud storage tests)
LS_CONSTRAINTS = ROOT / "tests" / "label-studio-constraints.txt"  # `make constraints-label-studio` writes it
LS_VENV = Path(os.environ.get("GROUNDED_SAM_LS_VENV")
               or Path.home() / ".cache" / "grounded-sam" / f"ls-venv-{LS_VERSION}-moto-{MOTO_VERSION}")
LS_STAMP = LS_VENV / f".installed-label-studio-{LS_VERSION}"
LS_USER, LS_PASSWORD = "ci@example.com", "ci-password-123"
# LABEL_STUDIO_USER_TOKEN (any string over 5 characters), new each run: a Label Studio that knows it is this run's.
LS_TOKEN = f"grounded-sam-ci-{secrets.token_hex(8)}"
MODEL_VERSION = "groundingdino_tiny+mobile_sam"  # what our /setup answers with the generated checkpoints
LABELS = {"cats", "house"}
FROM_NAMES = {"rectanglelabels": "label", "brushlabels": "label2"}  # GUIDE_CONFIG's controls
LS_START_TIMEOUT = 300  # a fresh data dir runs all migrations: 55-120 s on a busy 2-core machine
MODELS_TIMEOUT = 300

_live: list[Process] = []  # started and not yet stopped, for log tails on failure


# --------------------------------------------------------------------------- processes and ports


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True while something accepts TCP connections on host:port."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def assert_port_closed(port: int, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while port_open(port):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: port {port} still open after stopping it")
        time.sleep(0.2)


class Process:
    """A child process in its own session (process group), its output in a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], port: int, cwd: Path = ROOT):
        LOGS.mkdir(parents=True, exist_ok=True)
        self.name, self.port = name, port
        self.log_path = LOGS / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        _live.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError as e:
            return f"(log unreadable: {e})"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_http(self, url: str, timeout: float, ok=lambda r: r.status_code == 200) -> requests.Response:
        """Poll `url` until `ok(response)`; fail with the log's tail if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.proc.returncode} before {url} answered:\n{self.tail()}")
            try:
                response = requests.get(url, timeout=2)
                if ok(response):
                    return response
                last = f"{response.status_code} {response.text[:300]}"
            except requests.RequestException as e:
                last = type(e).__name__
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name}: {url} not ready after {timeout:.0f} s (last: {last}):\n{self.tail()}")
            time.sleep(0.3)

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM to the process group, SIGKILL after `timeout`; then the port must be closed."""
        if self in _live:
            _live.remove(self)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        # Children that outlived the leader (none expected) go too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()
        assert_port_closed(self.port, self.name)


def pytest_collection_modifyitems(session, config, items):
    """Run the Label Studio tests last and together, so the stack they share is up only while they run."""
    items.sort(key=lambda item: item.get_closest_marker("label_studio") is not None)  # stable: order otherwise kept


def stop_all(processes: list[Process | None]) -> None:
    """Stop each process (all of them, even when one fails to stop); then raise the first failure."""
    errors = []
    for process in processes:
        if process is None:
            continue
        try:
            process.stop()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the others are stopped
            errors.append(e)
    if errors:
        raise errors[0]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test's report carries the tails of the running services' logs."""
    report = yield
    if report.failed and _live:
        for process in list(_live):
            report.sections.append((f"{process.name} log (tail, {process.log_path})", process.tail()))
    return report


# --------------------------------------------------------------------------- Label Studio install


def ls_stamp_text(constraints: Path = LS_CONSTRAINTS) -> str:
    """What the stamp of a complete install says: the version and the SHA-256 of the constraints it was built with."""
    digest = hashlib.sha256(constraints.read_bytes()).hexdigest()
    return f"label-studio=={LS_VERSION}\nmoto[server]=={MOTO_VERSION}\nconstraints {constraints.name} sha256 {digest}\n"


def ls_install_commands(python: str, venv: Path = LS_VENV, constraints: Path = LS_CONSTRAINTS) -> list[list[str]]:
    """The commands that build the Label Studio virtualenv: every package at its version in `constraints`."""
    return [[python, "-m", "venv", str(venv)],
            [str(venv / "bin" / "pip"), "install", "--disable-pip-version-check", "--progress-bar", "off",
             "-c", str(constraints), f"label-studio=={LS_VERSION}", f"moto[server]=={MOTO_VERSION}"]]


def ls_installed(venv: Path = LS_VENV, stamp: Path = LS_STAMP, constraints: Path = LS_CONSTRAINTS) -> bool:
    """True when `venv` holds a complete install made with the current constraints file."""
    try:
        return (venv / "bin" / "label-studio").is_file() and stamp.read_text() == ls_stamp_text(constraints)
    except OSError:
        return False


def ensure_label_studio() -> Path:
    """The `label-studio` executable of the cached virtualenv, built first if missing, incomplete or built from
    other constraints than tests/label-studio-constraints.txt.

    A file lock keeps two test runs on one machine from building it at once; the stamp is written last, so an
    interrupted install is rebuilt from scratch next time.
    """
    executable = LS_VENV / "bin" / "label-studio"
    if ls_installed():
        return executable
    LS_VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(LS_VENV.parent / f"{LS_VENV.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ls_installed():
            return executable
        shutil.rmtree(LS_VENV, ignore_errors=True)
        LOGS.mkdir(parents=True, exist_ok=True)
        log_path = LOGS / "label-studio-install.log"
        python = shutil.which("python3.11") or sys.executable
        with open(log_path, "wb") as log:
            for args in ls_install_commands(python):
                result = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, timeout=1200)
                if result.returncode != 0:
                    tail = log_path.read_text(errors="replace")[-3000:]
                    pytest.fail(f"installing Label Studio {LS_VERSION} failed ({' '.join(args[:3])}):\n{tail}")
        LS_STAMP.write_text(ls_stamp_text())
    return executable


# --------------------------------------------------------------------------- Label Studio


@dataclass
class LabelStudio:
    """A running Label Studio and an authenticated API session (legacy token unless switched)."""

    url: str
    port: int
    process: Process
    data_dir: Path
    session: requests.Session = field(default_factory=requests.Session)

    def use_legacy_token(self, token: str = LS_TOKEN) -> None:
        self.session.headers["Authorization"] = f"Token {token}"

    def use_bearer(self, access: str) -> None:
        self.session.headers["Authorization"] = f"Bearer {access}"

    def api(self, method: str, path: str, expect: tuple[int, ...] = (200, 201, 204), timeout: float = 120,
            **kwargs) -> requests.Response:
        """One API call; fails the test with the answer's body unless its status is in `expect`."""
        response = self.session.request(method, self.url + path, timeout=timeout, **kwargs)
        if response.status_code not in expect:
            pytest.fail(f"{method} {path} -> {response.status_code} (expected {expect}): {response.text[:2000]}")
        return response

    def json(self, method: str, path: str, **kwargs):
        response = self.api(method, path, **kwargs)
        return response.json() if response.content else None

    # Helpers for the calls both test modules make.
    def create_project(self, title: str, label_config: str = GUIDE_CONFIG) -> int:
        return self.json("POST", "/api/projects/", json={"title": title, "label_config": label_config})["id"]

    def upload(self, project: int, name: str, data: bytes, content_type: str) -> None:
        self.api("POST", f"/api/projects/{project}/import", files={"file": (name, data, content_type)})

    def import_urls(self, project: int, urls: list[str]) -> None:
        self.api("POST", f"/api/projects/{project}/import", json=[{"image": url} for url in urls])

    def tasks(self, project: int) -> list[dict]:
        """The project's tasks, oldest first. (Never GET /api/tasks/{id}: LS predicts on that when a task has no
        prediction, which would store predictions behind the tests' backs.)"""
        body = self.json("GET", "/api/tasks/", params={"project": project, "page_size": 100})
        tasks = body["tasks"] if isinstance(body, dict) else body
        return sorted(tasks, key=lambda t: t["id"])

    def connect_backend(self, project: int, url: str, extra_params, title: str = "Grounded SAM") -> dict:
        return self.json("POST", "/api/ml/", json={"url": url, "project": project, "is_interactive": True,
                                                   "title": title, "extra_params": extra_params})

    def predictions(self, task: int) -> list[dict]:
        return self.json("GET", "/api/predictions/", params={"task": task})

    def delete_predictions(self, tasks: list[int]) -> int:
        count = 0
        for task in tasks:
            for prediction in self.predictions(task):
                self.api("DELETE", f"/api/predictions/{prediction['id']}/")
                count += 1
        return count

    def retrieve_predictions(self, project: int) -> dict:
        """Data Manager → Actions → Retrieve Predictions over all tasks (LS sends `context: null`)."""
        return self.json("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project},
                         json={"selectedItems": {"all": True, "excluded": []}})

    def interactive(self, ml_backend: int, task: int, context: dict) -> tuple[dict, float]:
        """POST /api/ml/{id}/interactive-annotating as the UI sends it; (answer, seconds)."""
        started = time.perf_counter()
        answer = self.json("POST", f"/api/ml/{ml_backend}/interactive-annotating",
                           json={"task": task, "context": context})
        return answer, time.perf_counter() - started


def label_studio_env(data_dir: Path, s3_endpoint: str = "") -> dict[str, str]:
    """Environment for `label-studio start`: the protocol doc's recipe, and nothing of ours leaking in.
    s3_endpoint: where its S3 storages go (`S3_ENDPOINT`, the operator's setting that a loopback endpoint needs)."""
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("LABEL_STUDIO_", "HEARTEX_", "DJANGO_", "GROUNDINGDINO_", "MOBILESAM_", "SAM_"))
            and k not in {"HOST", "PORT", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "DATA_DIR"}}
    keep["PATH"] = f"{LS_VENV / 'bin'}{os.pathsep}{keep.get('PATH', '')}"
    return {
        **keep,
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),  # else importing LS creates ~/.local/share/label-studio
        "LABEL_STUDIO_USERNAME": LS_USER,
        "LABEL_STUDIO_PASSWORD": LS_PASSWORD,
        "LABEL_STUDIO_USER_TOKEN": LS_TOKEN,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "ML_BLOCK_LOCAL_IP": "false",  # both needed to connect a backend on 127.0.0.1
        "SSRF_PROTECTION_ENABLED": "false",
        "LATEST_VERSION_CHECK": "false",  # no outbound calls
        "COLLECT_ANALYTICS": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        **({"S3_ENDPOINT": s3_endpoint} if s3_endpoint else {}),
    }


def start_label_studio(data_dir: Path, s3_endpoint: str = "") -> LabelStudio:
    """Start Label Studio (installing it first if needed); call `wait_label_studio` before using it."""
    executable = ensure_label_studio()
    port = free_port()
    process = Process("label-studio", [str(executable), "start", "--no-browser", "--data-dir", str(data_dir),
                                       "--internal-host", "127.0.0.1", "-p", str(port)],
                      label_studio_env(data_dir, s3_endpoint), port, cwd=data_dir)
    return LabelStudio(url=f"http://127.0.0.1:{port}", port=port, process=process, data_dir=data_dir)


def wait_label_studio(ls: LabelStudio) -> None:
    ls.process.wait_http(ls.url + "/health/", LS_START_TIMEOUT)
    # LS moves to the next port when its port is taken, so another Label Studio may answer on ours: only the one we
    # started knows this run's token (asked of the process itself, not read from its log).
    ls.use_legacy_token()
    me = ls.json("GET", "/api/current-user/whoami", expect=(200, 401))
    assert me.get("email") == LS_USER, f"the Label Studio on port {ls.port} is not the one this run started: {me}"


# --------------------------------------------------------------------------- an S3-compatible storage


class CheckedServer(LoopbackServer):
    """A loopback server whose port must be closed once it is closed."""

    def close(self) -> None:
        super().close()
        assert_port_closed(self.port, type(self).__name__)


class RecordingProxy(CheckedServer):
    """Forwards every request to `upstream` (moto's S3 server) as it came, Host header included (presigned URLs are
    signed for the proxy's address), and records (method, path, headers) of each: the storage host's view."""

    def __init__(self, upstream_port: int):
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self):
                server.requests.append((self.command, self.path, dict(self.headers)))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                try:
                    upstream.request(self.command, self.path, body or None, dict(self.headers))
                    answer = upstream.getresponse()
                    data = answer.read()
                finally:
                    upstream.close()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

            def log_message(self, *args):
                pass

        super().__init__(Handler)
        self.start()


@dataclass
class S3:
    """moto's standalone S3 server and the recording proxy in front of it: `url` is the endpoint Label Studio uses
    (S3_ENDPOINT), so its presigned URLs point at the proxy too."""

    process: Process
    proxy: RecordingProxy

    @property
    def url(self) -> str:
        return self.proxy.url

    def put(self, path: str, data: bytes = b"") -> None:
        """Create a bucket (`/bucket`) or an object (`/bucket/key`), straight on moto (which takes unsigned
        requests)."""
        response = requests.put(f"http://127.0.0.1:{self.process.port}{path}", data=data, timeout=30)
        assert response.status_code == 200, (path, response.status_code, response.text[:300])


def start_s3() -> S3:
    """moto's S3 server from the end-to-end virtualenv, on 127.0.0.1, behind a recording proxy."""
    port = free_port()
    moto = Process("moto-s3", [str(LS_VENV / "bin" / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                   {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, port)
    moto.wait_http(f"http://127.0.0.1:{port}/moto-api/", 60)
    return S3(moto, RecordingProxy(port))


# --------------------------------------------------------------------------- our service


@dataclass
class Backend:
    url: str
    port: int
    process: Process

    def health(self) -> dict:
        return requests.get(self.url + "/health", timeout=2).json()

    def setups(self) -> float:
        """How many /setup calls the service answered (its /metrics)."""
        text = requests.get(self.url + "/metrics", timeout=2).text
        return metric_samples(text).get("grounded_sam_setups_total", 0)


def start_backend(name: str, files: tuple[Path, Path, Path], mobile_sam: Path, ls_url: str, api_key: str,
                  data_dir: Path, **extra_env: str) -> Backend:
    """Start `gunicorn _wsgi:app` (what `make serve` runs) on 127.0.0.1 with the generated checkpoints; call
    `wait_models` before predicting."""
    config, checkpoint, text_encoder = files
    port = free_port()
    env = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "WORKERS": "1",  # /metrics counts per worker: one worker sees every /setup
        "GROUNDINGDINO_CONFIG": str(config),
        "GROUNDINGDINO_CHECKPOINT": str(checkpoint),
        "GROUNDINGDINO_TEXT_ENCODER": str(text_encoder),
        "USE_MOBILE_SAM": "true",
        "MOBILESAM_CHECKPOINT": str(mobile_sam),
        "LABEL_STUDIO_URL": ls_url,
        "LABEL_STUDIO_API_KEY": api_key,
        "DATA_DIR": str(data_dir),
        "MAX_DETECTIONS": "5",
        "DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        **extra_env,
    }
    gunicorn = Path(sys.executable).parent / "gunicorn"
    process = Process(name, [str(gunicorn), "_wsgi:app"], env, port)
    return Backend(url=f"http://127.0.0.1:{port}", port=port, process=process)


def wait_models(backend: Backend) -> None:
    health = backend.process.wait_http(
        backend.url + "/health", MODELS_TIMEOUT,
        ok=lambda r: r.status_code == 200 and r.json().get("models") in ("ready", "failed"))
    assert health.json()["models"] == "ready", f"{health.json()}\n{backend.process.tail()}"


# --------------------------------------------------------------------------- images


class StaticServer(CheckedServer):
    """Serves `files` (path -> bytes) on 127.0.0.1 with `Access-Control-Allow-Origin: *` (the labeling UI loads
    URL images with `crossorigin`). Records (path, user agent) of every GET."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.requests = files, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _head(self) -> bytes | None:
                body = server.files.get(self.path.split("?")[0])
                self.send_response(200 if body is not None else 404)
                self.send_header("Access-Control-Allow-Origin", "*")
                self.send_header("Content-Type", mimetypes.guess_type(self.path)[0] or "application/octet-stream")
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                return body

            def do_HEAD(self):
                self._head()

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("User-Agent", "")))
                self.wfile.write(self._head() or b"")

            def log_message(self, *args):
                pass

        super().__init__(Handler)
        self.start()


# Displayed sizes differ; the JPEG is stored 40x240 with EXIF orientation 6 and displayed 240x40. Wide pictures
# keep Grounding DINO cheap on a CPU (it resizes to short side 800, long side at most 1333).
WIDE_PNG = ("wide.png", encode(make_image(320, 40, seed=7), "PNG"), "image/png", (320, 40))
ROTATED_JPEG = ("rotated.jpg", encode(make_image(40, 240, seed=8), "JPEG", orientation=6), "image/jpeg", (240, 40))
URL_PNG = ("/images/remote.png", encode(make_image(280, 40, seed=9), "PNG"), "image/png", (280, 40))


def region_problems(regions: list[dict], size: tuple[int, int]) -> list[str]:
    """What is wrong with a prediction's regions for an image displayed at `size` (width, height); [] if nothing.

    Each region: a control of GUIDE_CONFIG for its type, a label of the config, the image's displayed size, and
    for brushes an RLE that decodes to a mask of exactly that size with some pixels set."""
    import numpy as np
    from label_studio_sdk.converter import brush

    width, height = size
    problems = []
    for i, region in enumerate(regions):
        kind = region.get("type")
        if kind not in FROM_NAMES:
            problems.append(f"region {i}: type {kind!r}")
            continue
        if region.get("from_name") != FROM_NAMES[kind] or region.get("to_name") != "image":
            problems.append(f"region {i}: {region.get('from_name')!r}->{region.get('to_name')!r} for {kind}")
        labels = region["value"].get(kind)
        if not labels or not set(labels) <= LABELS:
            problems.append(f"region {i}: labels {labels!r}")
        if (region.get("original_width"), region.get("original_height")) != (width, height):
            problems.append(f"region {i}: original size {region.get('original_width')}x"
                            f"{region.get('original_height')}, displayed {width}x{height}")
        if kind == "brushlabels":
            decoded = np.asarray(brush.decode_rle(region["value"]["rle"]))
            if decoded.size != width * height * 4:
                problems.append(f"region {i}: RLE decodes to {decoded.size} values, not {width}x{height}x4")
            elif not decoded.reshape(height, width, 4)[:, :, 3].any():
                problems.append(f"region {i}: empty mask")
        else:
            v = region["value"]
            if not (0 <= v["x"] <= 100 and 0 <= v["y"] <= 100 and 0 < v["width"] <= 100 and 0 < v["height"] <= 100):
                problems.append(f"region {i}: box {v}")
    return problems


def labels_of(regions: list[dict]) -> set[str]:
    return {label for r in regions for label in r["value"].get(r["type"], [])}


def textarea_context(prompt: str) -> dict:
    """The context the labeling UI sends when Auto-Annotation is on and the prompt is added (captured from 1.23.2)."""
    return {"result": [{"value": {"text": [prompt]}, "id": "VliPI9QKLV", "from_name": "prompt", "to_name": "image",
                        "type": "textarea", "origin": "manual"}]}


def write_artifact(name: str, data) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    path.write_text(json.dumps(data, indent=2) if not isinstance(data, str) else data)
    return path


# --------------------------------------------------------------------------- fixtures (session: shared by both modules)


@dataclass
class Stack:
    label_studio: LabelStudio
    backend: Backend
    s3: S3
    startup_s: float


@pytest.fixture(scope="session")
def e2e_stack(request, tmp_path_factory) -> Stack:
    """Label Studio (its S3 storages on moto's server) and our service (its URL and legacy token), started side by
    side: checkpoints are generated and models load while Label Studio runs its migrations. Stopped at the end of
    the session, ports checked closed."""
    started = time.perf_counter()
    ensure_label_studio()
    s3 = start_s3()
    ls = backend = None
    try:
        ls = start_label_studio(tmp_path_factory.mktemp("label-studio-data"), s3.url)
        files = request.getfixturevalue("groundingdino_files")
        mobile_sam = request.getfixturevalue("mobile_sam_checkpoint")
        backend = start_backend("grounded-sam", files, mobile_sam, ls.url, LS_TOKEN,
                                tmp_path_factory.mktemp("backend-data"))
        wait_label_studio(ls)
        wait_models(backend)
        yield Stack(ls, backend, s3, round(time.perf_counter() - started, 1))
    finally:
        stop_all([backend.process if backend else None, ls.process if ls else None, s3.process])
        s3.proxy.close()


@pytest.fixture(scope="session")
def label_studio(e2e_stack) -> LabelStudio:
    return e2e_stack.label_studio


@pytest.fixture(scope="session")
def backend(e2e_stack) -> Backend:
    """Our service, models loaded, with Label Studio's URL and legacy token."""
    return e2e_stack.backend


@pytest.fixture(scope="session")
def image_server() -> StaticServer:
    server = StaticServer({URL_PNG[0]: URL_PNG[1]})
    try:
        yield server
    finally:
        server.close()
