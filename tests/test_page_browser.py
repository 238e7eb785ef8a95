"""The service's page (GET /) in headless Chromium (Playwright driving Debian's `chromium`, as test_browser.py does).

One in-process server on 127.0.0.1 (the app `_wsgi.create_backend_app` builds, with the small random-weight Grounding
DINO and MobileSAM, behind basic auth), a loopback imitation of Label Studio's REST API for the job, one browser.
Checks: basic auth is enforced; the page loads with no console error and no request leaving 127.0.0.1, at 1280 px
and on a narrow window without sideways scrolling; an upload and a prompt draw N regions; a threshold slider changes
the count with no new detector or image encoder pass (the server's counters); a running job's bar advances, its
failures show their kind and reason, and its Cancel button (with the key entered on the page) cancels it; the
Evaluate panel shows a project's figures per label and each label's precision-recall points, and applies the chosen
thresholds to the model connection.
Screenshots go to artifacts/ (git-ignored).

Run alone: `.venv/bin/python -m pytest tests/test_page_browser.py` (or `make test-browser`, with test_browser.py).
"""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests
from fake_label_studio import FakeLabelStudio
from model_factory import make_image, service_env
from PIL import Image
from servers import LoopbackServer
from test_labeling import GUIDE_CONFIG
from werkzeug.serving import make_server

from _wsgi import create_backend_app

pytestmark = [pytest.mark.browser]

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
AUTH = ("page-user", "page-pass")
LS_TOKEN = "fake-ls-token"
TASKS = 40  # the job's tasks: each image takes IMAGE_DELAY to fetch, so the job runs long enough to watch
BROKEN = (1, 2)  # tasks whose image is missing: the job's failures
IMAGE_DELAY = 0.25
TIMEOUT_MS = 120_000


def png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, "PNG")
    return out.getvalue()


class SlowImages(LoopbackServer):
    """/img/<n>.png after IMAGE_DELAY seconds; 404 for the BROKEN tasks' images."""

    def __init__(self):
        body = png(make_image(64, 48, seed=5))

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                time.sleep(IMAGE_DELAY)
                number = int(self.path.rsplit("/", 1)[-1].split(".")[0])
                found = number not in BROKEN
                self.send_response(200 if found else 404)
                self.send_header("Content-Length", str(len(body) if found else 0))
                self.end_headers()
                if found:
                    self.wfile.write(body)

            def log_message(self, *args):
                pass

        super().__init__(Handler, poll_interval=0.05)


@pytest.fixture(scope="module")
def service(groundingdino_files, mobile_sam_checkpoint, tmp_path_factory):
    """(url of the backend, the fake Label Studio)."""
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    with SlowImages() as images:
        tasks = {i: {"image": f"{images.url}/img/{i}.png"} for i in range(1, TASKS + 1)}
        with FakeLabelStudio(GUIDE_CONFIG, tasks, token=LS_TOKEN) as label_studio:
            env = service_env(groundingdino_files, mobile_sam_checkpoint,
                              DATA_DIR=str(tmp_path_factory.mktemp("data")), LABEL_STUDIO_URL=label_studio.url,
                              BASIC_AUTH_USER=AUTH[0], BASIC_AUTH_PASS=AUTH[1], BATCH_SIZE="1", JOB_CHUNK_SIZE="5")
            app = create_backend_app(env)
            app.extensions["model_loader"].get(timeout=300)
            server = make_server("127.0.0.1", 0, app, threaded=True)
            thread = threading.Thread(target=server.serve_forever, daemon=True)
            thread.start()
            try:
                yield f"http://127.0.0.1:{server.server_port}", label_studio
            finally:
                server.shutdown()


