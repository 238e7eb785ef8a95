"""The service's page without a browser: GET / (HTML to a browser, /health's JSON to anyone else), its static files,
GET /status, POST /try (upload, URL, task, held image; prompt or clicks) and their 4xx JSON errors, with the small
random-weight Grounding DINO and MobileSAM (tests/model_factory.py). The page in Chromium: tests/test_page_browser.py.
"""

from __future__ import annotations

import io
import logging
import re

import numpy as np
import pytest
from fake_label_studio import FakeLabelStudio
from model_factory import make_image, service_env
from PIL import Image
from servers import ImageServer
from test_labeling import GUIDE_CONFIG

from _wsgi import create_backend_app
from page import mask_runs

IMAGE = make_image(96, 64, seed=3)


def png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def images():
    with ImageServer({"/img/a.png": png(IMAGE), "/img/broken.png": b"not an image"}) as server:
        yield server


@pytest.fixture(scope="module")
def label_studio(images):
    with FakeLabelStudio(GUIDE_CONFIG, {7: {"image": images.url + "/img/a.png"}}) as server:
        yield server


@pytest.fixture(scope="module")
def app(groundingdino_files, mobile_sam_checkpoint, tmp_path_factory, label_studio):
    env = service_env(groundingdino_files, mobile_sam_checkpoint, DATA_DIR=str(tmp_path_factory.mktemp("data")),
                      LABEL_STUDIO_URL=label_studio.url, IMAGE_ALLOWED_HOSTS="127.0.0.1")
    app = create_backend_app(env)
    app.extensions["model_loader"].get(timeout=300)
    return app


@pytest.fixture
def client(app):
    return app.test_client()


def upload(client, image=IMAGE, **fields):
    data = {"image": (io.BytesIO(png(image)), "a.png"), **{k: str(v) for k, v in fields.items()}}
    return client.post("/try", data=data, content_type="multipart/form-data")


def passes(answer: dict) -> tuple[int, int, int]:
    c = answer["computed"]
    return c.get("groundingdino-outputs", 0), c.get("groundingdino-backbone", 0), c.get("sam-embedding", 0)


