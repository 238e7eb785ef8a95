"""The real image: the repo's Dockerfile built and run the way docs/docker.md tells users, against a real engine.

Two things a test machine can't have are bridged, and nothing else:
- no base image can be pulled (no Docker Hub): a stand-in base is built here from Debian's own packages
  (`debootstrap` bookworm, Debian's Python 3.11 and pip; tests/docker/base.Dockerfile) and passed as the
  Dockerfile's BASE_IMAGE build argument. This machine's package index settings and CA bundle go into the stand-in
  only (a `file://` index of pip's config is served over HTTP on 127.0.0.1 while images build: `PipMirror`).
- no model can be downloaded: the image is built with `WEIGHTS=""` (no model file baked in) and run with the
  generated random-weight test checkpoints mounted read-only (tests/docker/compose.test.yml).

The engine: Debian's `docker.io` is installed when `dockerd` is missing; a daemon this module starts has its own
socket and exec root and a data root kept between runs (`~/.cache/grounded-sam/docker`, so Docker's layer cache
makes the second run cheap), and is stopped by its PID at the end. The Compose CLI is the repo's own
(`docker-compose` of requirements-dev.txt, installed as the `docker compose` plugin in a private DOCKER_CONFIG).
The module skips, saying why, only when the engine can't start. `make test-docker` runs it alone; the
Label Studio part (`docker_ls`) also alone with `make test-docker-ls`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
import requests
from label_studio_sdk.converter import brush
from model_factory import make_image
from test_e2e_gunicorn import assert_cats_regions, encode, free_port

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent / "docker"
ARTIFACTS = ROOT / "artifacts"
CONNECT_PAGE = (ROOT / "docs" / "connect.md").read_text(encoding="utf-8")

PROJECT = "grounded-sam-test"  # the compose project (containers, network and volumes are named after it)
COMPOSE_FILES = ["-f", "docker-compose.yml", "-f", "docker-compose.cpu.yml", "-f", "tests/docker/compose.test.yml"]
SERVICE = "grounded-sam"
LS_SERVICE = "label-studio"
BACKEND_IMAGE = "grounded-sam-backend:latest"  # docker-compose.yml's image name
DATA_ROOT = Path(os.environ.get("GROUNDED_SAM_DOCKER_ROOT") or Path.home() / ".cache" / "grounded-sam" / "docker")
MIRROR_PORT = 39117  # fixed: it is written into the stand-in base, whose identity keys the whole layer cache
DEBOOTSTRAP = ["debootstrap", "--variant=minbase", "--include=python3,python3-pip,ca-certificates", "bookworm"]
DEBIAN_MIRROR = "http://deb.debian.org/debian"
MODEL_VERSION = "groundingdino_tiny+mobile_sam"
SECRET = "setup-token-must-not-be-logged-4f9a"  # the access token sent to /setup
HEALTH_TIMEOUT = 240  # HEALTHCHECK: first probe after 30 s (interval), retries 3
STOP_TIMEOUT = 10  # Compose's default stop timeout (docker-compose.yml sets no stop_grace_period)

timings: dict = {}


def report(request, line: str) -> None:
    """A line on pytest's terminal (not captured), for the figures the issue asks to print."""
    timings.setdefault("lines", []).append(line)
    write_artifact("docker-timings.json", json.dumps(timings, indent=2))
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        if reporter is not None:
            reporter.write_line(f"[docker] {line}")
        else:
            print(f"[docker] {line}", flush=True)


def sudo() -> list[str]:
    return [] if os.geteuid() == 0 else ["sudo", "-n"]