@pytest.fixture(scope="module")
def browser(service):
    """One headless Chromium that can only reach 127.0.0.1. Yields (browser, blocked URLs, log)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def session(browser):
    """A context with the basic auth credentials, its blocked requests and its console log."""
    blocked: list[str] = []
    log: list[str] = []

    def only_loopback(route):
        url = route.request.url
        if url.startswith(("data:", "blob:")) or urlsplit(url).hostname == "127.0.0.1":
            route.continue_()
        else:
            blocked.append(url)
            route.abort()

    context = browser.new_context(http_credentials={"username": AUTH[0], "password": AUTH[1]},
                                  service_workers="block", viewport={"width": 1280, "height": 900})
    context.route("**/*", only_loopback)
    context.on("console", lambda m: log.append(f"console {m.type}: {m.text[:500]}"))
    context.on("weberror", lambda e: log.append(f"page error: {e.error}"))
    try:
        yield context, blocked, log
    finally:
        context.close()
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "page-browser-log.txt").write_text("\n".join(log + [f"blocked: {u}" for u in blocked]) + "\n")


@pytest.fixture(scope="module")
def page(session, service):
    context, _, _ = session
    page = context.new_page()
    page.goto(service[0] + "/")
    page.get_by_text("Models ready.").wait_for(timeout=TIMEOUT_MS)
    return page


def screenshot(page, name: str, full_page: bool = False) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=full_page)


def server_json(service, path: str) -> dict:
    return requests.get(service[0] + path, auth=AUTH, timeout=10).json()


def errors_in(log: list[str]) -> list[str]:
    return [line for line in log if line.startswith(("console error", "page error"))]


def test_basic_auth_is_enforced(browser, service):
    url = service[0]
    assert requests.get(url + "/", headers={"Accept": "text/html"}, timeout=10).status_code == 401
    assert requests.get(url + "/status", timeout=10).status_code == 401
    from playwright.sync_api import Error

    for credentials in (None, {"username": AUTH[0], "password": "wrong"}):
        context = browser.new_context(service_workers="block", http_credentials=credentials)
        try:
            page = context.new_page()
            try:
                assert page.goto(url + "/").status == 401
                assert "authentication required" in page.content() and "Try it" not in page.content()
            except Error as e:  # headless Chromium's answer to a 401 challenge its (wrong) credentials don't meet
                assert "ERR_INVALID_AUTH_CREDENTIALS" in str(e), credentials
        finally:
            context.close()


def test_page_loads_offline_without_errors_and_reads_at_1280_and_narrow(page, session):
    _, blocked, log = session
    assert page.title() == "Grounded SAM backend"
    assert page.locator("#status-grid dd").first.inner_text() == "ready"
    grid = page.locator("#status-grid").inner_text()
    assert "model queue" in grid and "click 0 · prompt 0 · batch 0 admitted" in grid and "refused (503)" in grid
    # every control has a label: inputs by <label for>, buttons by their text or aria-label
    unlabeled = page.evaluate("""() => [...document.querySelectorAll('input, textarea, select')]
        .filter((e) => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')).map((e) => e.id)""")
    assert unlabeled == []
    screenshot(page, "page-1280.png")
    page.set_viewport_size({"width": 420, "height": 900})
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    screenshot(page, "page-narrow.png", full_page=True)
    page.set_viewport_size({"width": 1280, "height": 900})
    assert blocked == [] and errors_in(log) == []


def test_upload_and_prompt_draw_regions_and_a_slider_refilters_without_a_model_pass(page, service, session):
    _, blocked, log = session
    page.locator("#try-file").set_input_files({"name": "shapes.png", "mimeType": "image/png",
                                               "buffer": png(make_image(160, 120, seed=3))})
    page.fill("#try-prompt", "shape_cats. round thing_house")
    page.fill("#box-threshold", "0")
    page.fill("#text-threshold", "0")
    page.click("#try-run")
    # (locators, not wait_for_function: the page's Content-Security-Policy forbids the eval that one needs)
    page.locator("#try-state[data-count]").wait_for(timeout=TIMEOUT_MS)
    count = int(page.get_attribute("#try-state", "data-count"))
    assert count >= 2
    assert page.locator("#stage-svg rect.region").count() == count
    assert page.locator("#detections tbody tr").count() == count
    deadline = time.monotonic() + 30
    while page.evaluate("() => document.getElementById('stage-img').naturalWidth") != 160:
        assert time.monotonic() < deadline, "the image did not load"
        page.wait_for_timeout(100)
    painted = page.evaluate("""() => { const c = document.getElementById('stage-masks');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; }""")
    assert painted > 0  # the masks are drawn
    screenshot(page, "page-try.png")

    scores = sorted((float(t) for t in page.locator("#detections tbody tr td:nth-child(3)").all_inner_texts()),
                    reverse=True)
    cut = next(v / 100 for v in range(1, 100) if 0 < sum(s > v / 100 for s in scores) < count)
    expected = sum(s > cut for s in scores)
    before = server_json(service, "/status")["cache"]["computed"]
    page.fill("#box-threshold", f"{cut:.2f}")
    page.locator(f"#try-state[data-count='{expected}']").wait_for(timeout=TIMEOUT_MS)
    assert page.locator("#stage-svg rect.region").count() == expected
    assert "no new detector pass" in page.inner_text("#try-state")
    after = server_json(service, "/status")["cache"]["computed"]
    for kind in ("groundingdino-outputs", "groundingdino-backbone", "sam-embedding"):
        assert after.get(kind) == before.get(kind), kind  # no detector, backbone or image encoder pass
    settings = page.input_value("#settings-json")
    assert f'"box_threshold":{cut:g}' in settings.replace(" ", "") and '"prompt":"shape_cats. round thing_house"' in \
        settings
    # a click on the image runs the interactive path
    box = page.locator("#stage-svg").bounding_box()
    with page.expect_response(lambda r: r.url.endswith("/try") and r.request.method == "POST") as clicked:
        page.locator("#stage-svg").click(position={"x": box["width"] * 0.3, "y": box["height"] * 0.4})
    assert clicked.value.status == 200 and clicked.value.json()["mode"] == "clicks"
    # the same from the keyboard: a slider's arrow keys re-filter, the focused image's Enter clicks
    page.focus("#box-threshold")
    with page.expect_response(lambda r: r.url.endswith("/try") and r.request.method == "POST") as moved:
        page.keyboard.press("ArrowLeft")
    assert moved.value.status == 200 and moved.value.request.post_data_json["box_threshold"] == round(cut - 0.01, 2)
    page.focus("#stage-svg")
    page.keyboard.press("ArrowRight")
    with page.expect_response(lambda r: r.url.endswith("/try") and r.request.method == "POST") as entered:
        page.keyboard.press("Enter")
    assert entered.value.status == 200 and entered.value.json()["mode"] == "clicks"
    assert entered.value.request.post_data_json["clicks"][0]["positive"] is True
    assert blocked == [] and errors_in(log) == []


def test_a_running_jobs_bar_advances_and_cancel_works(page, service, session):
    _, blocked, log = session
    url, label_studio = service
    page.fill("#key", LS_TOKEN)
    page.click("#key-form button[type=submit]")
    page.get_by_text("key set for this tab").wait_for()
    assert LS_TOKEN not in page.content()  # the key field is emptied; the key lives in sessionStorage only
    page.click("#job-new summary")
    page.fill("#job-project", "1")
    page.fill("#job-tasks", f"1-{TASKS}")
    page.fill("#job-prompt", "shape_cats")
    page.click("#job-form button[type=submit]")
    page.get_by_text("running", exact=True).first.wait_for(timeout=TIMEOUT_MS)
    bar = page.locator("#job-list li").first.locator("[role=progressbar]")
    seen = []
    deadline = time.monotonic() + 120
    while len(set(seen)) < 3 and time.monotonic() < deadline:
        seen.append(int(bar.get_attribute("aria-valuenow")))
        page.wait_for_timeout(300)
    assert len(set(seen)) >= 3 and seen == sorted(seen), seen  # the bar advances, live
    assert seen[-1] < TASKS
    page.locator("#job-list li").first.locator("details summary").click()
    failures = page.locator("#job-list li").first.locator(".failures li").all_inner_texts()
    assert len(failures) == len(BROKEN) and all("404" in f or "not found" in f.lower() for f in failures), failures
    screenshot(page, "page-job.png")
    page.fill("#box-threshold", "0.05")  # the prompt's boxes again (a click's mask was shown last), for the picture
    page.locator("#stage-svg rect.region").nth(1).wait_for(timeout=TIMEOUT_MS)
    screenshot(page, "page-full.png", full_page=True)  # docs/page.png is this one, scaled down
    with page.expect_response(lambda r: r.request.method == "DELETE") as cancelled:
        page.locator("#job-list li").first.get_by_role("button", name="Cancel").click()
    assert cancelled.value.status == 200
    assert cancelled.value.request.headers.get("x-label-studio-key") == LS_TOKEN
    page.locator("#job-list li .state-cancelled").first.wait_for(timeout=TIMEOUT_MS)
    job = server_json(service, "/jobs")["jobs"][0]
    assert job["state"] == "cancelled"
    finished = sum(job["counts"][k] for k in ("done", "failed", "skipped"))
    assert finished < TASKS
    assert blocked == [] and errors_in(log) == []


def test_the_evaluate_panel_shows_each_labels_figures_and_curve_and_applies_the_thresholds(page, service, session):
    _, blocked, log = session
    url, label_studio = service
    # Every task shows the same picture. Task 3 is annotated with a box the model finds there (asked through /try),
    # task 4 with one it does not; task 2's image is missing (BROKEN), task 5 has no annotation.
    found = requests.post(f"{url}/try", auth=AUTH, files={"image": ("a.png", png(make_image(64, 48, seed=5)))},
                          data={"prompt": "shape_cats"}, timeout=120).json()["detections"]
    x0, y0, x1, y1 = found[0]["box"]

    def box(x, y, w, h):  # in pixels of the 64 x 48 picture
        return {"type": "rectanglelabels", "from_name": "label", "to_name": "image", "original_width": 64,
                "original_height": 48, "value": {"x": x * 100 / 64, "y": y * 100 / 48, "width": w * 100 / 64,
                                                 "height": h * 100 / 48, "rectanglelabels": ["cats"]}}

    far = box(0, 0, 3, 3) if x0 > 8 or y0 > 8 else box(60, 44, 3, 3)
    for task, region in ((2, far), (3, box(x0, y0, x1 - x0, y1 - y0)), (4, far)):
        label_studio.annotations[task] = [{"id": task, "result": [region]}]
    label_studio.ml_backends[:] = [{"id": 4, "extra_params": {"prompt": "shape_cats"}}]
    page.fill("#key", LS_TOKEN)
    page.click("#key-form button[type=submit]")
    page.fill("#eval-project", "1")
    page.fill("#eval-tasks", "2-5")
    page.click("#eval-form button[type=submit]")
    page.locator("#eval-result").wait_for(state="visible", timeout=TIMEOUT_MS)
    state = page.inner_text("#eval-state")
    assert "done: 4 of 4 tasks: 2 evaluated, 1 failed, 1 skipped" in state and "task 2 (" in state, state
    run_id = state.split()[1]  # "Evaluation <id> of project 1 done: ..."
    report = requests.get(f"{url}/evaluations/{run_id}", auth=AUTH, headers={"X-Label-Studio-Key": LS_TOKEN},
                          timeout=10).json()["report"]
    # The table shows the report's figures: one row per label of the config and one overall.
    rows = page.locator("#eval-tables table").first.locator("tbody tr")
    assert rows.count() == 3
    cats = rows.nth(0).locator("th, td").all_inner_texts()
    figures = report["boxes"]["labels"]["cats"]
    assert cats[0] == "cats" and cats[6:9] == [str(figures[k]) for k in ("annotated", "predicted", "matched")]
    assert cats[4] == ("–" if figures["recall"] is None else f"{figures['recall']:.3f}")
    # One curve per prompt label: a dot per threshold point with a precision and a recall, the chosen one circled.
    figure = page.locator("#eval-curves figure")
    assert figure.count() == 1 and figure.get_attribute("data-label") == "cats"
    curve = report["thresholds"]["labels"]["cats"]
    points = sum(1 for p in curve["curve"] if p[2] is not None and p[3] is not None)
    assert figure.locator("circle:not(.chosen)").count() == points
    assert curve["chosen"] and figure.locator("circle.chosen").count() == 1  # the found box: some point finds it
    assert 0 < figures["recall"] < 1 and report["boxes"]["labels"]["cats"]["ap"] > 0
    snippet = json.loads(page.input_value("#eval-snippet"))
    assert snippet == report["extra_params"] and "cats" in snippet["label_thresholds"]
    screenshot(page, "page-evaluate.png")
    page.locator("#evaluate").screenshot(path=str(ARTIFACTS / "page-evaluate-panel.png"))  # docs/evaluate-panel.png
    with page.expect_response(lambda r: r.url.endswith("/apply")) as applied:
        page.click("#eval-apply")
    assert applied.value.status == 200
    page.get_by_text("Written: the next predictions use these thresholds.").wait_for()
    assert label_studio.ml_backends[0]["extra_params"] == {"prompt": "shape_cats", **snippet}
    assert blocked == [] and errors_in(log) == []


def test_without_a_key_jobs_are_read_only(browser, service):
    context = browser.new_context(http_credentials={"username": AUTH[0], "password": AUTH[1]},
                                  service_workers="block")
    try:
        page = context.new_page()
        page.goto(service[0] + "/")
        page.locator("#job-list li").first.wait_for(timeout=TIMEOUT_MS)
        assert page.inner_text("#key-state") == "no key: jobs are read-only"
        basic = base64.b64encode(f"{AUTH[0]}:{AUTH[1]}".encode()).decode()
        refused = requests.delete(f"{service[0]}/jobs/{server_json(service, '/jobs')['jobs'][0]['id']}",
                                  headers={"Authorization": f"Basic {basic}"}, timeout=10)
        assert refused.status_code == 401
    finally:
        context.close()
