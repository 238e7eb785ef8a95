"""End to end: `gunicorn _wsgi:app` as a user starts it, with generated random-weight Grounding DINO and
MobileSAM checkpoints passed through the documented environment variables."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from label_studio_sdk.converter import brush
from model_factory import make_image
from PIL import Image
from servers import ImageServer
from test_labeling import GUIDE_CONFIG

ROOT = Path(__file__).resolve().parent.parent


def encode(image: np.ndarray, fmt: str, orientation: int | None = None) -> bytes:
    out = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    Image.fromarray(image).save(out, fmt, exif=exif.tobytes())
    return out.getvalue()


def assert_cats_regions(results: list[dict], sizes: list[tuple[int, int]],
                        model_version: str = "groundingdino_tiny+mobile_sam") -> None:
    """One prediction per image of `sizes` ((width, height) each): 1-5 boxes and as many masks or fewer, all labeled
    `cats` by the README config's controls, each mask's RLE decoding at its image's size and not empty."""
    assert len(results) == len(sizes)
    for result, (width, height) in zip(results, sizes, strict=True):
        regions = result["result"]
        rects = [r for r in regions if r["type"] == "rectanglelabels"]
        brushes = [r for r in regions if r["type"] == "brushlabels"]
        assert 1 <= len(rects) <= 5 and 1 <= len(brushes) <= len(rects), regions
        assert all(r["value"]["rectanglelabels"] == ["cats"] and r["from_name"] == "label" for r in rects)
        assert all(r["value"]["brushlabels"] == ["cats"] and r["from_name"] == "label2" for r in brushes)
        for region in brushes:
            assert (region["original_width"], region["original_height"]) == (width, height)
            decoded = np.asarray(brush.decode_rle(region["value"]["rle"]))
            assert decoded.size == width * height * 4
            assert decoded.reshape(height, width, 4)[:, :, 3].any()
        assert result["model_version"] == model_version