def run(args: list[str], env: dict[str, str] | None = None, timeout: float = 600, check: bool = True,
        cwd: Path = ROOT, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(args)} -> {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def apt_install(*packages: str) -> None:
    """Debian's packages, as .ci/run installs chromium (sudo unless root)."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for args in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *packages]):
        result = subprocess.run(sudo() + args, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            pytest.skip(f"cannot install {' '.join(packages)} ({' '.join(args)}): {result.stderr[-1500:]}")


# --------------------------------------------------------------------------- the engine


class Engine:
    """A Docker daemon to talk to: one that already answers, or one started here (stopped by `stop`)."""

    def __init__(self, config_dir: Path):
        self.config_dir = config_dir  # DOCKER_CONFIG: the repo's compose as the `docker compose` plugin
        self.process: subprocess.Popen | None = None
        self.lock = None
        self.run_dir: Path | None = None
        self.host = os.environ.get("DOCKER_HOST", "")

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_", "GS_TEST_"))}
        env["DOCKER_CONFIG"] = str(self.config_dir)
        if self.host:
            env["DOCKER_HOST"] = self.host
        return env

    def answers(self) -> bool:
        try:
            return subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], env=self.env,
                                  capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def start(self) -> None:
        """dockerd with its own socket and exec root, and the persistent data root (one daemon at a time on it)."""
        DATA_ROOT.mkdir(parents=True, exist_ok=True)
        self.lock = open(DATA_ROOT.parent / "docker.lock", "w")  # noqa: SIM115 - held until stop()
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pytest.skip(f"another test run's dockerd holds {DATA_ROOT}")
        self.made_bridge = not Path("/sys/class/net/docker0").exists()  # dockerd leaves it: removed in stop()
        self.run_dir = Path(tempfile.mkdtemp(prefix="gs-dockerd-"))
        socket_path = self.run_dir / "docker.sock"
        self.log_path = self.run_dir / "dockerd.log"
        log = open(self.log_path, "w")  # noqa: SIM115 - closed below
        self.process = subprocess.Popen(
            sudo() + ["dockerd", "--data-root", str(DATA_ROOT), "--exec-root", str(self.run_dir / "exec"),
                      "--pidfile", str(self.run_dir / "dockerd.pid"), "--host", f"unix://{socket_path}",
                      "--storage-driver", "overlay2"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.host = f"unix://{socket_path}"
        deadline = time.monotonic() + 90
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                self.stop()
                pytest.skip(f"the Docker engine cannot start here (dockerd exited or did not answer):\n{tail}")
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop the daemon started here by its PID (it stops its own containerd), and check nothing is left."""
        if self.process is not None:
            children = self._descendants(self.process.pid)
            if self.process.poll() is None:
                subprocess.run(sudo() + ["kill", "-TERM", str(self.process.pid)], check=False)
                try:
                    self.process.wait(60)
                except subprocess.TimeoutExpired:
                    subprocess.run(sudo() + ["kill", "-KILL", str(self.process.pid)], check=False)
                    self.process.wait(10)
            deadline = time.monotonic() + 20
            while (alive := [pid for pid in children if Path(f"/proc/{pid}").exists()]) and \
                    time.monotonic() < deadline:
                time.sleep(0.2)
            for pid in alive:  # a containerd-shim the daemon did not take down
                subprocess.run(sudo() + ["kill", "-KILL", str(pid)], check=False)
            self.process = None
            assert not alive, f"processes left by dockerd: {alive}"
        if self.lock is not None:
            self.lock.close()
            self.lock = None
        if self.run_dir is not None:
            # dockerd leaves its network namespace bind-mounted in the exec root (exec/netns/default).
            with open("/proc/mounts", encoding="utf-8") as mounts:
                targets = [line.split()[1] for line in mounts if line.split()[1].startswith(f"{self.run_dir}/")]
            for target in sorted(targets, reverse=True):
                subprocess.run(sudo() + ["umount", target], check=False)
            subprocess.run(sudo() + ["rm", "-rf", str(self.run_dir)], check=False)
            self.run_dir = None
            if self.made_bridge and Path("/sys/class/net/docker0").exists():
                subprocess.run(sudo() + ["ip", "link", "delete", "docker0"], check=False)

    @staticmethod
    def _descendants(pid: int) -> list[int]:
        found, queue = [], [pid]
        while queue:
            parent = queue.pop()
            with contextlib.suppress(OSError):
                for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
                    found.append(int(child))
                    queue.append(int(child))
        return found


@pytest.fixture(scope="module")
def engine(request, tmp_path_factory):
    if shutil.which("dockerd") is None or shutil.which("docker") is None:
        if not (shutil.which("docker") and Engine(tmp_path_factory.mktemp("probe")).answers()):
            started = time.perf_counter()
            apt_install("docker.io")
            report(request, f"installed Debian's docker.io in {time.perf_counter() - started:.0f} s")
    compose = Path(sys.executable).parent / "docker-compose"
    if not compose.exists():
        pytest.fail(f"{compose} is missing: `make install` installs it (requirements-dev.txt)")
    config_dir = tmp_path_factory.mktemp("docker-config")
    (config_dir / "cli-plugins").mkdir()
    (config_dir / "cli-plugins" / "docker-compose").symlink_to(compose)
    engine = Engine(config_dir)
    started = time.perf_counter()
    if not engine.answers():
        engine.host = ""
        if os.environ.get("DOCKER_HOST"):
            pytest.skip(f"DOCKER_HOST={os.environ['DOCKER_HOST']} does not answer")
        engine.start()
        report(request, f"dockerd started (PID {engine.process.pid}, data root {DATA_ROOT}) in "
                        f"{time.perf_counter() - started:.1f} s")
    version = run(["docker", "compose", "version"], env=engine.env).stdout.strip()
    server = run(["docker", "version", "--format", "{{.Server.Version}}"], env=engine.env).stdout.strip()
    report(request, f"engine {server}, {version}")
    compose_down(engine)  # what a killed earlier run may have left
    try:
        yield engine
    finally:
        try:
            compose_down(engine)
        finally:
            engine.stop()


def compose(engine: Engine, *args: str, env: dict[str, str] | None = None, timeout: float = 900,
            check: bool = True) -> subprocess.CompletedProcess:
    return run(["docker", "compose", "-p", PROJECT, *COMPOSE_FILES, *args], env={**engine.env, **(env or {})},
               timeout=timeout, check=check)


def compose_env(**extra: str) -> dict[str, str]:
    """Variables the override file needs; values that only matter for `up` may be dummies for `down`."""
    return {"GS_TEST_BASE_IMAGE": "none", "GS_TEST_PORT": "1", "GS_TEST_FILES": "/nonexistent", **extra}


def compose_down(engine: Engine) -> None:
    """Containers, the network and the volumes of the test project (never the images: they are the cache)."""
    compose(engine, "--profile", "with-label-studio", "down", "--volumes", "--remove-orphans", "--timeout", "20",
            env=compose_env(), check=False)


# --------------------------------------------------------------------------- this machine's package index


class PipMirror:
    """This machine's local package indexes (the `file://` URLs and paths in pip's configuration) served over HTTP
    on 127.0.0.1 while images build, and the pip.conf that points a build on the host network at them."""

    def __init__(self):
        settings = self.host_settings()
        self.dirs: dict[str, Path] = {}
        lines = ["[global]", "cert = /etc/ssl/certs/ca-certificates.crt"]
        if "default-timeout" in settings:
            lines.append(f"default-timeout = {settings['default-timeout']}")
        for key in ("index-url", "extra-index-url", "find-links"):
            if key in settings:
                lines.append(f"{key} = {' '.join(self.served(value) for value in settings[key].split())}")
        self.pip_conf = "\n".join(lines) + "\n"
        self.ca_bundle = Path(settings.get("cert", "/etc/ssl/certs/ca-certificates.crt")).read_bytes()
        self.httpd = None

    @staticmethod
    def host_settings() -> dict[str, str]:
        """pip's own view of its configuration (`pip config list`): environment first, then the files."""
        out = run([sys.executable, "-m", "pip", "config", "list"]).stdout
        found: dict[str, str] = {}
        for scope in (":env:", None):
            for line in out.splitlines():
                match = re.match(r"^([^.]*)\.([\w-]+)='(.*)'$", line)
                if match and (match.group(1) == ":env:") == (scope == ":env:"):
                    found.setdefault(match.group(2), match.group(3))
        return found

    def served(self, location: str) -> str:
        """The URL a build on the host network reaches `location` at (local ones through this server)."""
        if location.startswith("file://"):
            path = Path(unquote(urlsplit(location).path))
        elif location.startswith("/"):
            path = Path(location)
        else:
            return location
        # An index's pages link to files next to it (../../files/...): serve the index's parent.
        top, suffix = (path.parent, f"{path.name}/") if path.name == "simple" else (path, "")
        name = f"m{len(self.dirs)}"
        self.dirs[name] = top
        return f"http://127.0.0.1:{MIRROR_PORT}/{name}/{suffix}"

    def __enter__(self):
        dirs = self.dirs

        class Handler(SimpleHTTPRequestHandler):
            def translate_path(self, path):
                parts = urlsplit(path).path.lstrip("/").split("/", 1)
                top = dirs.get(parts[0])
                if top is None:
                    return "/nonexistent"
                rel = Path(unquote(parts[1] if len(parts) > 1 else ""))
                target = (top / rel).resolve()
                return str(target) if target.is_relative_to(top.resolve()) else "/nonexistent"

            def log_message(self, *args):
                pass

        try:
            self.httpd = ThreadingHTTPServer(("127.0.0.1", MIRROR_PORT), Handler)
        except OSError as e:
            pytest.fail(f"127.0.0.1:{MIRROR_PORT} (the package mirror for image builds) is taken: {e}")
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def mirror():
    return PipMirror()


# --------------------------------------------------------------------------- the stand-in base


@pytest.fixture(scope="module")
def base_image(request, engine, mirror, tmp_path_factory) -> str:
    """The stand-in base (tests/docker/base.Dockerfile), built once per machine: its tag is a digest of everything
    that goes into it, so the real build's layer cache holds as long as none of that changes."""
    recipe = (HERE / "base.Dockerfile").read_bytes()
    digest = hashlib.sha256(b"\0".join([recipe, " ".join(DEBOOTSTRAP).encode(), mirror.pip_conf.encode(),
                                        mirror.ca_bundle])).hexdigest()[:16]
    tag = f"grounded-sam-test-base:{digest}"
    if run(["docker", "image", "inspect", tag], env=engine.env, check=False).returncode == 0:
        report(request, f"stand-in base {tag}: cached")
        return tag
    started = time.perf_counter()
    if shutil.which("debootstrap") is None:
        apt_install("debootstrap")
    context = tmp_path_factory.mktemp("base-context")
    rootfs = context / "rootfs"
    try:
        run(sudo() + DEBOOTSTRAP + [str(rootfs), DEBIAN_MIRROR], timeout=900)
        # As the official slim image: no apt lists or package cache.
        run(sudo() + ["sh", "-c", f"rm -rf {rootfs}/var/lib/apt/lists/* {rootfs}/var/cache/apt/*"])
        run(sudo() + ["tar", "-C", str(rootfs), "--numeric-owner", "--exclude=./dev/*", "--exclude=./proc/*",
                      "--exclude=./sys/*", "-cf", str(context / "rootfs.tar"), "."], timeout=600)
    finally:
        run(sudo() + ["rm", "-rf", str(rootfs)], check=False)
    shutil.copy(HERE / "base.Dockerfile", context / "Dockerfile")
    (context / "pip.conf").write_text(mirror.pip_conf, encoding="utf-8")
    (context / "ca-certificates.crt").write_bytes(mirror.ca_bundle)
    run(["docker", "build", "--network", "none", "-t", tag, str(context)], env={**engine.env, "DOCKER_BUILDKIT": "0"},
        timeout=900)
    (context / "rootfs.tar").unlink()
    if engine.process is not None:  # older stand-ins (another recipe or CA bundle) in the daemon started here
        old = run(["docker", "image", "ls", "--format", "{{.Repository}}:{{.Tag}}", "grounded-sam-test-base"],
                  env=engine.env).stdout.split()
        for stale in set(old) - {tag}:
            run(["docker", "image", "rm", stale], env=engine.env, check=False)
    timings["base_build_s"] = time.perf_counter() - started
    report(request, f"stand-in base {tag}: built in {timings['base_build_s']:.0f} s")
    return tag


# --------------------------------------------------------------------------- the real image


def prune(engine: Engine) -> None:
    """In the daemon started here: drop the images a rebuild left untagged (the classic builder's cache of an older
    requirements set is another 6.8 GB each time), keeping the current chains, i.e. the layer cache."""
    if engine.process is not None:
        run(["docker", "image", "prune", "--force"], env=engine.env)


def image_size(engine: Engine, image: str) -> int:
    return int(run(["docker", "image", "inspect", "--format", "{{.Size}}", image], env=engine.env).stdout)


def image_id(engine: Engine, image: str) -> str:
    return run(["docker", "image", "inspect", "--format", "{{.Id}}", image], env=engine.env).stdout.strip()


@pytest.fixture(scope="module")
def backend_image(request, engine, base_image, mirror) -> str:
    """`docker compose build` of the backend with WEIGHTS="" (docs/docker.md: the same build a user runs, here on the
    stand-in base and the host network), and WITH_RAY=true (so it is also a Ray node)."""
    started = time.perf_counter()
    with mirror:
        result = compose(engine, "build", env=compose_env(GS_TEST_BASE_IMAGE=base_image, WEIGHTS="", WITH_RAY="true"),
                         timeout=2400)
    timings["backend_build_s"] = time.perf_counter() - started
    prune(engine)
    timings["backend_image_bytes"] = image_size(engine, BACKEND_IMAGE)
    write_artifact("docker-build.log", result.stdout + result.stderr)
    report(request, f"image {BACKEND_IMAGE}: built in {timings['backend_build_s']:.0f} s, "
                    f"{timings['backend_image_bytes'] / 1e9:.2f} GB")
    return BACKEND_IMAGE


def write_artifact(name: str, text: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / name).write_text(text, encoding="utf-8")


def readme_labeling_config() -> str:
    """The labeling config users paste (docs/connect.md; the README shows the same, test_deploy_consistency.py)."""
    match = re.search(r"(?ms)^#+ Labeling config\n.*?```xml\n(.*?)```", CONNECT_PAGE)
    assert match, "docs/connect.md has no labeling config"
    return match.group(1)


@pytest.fixture(scope="module")
def test_files(groundingdino_files, mobile_sam_checkpoint, tmp_path_factory) -> Path:
    """The generated checkpoints and two images in one directory readable by the container's uid 1000."""
    top = tmp_path_factory.mktemp("docker-files")
    config, checkpoint, text_encoder = groundingdino_files
    (top / "models").mkdir()
    shutil.copy(config, top / "models" / "GroundingDINO_tiny.py")
    shutil.copy(checkpoint, top / "models" / "groundingdino_tiny.pth")
    shutil.copy(mobile_sam_checkpoint, top / "models" / "mobile_sam.pt")
    shutil.copytree(text_encoder, top / "models" / "bert")
    (top / "images").mkdir()
    (top / "images" / "wide.png").write_bytes(encode(make_image(320, 40, seed=7), "PNG"))
    (top / "images" / "rotated.jpg").write_bytes(encode(make_image(40, 240, seed=8), "JPEG", orientation=6))
    for path in [top, *top.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return top


class Stack:
    def __init__(self, engine: Engine, env: dict[str, str], port: int):
        self.engine, self.env, self.port = engine, env, port
        self.url = f"http://127.0.0.1:{port}"

    def compose(self, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        return compose(self.engine, *args, env=self.env, timeout=timeout, check=check)

    def container(self, service: str = SERVICE) -> str:
        return self.compose("ps", "--all", "--quiet", service).stdout.strip()

    def inspect(self, template: str, service: str = SERVICE) -> str:
        return run(["docker", "inspect", "--format", template, self.container(service)],
                   env=self.engine.env).stdout.strip()

    def exec(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.compose("exec", "-T", SERVICE, *args, check=check)

    def logs(self, service: str = SERVICE) -> str:
        result = self.compose("logs", "--no-color", service)
        return result.stdout + result.stderr

    def wait_healthy(self, timeout: float = HEALTH_TIMEOUT) -> float:
        started = time.perf_counter()
        while (status := self.inspect("{{.State.Health.Status}}")) != "healthy":
            if status == "unhealthy" or time.perf_counter() - started > timeout:
                pytest.fail(f"container is {status} after {time.perf_counter() - started:.0f} s:\n"
                            f"{self.inspect('{{json .State.Health}}')}\n{self.logs()[-4000:]}")
            time.sleep(1)
        return time.perf_counter() - started

    def wait_models(self, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            health = requests.get(self.url + "/health", timeout=5).json()
            if health["models"] in ("ready", "failed"):
                return health
            time.sleep(0.5)
        pytest.fail(f"models not loaded in {timeout} s:\n{self.logs()[-4000:]}")


@pytest.fixture(scope="module")
def stack(request, engine, backend_image, base_image, test_files):
    env = compose_env(GS_TEST_BASE_IMAGE=base_image, GS_TEST_PORT=str(free_port()), GS_TEST_FILES=str(test_files),
                      WEIGHTS="", WITH_RAY="true")
    stack = Stack(engine, env, int(env["GS_TEST_PORT"]))
    started = time.perf_counter()
    stack.compose("up", "-d")
    stack.first_up_s = time.perf_counter() - started
    try:
        yield stack
    finally:
        write_artifact("docker-grounded-sam.log", stack.logs())
        compose_down(engine)


# --------------------------------------------------------------------------- checks


def test_empty_weights_bakes_in_no_model_file(engine, backend_image):
    files = run(["docker", "run", "--rm", "--network", "none", backend_image, "find", "/models"],
                env=engine.env).stdout.split()
    assert files == ["/models", "/models/local"]


def test_with_ray_the_image_is_a_ray_node(engine, backend_image):
    """WITH_RAY=true: the `ray` command of docs/ray.md (ray start --head / --address) is in the image."""
    done = run(["docker", "run", "--rm", "--network", "none", backend_image, "ray", "--version"], env=engine.env)
    assert "2.60.0" in done.stdout


def test_1_healthcheck_turns_healthy_and_models_are_ready(request, stack):
    seconds = stack.wait_healthy()
    report(request, f"healthy {seconds:.0f} s after `up -d` returned (up -d took {stack.first_up_s:.1f} s)")
    health = stack.wait_models()
    assert health["status"] == "UP" and health["models"] == "ready", health
    assert health["model_version"] == MODEL_VERSION


def test_2_setup_and_predict_a_text_prompt(stack):
    config = readme_labeling_config()
    setup = requests.post(stack.url + "/setup", timeout=30, json={
        "project": "1.1700000000", "schema": config, "hostname": "http://localhost:8080",
        "access_token": SECRET, "extra_params": None})
    assert setup.status_code == 200 and setup.json() == {"model_version": MODEL_VERSION}, setup.text
    context = {"result": [{"value": {"text": ["shape_cats"]}, "id": "abc", "from_name": "prompt", "to_name": "image",
                           "type": "textarea", "origin": "manual"}]}
    tasks = [{"id": 1, "data": {"image": "/data/local-files/?d=wide.png"}},
             {"id": 2, "data": {"image": "/data/local-files/?d=rotated.jpg"}}]
    response = requests.post(stack.url + "/predict", timeout=300, json={
        "tasks": tasks, "project": "1.1700000000", "label_config": config,
        "params": {"login": None, "password": None, "context": context}})
    assert response.status_code == 200, response.text
    assert_cats_regions(response.json()["results"], [(320, 40), (240, 40)], MODEL_VERSION)


def test_3_runs_as_uid_1000_and_writes_only_data_and_local_models(stack):
    assert stack.inspect("{{.Config.User}}") == "1000:1000"
    status = stack.exec("cat", "/proc/1/status").stdout
    assert re.search(r"(?m)^Uid:\s+1000\s+1000\s+1000\s+1000$", status), status
    assert "gunicorn" in stack.exec("cat", "/proc/1/cmdline").stdout
    for directory in ("/data", "/models/local"):
        assert stack.exec("sh", "-c", f"touch {directory}/.probe && rm {directory}/.probe").returncode == 0
    for path in ("/app/_wsgi.py", "/app/.probe", "/models/.probe", "/usr/local/lib/.probe"):
        result = stack.exec("sh", "-c", f"touch {path}", check=False)
        assert result.returncode != 0 and "Permission denied" in result.stderr, (path, result)


PROJECT_PROMPT = "shape_house"  # the project's extra_params.prompt: every region labelled "house"


def predict_without_prompt(stack: Stack) -> requests.Response:
    """A /predict as Retrieve Predictions sends it (no context): only the stored project prompt can answer it."""
    return requests.post(stack.url + "/predict", timeout=300, json={
        "tasks": [{"id": 3, "data": {"image": "/data/local-files/?d=wide.png"}}], "project": "7.1700000000",
        "label_config": readme_labeling_config(), "params": {"login": None, "password": None, "context": None}})


def labels(response: requests.Response) -> set[str]:
    assert response.status_code == 200, response.text
    [result] = response.json()["results"]
    return {label for r in result["result"] for label in r["value"].get(r["type"], [])}


def test_4_project_state_survives_down_and_up_without_a_rebuild(request, stack):
    setup = requests.post(stack.url + "/setup", timeout=30, json={
        "project": "7.1700000000", "schema": readme_labeling_config(), "hostname": "http://localhost:8080",
        "access_token": SECRET, "extra_params": {"prompt": PROJECT_PROMPT}})
    assert setup.status_code == 200, setup.text
    assert labels(predict_without_prompt(stack)) == {"house"}
    before = image_id(stack.engine, BACKEND_IMAGE)
    write_artifact("docker-grounded-sam-first-up.log", stack.logs())
    stack.compose("down")  # not --volumes: what a user does to stop the service
    assert stack.compose("ps", "--all", "--quiet").stdout.strip() == ""
    started = time.perf_counter()
    up = stack.compose("up", "-d")
    seconds = time.perf_counter() - started
    assert image_id(stack.engine, BACKEND_IMAGE) == before
    assert not re.search(r"(?i)\bbuild", up.stdout + up.stderr), up.stdout + up.stderr
    report(request, f"second `up -d` without a build: {seconds:.1f} s")
    stack.wait_healthy()
    assert stack.wait_models()["models"] == "ready"
    # No /setup since the restart: the prompt can only come from the state on the /data volume.
    assert labels(predict_without_prompt(stack)) == {"house"}


def test_5_no_setup_token_in_the_log(stack):
    log = (ARTIFACTS / "docker-grounded-sam-first-up.log").read_text(encoding="utf-8") + stack.logs()
    # Both runs' logs, covering the /setup and /predict calls above (the service logs each prediction).
    assert log.count("Starting gunicorn") == 2 and "project 7" in log, log[-2000:]
    assert SECRET not in log


def test_6_stop_stops_gunicorn_cleanly_within_the_stop_timeout(request, stack):
    started = time.perf_counter()
    stack.compose("stop", SERVICE)
    seconds = time.perf_counter() - started
    state = json.loads(stack.inspect("{{json .State}}"))
    log = stack.logs()
    report(request, f"stop: {seconds:.1f} s, exit code {state['ExitCode']}")
    assert state["ExitCode"] == 0 and not state["OOMKilled"], (state, log[-3000:])
    assert seconds < STOP_TIMEOUT, f"stop took {seconds:.1f} s: the SIGKILL after {STOP_TIMEOUT} s ended it"
    assert "Handling signal: term" in log and "Shutting down: Master" in log, log[-3000:]


# --------------------------------------------------------------------------- with Label Studio

LS_USER, LS_PASSWORD, LS_TOKEN = "ci@example.com", "ci-password-123", "grounded-sam-ci-legacy-token"
LS_START_TIMEOUT = 400  # a fresh data volume runs all migrations: 1-2 min on a busy 2-core machine


def compose_label_studio_image() -> str:
    import yaml

    compose_file = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    return compose_file["services"][LS_SERVICE]["image"]


@pytest.fixture(scope="module")
def label_studio_image(request, engine, base_image, mirror, tmp_path_factory) -> str:
    """tests/docker/label-studio.Dockerfile built on the stand-in base and tagged with the compose file's image
    name, so `--profile with-label-studio up` finds it instead of pulling."""
    image = compose_label_studio_image()
    version = image.rpartition(":")[2]
    context = tmp_path_factory.mktemp("ls-context")
    shutil.copy(HERE / "label-studio.Dockerfile", context / "Dockerfile")
    shutil.copy(ROOT / "tests" / "label-studio-constraints.txt", context / "label-studio-constraints.txt")
    started = time.perf_counter()
    with mirror:
        result = run(["docker", "build", "--network", "host", "--build-arg", f"BASE_IMAGE={base_image}",
                      "--build-arg", f"LS_VERSION={version}", "-t", image, str(context)],
                     env={**engine.env, "DOCKER_BUILDKIT": "0"}, timeout=1800)
    write_artifact("docker-label-studio-build.log", result.stdout + result.stderr)
    prune(engine)
    timings["label_studio_build_s"] = time.perf_counter() - started
    report(request, f"stand-in {image}: built in {timings['label_studio_build_s']:.0f} s, "
                    f"{image_size(engine, image) / 1e9:.2f} GB")
    return image


class LabelStudioAPI:
    def __init__(self, url: str):
        self.url = url
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {LS_TOKEN}"

    def json(self, method: str, path: str, expect=(200, 201), **kwargs):
        response = self.session.request(method, self.url + path, timeout=300, **kwargs)
        assert response.status_code in expect, f"{method} {path} -> {response.status_code}: {response.text[:3000]}"
        return response.json() if response.content else None


@pytest.mark.docker_ls
def test_with_label_studio_profile_answers_a_text_prompt_through_label_studio(
        request, engine, backend_image, label_studio_image, base_image, test_files):
    compose_down(engine)  # the backend alone (above) may still be there: start from nothing, as a user would
    # docs/docker.md "With Label Studio": the backend reaches Label Studio by its name on the compose network, with a
    # token of that instance (here the first user's legacy token, set through the stand-in's environment).
    env = compose_env(GS_TEST_BASE_IMAGE=base_image, GS_TEST_PORT=str(free_port()), GS_TEST_FILES=str(test_files),
                      GS_TEST_LS_PORT=str(free_port()), GS_TEST_LS_USER=LS_USER, GS_TEST_LS_PASSWORD=LS_PASSWORD,
                      GS_TEST_LS_TOKEN=LS_TOKEN, WEIGHTS="", WITH_RAY="true", LABEL_STUDIO_URL="http://label-studio:8080",
                      LABEL_STUDIO_API_KEY=LS_TOKEN, ML_TIMEOUT_PREDICT="300")
    stack = Stack(engine, env, int(env["GS_TEST_PORT"]))
    ls = LabelStudioAPI(f"http://127.0.0.1:{env['GS_TEST_LS_PORT']}")
    started = time.perf_counter()
    try:
        stack.compose("--profile", "with-label-studio", "up", "-d")
        deadline = time.monotonic() + LS_START_TIMEOUT
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(ls.url + "/health/", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"Label Studio did not answer in {LS_START_TIMEOUT} s:\n{stack.logs(LS_SERVICE)[-4000:]}")
            time.sleep(2)
        report(request, f"Label Studio up {time.perf_counter() - started:.0f} s after `up -d`")
        assert ls.json("GET", "/api/current-user/whoami")["email"] == LS_USER
        assert stack.wait_models()["models"] == "ready"

        config = readme_labeling_config()
        project = ls.json("POST", "/api/projects/", json={"title": "docker", "label_config": config})["id"]
        ls.json("POST", f"/api/projects/{project}/import", expect=(200, 201),
                files={"file": ("wide.png", (test_files / "images" / "wide.png").read_bytes(), "image/png")})
        [task] = ls.json("GET", "/api/tasks/", params={"project": project})["tasks"]
        assert task["data"]["image"].startswith("/data/upload/")  # fetched by the backend from Label Studio
        # Settings → Model → Connect Model with the URL of step 3 there.
        ml = ls.json("POST", "/api/ml/", json={"url": "http://grounded-sam:9090", "project": project,
                                                "is_interactive": True, "title": "Grounded SAM"})
        context = {"result": [{"value": {"text": ["shape_cats"]}, "id": "VliPI9QKLV", "from_name": "prompt",
                               "to_name": "image", "type": "textarea", "origin": "manual"}]}
        asked = time.perf_counter()
        answer = ls.json("POST", f"/api/ml/{ml['id']}/interactive-annotating",
                         json={"task": task["id"], "context": context})
        report(request, f"interactive text prompt through Label Studio: {time.perf_counter() - asked:.1f} s")
        assert "errors" not in answer, answer
        regions = answer["data"]["result"]
        assert {r["type"] for r in regions} == {"rectanglelabels", "brushlabels"}, regions
        for region in regions:
            assert region["value"][region["type"]] == ["cats"]
            assert (region["original_width"], region["original_height"]) == (320, 40)
            if region["type"] == "brushlabels":
                decoded = np.asarray(brush.decode_rle(region["value"]["rle"]))
                assert decoded.size == 320 * 40 * 4 and decoded.reshape(40, 320, 4)[:, :, 3].any()
        assert answer["data"]["model_version"] == MODEL_VERSION
        assert LS_TOKEN not in stack.logs()
    finally:
        write_artifact("docker-label-studio.log", stack.logs(LS_SERVICE))
        write_artifact("docker-grounded-sam-with-ls.log", stack.logs())
        compose_down(engine)
    timings["with_label_studio_s"] = time.perf_counter() - started
    report(request, f"with-label-studio part: {timings['with_label_studio_s']:.0f} s (plus the stand-in's build)")