def test_root_is_the_page_for_a_browser_and_health_json_for_others(client):
    page = client.get("/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert '<script src="/ui/page.js"' in html
    links = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert links and all(link.startswith(("/ui/", "#", "data:")) for link in links), links  # nothing external
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    for path, kind in (("/ui/page.js", "javascript"), ("/ui/page.css", "text/css")):
        static = client.get(path)
        assert static.status_code == 200 and kind in static.mimetype
    for accept in (None, "*/*", "application/json"):
        health = client.get("/", headers={"Accept": accept} if accept else {})
        assert health.is_json and health.json["status"] == "UP", accept


def test_status_reports_models_memory_cache_and_requests(client):
    client.get("/health")
    upload(client, prompt="cats")
    status = client.get("/status").json
    assert status["models"] == "ready" and status["device"] == "cpu" and status["precision"] == "fp32"
    assert status["load_seconds"] >= 0 and status["model_version"]
    assert status["memory"]["rss_mb"] > 10 and status["memory"]["gpu"] is None
    assert {"entries", "hits", "misses", "hit_rate", "computed"} <= set(status["cache"])
    assert any(r["path"] == "/try" and r["status"] == 200 and r["ms"] > 0 for r in status["requests"])
    assert not any(r["path"] in ("/status",) for r in status["requests"])
    queue = status["queue"]  # the worker's scheduler: the /try above was a prompt, answered
    assert queue["served"]["prompt"] >= 1 and queue["admitted"] == {"click": 0, "prompt": 0, "batch": 0}
    assert queue["running"] == 0 and queue["concurrency"] == 1 and queue["refused"] == {}


def test_try_upload_then_refilter_runs_no_detector_or_encoder_pass(client):
    first = upload(client, prompt="shape_cats. round thing_house", box_threshold=0, text_threshold=0)
    assert first.status_code == 200, first.json
    answer = first.json
    assert (answer["width"], answer["height"], answer["source"]) == (96, 64, "image")
    assert answer["phrases"] == [{"text": "shape", "label": "cats"}, {"text": "round thing", "label": "house"}]
    found = answer["detections"]
    assert 3 <= len(found) <= 5  # MAX_DETECTIONS=5; random weights score every query above 0
    for d in found:
        x0, y0, x1, y1 = d["box"]
        assert 0 <= x0 <= x1 <= 96 and 0 <= y0 <= y1 <= 64 and d["label"] in ("cats", "house")
        assert sum(d["mask"]) == 96 * 64  # the runs cover the image
    scores = sorted((d["score"] for d in found), reverse=True)
    cut = (scores[1] + scores[2]) / 2  # two detections score above it
    before = passes(answer)
    again = client.post("/try", json={"image_id": answer["image_id"], "prompt": "shape_cats. round thing_house",
                                      "box_threshold": cut, "text_threshold": 0})
    assert again.status_code == 200, again.json
    assert len(again.json["detections"]) == 2
    assert passes(again.json) == before  # the cached outputs re-filtered: no detector, backbone or SAM encoder pass
    assert first.json["ran"]["groundingdino-outputs"] == 1  # a new prompt: one detector pass
    assert again.json["ran"] == {}  # what this request computed: nothing
    no_house = client.post("/try", json={"image_id": answer["image_id"], "prompt": "shape_cats. round thing_house",
                                         "box_threshold": 0, "text_threshold": 0,
                                         "label_thresholds": {"house": {"box_threshold": 1.0}}})
    kept = no_house.json["detections"]  # a label's own threshold: house gone, its places in MAX_DETECTIONS to cats
    assert {d["label"] for d in kept} == {"cats"} and all(d in kept for d in found if d["label"] == "cats")
    assert any(d["label"] == "house" for d in found)
    assert no_house.json["ran"] == {}
    assert client.get("/status").json["cache"]["computed"]["groundingdino-outputs"] == before[0]
    image = client.get(f"/try/image/{answer['image_id']}")
    assert image.mimetype == "image/png" and Image.open(io.BytesIO(image.data)).size == (96, 64)


def test_try_clicks_run_the_interactive_path(client):
    answer = upload(client, prompt="cats").json
    clicked = client.post("/try", json={"image_id": answer["image_id"], "clicks": [
        {"x": 30, "y": 20, "positive": True}, {"x": 80, "y": 50, "positive": False}], "label": "cats"})
    assert clicked.status_code == 200, clicked.json
    assert clicked.json["mode"] == "clicks"
    (region,) = clicked.json["detections"]
    assert region["label"] == "cats" and region["mask"] is not None


def test_try_url_and_task(client, images, label_studio, caplog):
    caplog.set_level(logging.DEBUG)
    by_url = client.post("/try", json={"url": images.url + "/img/a.png", "prompt": "cats", "masks": False})
    assert by_url.status_code == 200, by_url.json
    assert by_url.json["source"] == "url" and all(d["mask"] is None for d in by_url.json["detections"])
    no_key = client.post("/try", json={"task": 7, "project": 1, "prompt": "cats"})
    assert no_key.status_code == 401 and "'task'" in no_key.json["error"]
    by_task = client.post("/try", json={"task": 7, "project": 1, "prompt": "cats"},
                          headers={"X-Label-Studio-Key": label_studio.token})
    assert by_task.status_code == 200, by_task.json
    assert by_task.json["image_id"] == by_url.json["image_id"]
    missing = client.post("/try", json={"task": 8, "project": 1, "prompt": "cats"},
                          headers={"X-Label-Studio-Key": label_studio.token})
    assert missing.status_code == 404 and "'task' 8" in missing.json["error"]
    assert "'task' 8 is not in project 1" in caplog.text  # (the log is captured)
    assert label_studio.token not in caplog.text  # the caller's key reaches no log


@pytest.mark.parametrize("body, status, names", [
    ({"prompt": "cats"}, 400, "exactly one of 'image'"),
    ({"url": "http://127.0.0.1:1/x.png", "image_id": "ab", "prompt": "cats"}, 400, "exactly one of 'image'"),
    ({"image_id": "0" * 32, "prompt": "cats"}, 404, "'image_id'"),
    ({"image_id": "0" * 32}, 400, "'prompt' is missing"),
    ({"image_id": "0" * 32, "prompt": "cats", "box_threshold": 2}, 400, "box_threshold must be a number between"),
    ({"image_id": "0" * 32, "prompt": "cats", "box_threshold": "high"}, 400, "'box_threshold' must be a number"),
    ({"image_id": "0" * 32, "clicks": [{"x": "a"}]}, 400, "'clicks[0]'"),
    ({"image_id": "0" * 32, "prompt": "cats", "label_thresholds": {"dogs": {"box_threshold": 0.1}}}, 400,
     "label_thresholds names label(s) the prompt lacks: 'dogs'; its labels: cats"),
    ({"image_id": "0" * 32, "prompt": "cats", "label_thresholds": "{"}, 400, "label_thresholds is not valid JSON"),
    ({"task": "seven", "project": 1, "prompt": "cats"}, 400, "'task' must be"),
    ({"url": "file:///etc/passwd", "prompt": "cats"}, 400, "'url'"),
])
def test_try_rejects_bad_requests_naming_the_field(client, body, status, names):
    response = client.post("/try", json=body)
    assert response.status_code == status, response.json
    assert names in response.json["error"]


def test_try_rejects_bad_uploads_and_bodies(client, images):
    broken = client.post("/try", data={"image": (io.BytesIO(b"nope"), "x.png"), "prompt": "cats"},
                         content_type="multipart/form-data")
    assert broken.status_code == 400 and broken.json["error"].startswith("'image'")
    assert client.post("/try", data=b"[1]", content_type="application/json").status_code == 400
    assert "empty" in client.post("/try").json["error"]
    assert client.get("/try/image/nope").status_code == 404
    outside = client.post("/try", json={"image_id": upload(client, prompt="cats").json["image_id"],
                                        "clicks": [{"x": 500, "y": 5}]})
    assert outside.status_code == 400 and "'clicks'" in outside.json["error"]


def test_basic_auth_covers_the_page_and_its_routes(groundingdino_files, mobile_sam_checkpoint, tmp_path):
    env = service_env(groundingdino_files, mobile_sam_checkpoint, DATA_DIR=str(tmp_path),
                      BASIC_AUTH_USER="u", BASIC_AUTH_PASS="p")
    client = create_backend_app(env).test_client()
    for path in ("/", "/ui/page.js", "/status", "/jobs"):
        assert client.get(path, headers={"Accept": "text/html"}).status_code == 401, path
    assert client.post("/try", json={}).status_code == 401
    assert client.get("/health").status_code == 200
    ok = client.get("/", headers={"Accept": "text/html", "Authorization": "Basic dTpw"})
    assert ok.status_code == 200 and ok.mimetype == "text/html"


def test_mask_runs():
    mask = np.array([[1, 1, 0], [0, 0, 1]], bool)
    assert mask_runs(mask) == [0, 2, 3, 1]
    assert mask_runs(~mask) == [2, 3, 1]
    assert mask_runs(np.zeros((0, 3), bool)) == []


def test_try_reads_label_studio_urls_only_with_the_callers_key(tmp_path):
    """A 'url' that Label Studio serves (an upload path, an absolute URL on its host) is read with the caller's key,
    never the service's LABEL_STUDIO_API_KEY, and not from the cache; other hosts' URLs need no key."""
    from fakes import FakeLoader

    files = {"/data/upload/1/a.png": png(IMAGE), "/img/b.png": png(IMAGE)}
    with ImageServer(files, token="service-key") as label_studio, ImageServer(files) as other:
        env = {"DATA_DIR": str(tmp_path), "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": "service-key"}
        client = create_backend_app(env, loader=FakeLoader()).test_client()

        def try_url(url, key=None):
            return client.post("/try", json={"url": url, "prompt": "cats"},
                               headers={"X-Label-Studio-Key": key} if key else {})

        for url in ("/data/upload/1/a.png", label_studio.url + "/data/upload/1/a.png"):
            before = len(label_studio.requests)
            refused = try_url(url)
            assert refused.status_code == 401 and "'url' is read from Label Studio with your key" in refused.json[
                "error"]
            assert len(label_studio.requests) == before  # nothing fetched with the service's key
            wrong = try_url(url, "someone-elses-key")
            assert wrong.status_code == 400 and "'url'" in wrong.json["error"], wrong.json
            assert label_studio.requests[-1] == ("/data/upload/1/a.png", "Token someone-elses-key")
            assert try_url(url, "service-key").status_code == 200  # the caller holds a key Label Studio accepts
            assert try_url(url, "someone-elses-key").status_code == 400  # not served from the cache
        assert {auth for _, auth in label_studio.requests} == {"Token someone-elses-key", "Token service-key"}
        assert len(label_studio.requests) == 6
        elsewhere = try_url(other.url + "/img/b.png")
        assert elsewhere.status_code == 200 and other.requests == [("/img/b.png", None)]