TEAM = 8  # prompt-box requests at once: twice the threads a worker had before the scheduler


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def images():
    files = {
        "/data/upload/1/wide.png": encode(make_image(320, 40, seed=7), "PNG"),
        # Stored 40x240 with EXIF orientation 6: browsers (and Label Studio) show it 240x40.
        "/data/upload/1/rotated.jpg": encode(make_image(40, 240, seed=8), "JPEG", orientation=6),
        # A team's images (test_a_team_at_once): wide ones keep Grounding DINO cheap on a CPU.
        **{f"/data/upload/1/team-{n}.png": encode(make_image(320, 40, seed=100 + n), "PNG") for n in range(TEAM + 1)},
    }
    with ImageServer(files, token="e2e-token") as server:
        yield server


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """The gunicorn process's HOME and XDG_RUNTIME_DIR."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def service(groundingdino_files, mobile_sam_checkpoint, images, home, tmp_path_factory):
    config, checkpoint, text_encoder = groundingdino_files
    port = free_port()
    env = {
        **os.environ,
        "GROUNDINGDINO_CONFIG": str(config),
        "GROUNDINGDINO_CHECKPOINT": str(checkpoint),
        "GROUNDINGDINO_TEXT_ENCODER": str(text_encoder),
        "USE_MOBILE_SAM": "true",
        "MOBILESAM_CHECKPOINT": str(mobile_sam_checkpoint),
        "MAX_DETECTIONS": "5",
        "DEVICE": "cpu",
        "DATA_DIR": str(tmp_path_factory.mktemp("data")),
        "LABEL_STUDIO_URL": images.url,
        "LABEL_STUDIO_API_KEY": "e2e-token",
        "HF_HUB_OFFLINE": "1",
        # Refusals by deadline depend on this machine's speed: tested in test_scheduler.py and test_api.py.
        "REQUEST_DEADLINE": "600",
        "MALLOC_TRIM_INTERVAL": "1",
        "HOME": str(home),
        "XDG_RUNTIME_DIR": str(home),
    }
    log = open(tmp_path_factory.mktemp("logs") / "gunicorn.log", "w+")  # noqa: SIM115 - closed below
    gunicorn = Path(sys.executable).parent / "gunicorn"
    proc = subprocess.Popen([str(gunicorn), "_wsgi:app", "--bind", f"127.0.0.1:{port}"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(url + "/health", timeout=1)
                break
            except (requests.ConnectionError, requests.Timeout):  # the worker is still booting
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"gunicorn did not start:\n{log.read()[-3000:]}")
                time.sleep(0.2)
        yield url, log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def wait_ready(url: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = requests.get(url + "/health", timeout=1).json()
        if health["models"] in ("ready", "failed"):
            return health
        time.sleep(0.5)
    pytest.fail("models not loaded in time")


def test_health_answers_at_once_while_models_load(service):
    url, _ = service
    started = time.perf_counter()
    health = requests.get(url + "/health", timeout=1).json()
    assert time.perf_counter() - started < 1
    assert health["status"] == "UP" and health["models"] in ("loading", "ready")
    assert health["model_version"] == "groundingdino_tiny+mobile_sam"
    setup = requests.post(url + "/setup", timeout=3, json={
        "project": "1.1700000000", "schema": GUIDE_CONFIG, "hostname": "http://localhost:8080",
        "access_token": "x", "extra_params": None})
    assert setup.status_code == 200 and setup.json() == {"model_version": "groundingdino_tiny+mobile_sam"}


def test_no_control_socket_left_in_home(service, home):
    # gunicorn's default would be $XDG_RUNTIME_DIR/gunicorn.ctl or ~/.gunicorn/gunicorn.ctl.
    assert requests.get(service[0] + "/health", timeout=5).status_code == 200
    assert sorted(p.name for p in home.rglob("*") if "gunicorn" in p.name) == []


def test_the_worker_trims_its_heap_when_quiet(service):
    # gunicorn.conf.py's post_fork starts heap.py's thread in the worker: its trims counted in /metrics.
    from conftest import metric_samples

    def trims():
        return metric_samples(requests.get(service[0] + "/metrics", timeout=5).text)["grounded_sam_heap_trims_total"]

    wait_ready(service[0])  # loading the models is work: no trim while it runs
    first = trims()
    time.sleep(3.5)
    assert trims() >= first + 2


def test_text_prompt_gives_labeled_boxes_and_masks_while_health_answers(service):
    url, log = service
    assert wait_ready(url)["models"] == "ready"
    context = {"result": [{"value": {"text": ["shape_cats"]}, "id": "abc", "from_name": "prompt", "to_name": "image",
                           "type": "textarea", "origin": "manual"}]}
    tasks = [{"id": 1, "data": {"image": "/data/upload/1/wide.png"}},
             {"id": 2, "data": {"image": "/data/upload/1/rotated.jpg"}}]
    body = {"tasks": tasks, "project": "1.1700000000", "label_config": GUIDE_CONFIG,
            "params": {"login": None, "password": None, "context": context}}
    answer = {}
    thread = threading.Thread(target=lambda: answer.update(r=requests.post(url + "/predict", json=body, timeout=300)))
    thread.start()
    health_times = []
    while thread.is_alive():
        started = time.perf_counter()
        assert requests.get(url + "/health", timeout=1).status_code == 200
        health_times.append(time.perf_counter() - started)
        time.sleep(0.1)
    thread.join()
    assert len(health_times) >= 3, "the prediction finished before /health could be probed during it"
    assert max(health_times) < 1.0

    response = answer["r"]
    assert response.status_code == 200, response.text
    assert_cats_regions(response.json()["results"], [(320, 40), (240, 40)])
    log.seek(0)
    assert "e2e-token" not in log.read()


def prompt_body(image: str, prompt: str = "shape_cats") -> dict:
    context = {"result": [{"value": {"text": [prompt]}, "id": "abc", "from_name": "prompt", "to_name": "image",
                           "type": "textarea", "origin": "manual"}]}
    return {"tasks": [{"id": 1, "data": {"image": image}}], "project": "1.1700000000", "label_config": GUIDE_CONFIG,
            "params": {"login": None, "password": None, "context": context}}


def test_a_team_at_once_health_and_bad_input_never_wait_and_a_gone_client_is_dropped(service):
    """TEAM prompt-box requests on fresh images at once: while they queue for the model, /health, /metrics and a
    malformed request are answered (each well within 2 s, while prompts are still in flight), every prompt gets its
    answer, and a request whose client hangs up while it waits is dropped before its model pass."""
    from conftest import metric_samples

    url, _ = service
    assert wait_ready(url)["models"] == "ready"
    answers, threads = {}, []
    for n in range(TEAM):
        body = prompt_body(f"/data/upload/1/team-{n}.png")
        threads.append(threading.Thread(
            target=lambda n=n, body=body: answers.update({n: requests.post(url + "/predict", json=body, timeout=300)})))
        threads[-1].start()
    time.sleep(0.5)  # all of them sent
    # A client that gives up: its request waits behind the others, then it hangs up.
    gone = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    payload = json.dumps(prompt_body(f"/data/upload/1/team-{TEAM}.png")).encode()
    gone.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    time.sleep(0.3)
    gone.close()
    probes = 0
    while len(answers) < TEAM - 1:  # while the model is busy with the team's requests
        for method, path, kwargs, status in (("get", "/health", {}, 200), ("get", "/metrics", {}, 200),
                                             ("post", "/predict", {"data": b"{not json"}, 400)):
            response = requests.request(method, url + path, timeout=2, **kwargs)
            assert response.status_code == status, (path, response.text)
        probes += 1
        time.sleep(0.2)
    for thread in threads:
        thread.join(300)
    assert probes >= 3, "the team's requests were answered before the others could be probed"
    assert sorted(answers) == list(range(TEAM))
    for answer in answers.values():
        assert answer.status_code == 200, answer.text
        assert_cats_regions(answer.json()["results"], [(320, 40)])
    metrics = metric_samples(requests.get(url + "/metrics", timeout=2).text)
    assert metrics["grounded_sam_request_refused_total{reason=client gone}"] == 1
    assert metrics["grounded_sam_request_seconds_count{kind=prompt,route=/predict,status=200}"] >= TEAM
