"""End to end through Label Studio's own labeling UI, in headless Chromium (Playwright, Debian's `chromium`).

Connects our service through the UI's "Connect Model" form (extra params typed as a JSON string), opens a task,
turns Auto-Annotation on, types a text prompt, clicks Add, and checks that our suggestions appear and, once
accepted, show up in the regions list with our labels. Every request the browser makes goes to 127.0.0.1;
anything else is aborted. Screenshots and the browser's log go to artifacts/.

Run alone: `make test-browser` (or `.venv/bin/python -m pytest -m browser`).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from label_studio_harness import (
    ARTIFACTS,
    LS_PASSWORD,
    LS_USER,
    MODEL_VERSION,
    URL_PNG,
    Backend,
    LabelStudio,
    StaticServer,
    labels_of,
    region_problems,
    write_artifact,
)

pytest_plugins = ["label_studio_harness"]
pytestmark = [pytest.mark.label_studio, pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
PROJECT_PROMPT = "round thing_cats"  # typed into the Connect Model form; maps to `cats` only
TEXT_PROMPT = "box_house"  # typed into the task's prompt box; maps to `house` only
UI_TIMEOUT_MS = 180_000  # a first prediction of a new image size takes 10-25 s on a busy 2-core machine


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    """A fresh headless Chromium profile that can only reach 127.0.0.1. Yields (context, blocked URLs, log)."""
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    from playwright.sync_api import sync_playwright

    blocked: list[str] = []
    log: list[str] = []

    def only_loopback(route):
        url = route.request.url
        if url.startswith(("data:", "blob:")) or urlsplit(url).hostname == "127.0.0.1":
            route.continue_()
        else:
            blocked.append(url)
            route.abort()

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS, service_workers="block", viewport={"width": 1400, "height": 2400})
        try:
            context.route("**/*", only_loopback)
            context.on("console", lambda m: log.append(f"console {m.type}: {m.text[:500]}"))
            context.on("weberror", lambda e: log.append(f"page error: {e.error}"))
            yield context, blocked, log
        finally:
            context.close()
            write_artifact("browser-log.txt", "\n".join(log + [f"blocked: {url}" for url in blocked]) + "\n")


@pytest.fixture(scope="module")
def page(browser_context, label_studio: LabelStudio):
    context, _, _ = browser_context
    page = context.new_page()
    # Playwright's sync API runs route handlers only while Playwright is being called: wait with page.wait_for_*,
    # never time.sleep, or every request stalls behind the loopback filter.
    page.goto(label_studio.url + "/user/login/")
    page.fill("input[name=email]", LS_USER)
    page.fill("input[name=password]", LS_PASSWORD)
    page.click("button[type=submit], input[type=submit]")
    page.wait_for_url(lambda url: "/user/login" not in url)
    return page


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path))
    return path


def test_connect_model_form_then_auto_annotation_text_prompt(
        page, browser_context, label_studio: LabelStudio, backend: Backend, image_server: StaticServer):
    ls = label_studio
    _, blocked, _ = browser_context
    project = ls.create_project("Grounded SAM in the browser")
    ls.import_urls(project, [image_server.url + URL_PNG[0]])
    (task,) = ls.tasks(project)
    width, height = URL_PNG[3]

    # 1. Settings → Model → Connect Model, extra params typed as text (LS sends them to /setup as a string).
    setups = backend.setups()
    page.goto(f"{ls.url}/projects/{project}/settings/ml")
    page.get_by_text("Connect Model", exact=True).first.click()
    page.fill("input[name=title]", "Grounded SAM")
    page.fill("input[name=url]", backend.url)
    page.fill("textarea[name=extra_params]", f'{{"prompt": "{PROJECT_PROMPT}"}}')
    page.get_by_text("Interactive preannotations", exact=True).click()
    with page.expect_response(lambda r: urlsplit(r.url).path.rstrip("/") == "/api/ml"
                              and r.request.method == "POST", timeout=UI_TIMEOUT_MS) as created:
        page.get_by_role("button", name="Save machine learning form").click()
    assert created.value.status == 201, created.value.text()
    (row,) = ls.json("GET", "/api/ml/", params={"project": project})
    assert row["state"] == "CO" and row["is_interactive"] is True and row["model_version"] == MODEL_VERSION, row
    assert row["extra_params"] == f'{{"prompt": "{PROJECT_PROMPT}"}}'  # kept as the string typed
    assert backend.setups() > setups

    # 2. Open the task: LS predicts it with `context: null`, so the project's prompt (typed above) is used.
    page.goto(f"{ls.url}/projects/{project}/data?task={task['id']}")
    page.get_by_text("Auto-Annotation", exact=True).wait_for(timeout=UI_TIMEOUT_MS)
    image = page.locator(f"img[src='{image_server.url + URL_PNG[0]}']").first
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle(),
                           timeout=UI_TIMEOUT_MS)  # loaded with crossorigin: our static server sends CORS headers
    assert image.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [width, height]
    # (The UI asks for the task twice at once and LS may predict it twice: two stored predictions, both ours.)
    stored = ls.predictions(task["id"])
    assert stored and all(labels_of(p["result"]) == {"cats"} for p in stored), stored
    assert all(region_problems(p["result"], (width, height)) == [] for p in stored)

    # 3. Auto-Annotation on, type the prompt, Add: the UI sends the textarea region as context.
    page.get_by_text("Auto-Annotation", exact=True).click()
    page.locator("textarea").first.fill(TEXT_PROMPT)
    started = time.perf_counter()
    with page.expect_response(lambda r: "/interactive-annotating" in r.url, timeout=UI_TIMEOUT_MS) as answered:
        page.get_by_role("button", name="Add").click()
    response = answered.value
    body = response.request.post_data_json
    assert body["task"] == task["id"]
    (sent,) = body["context"]["result"]
    assert {k: sent[k] for k in ("from_name", "to_name", "type", "origin", "value")} == {
        "from_name": "prompt", "to_name": "image", "type": "textarea", "origin": "manual",
        "value": {"text": [TEXT_PROMPT]}}
    assert response.status == 200
    suggested = response.json()["data"]["result"]
    assert suggested and labels_of(suggested) == {"house"}
    assert region_problems(suggested, (width, height)) == []

    info = page.locator(".lsf-auto-accept__info")
    info.wait_for(timeout=UI_TIMEOUT_MS)
    assert re.fullmatch(rf"{len(suggested)} suggestions?", info.inner_text().strip()), info.inner_text()
    add_to_suggestions_s = round(time.perf_counter() - started, 3)
    screenshot(page, "browser-suggestions.png")

    # 4. Accept them: they join the regions list with our labels, boxes and masks alike.
    page.get_by_test_id("bottombar-accept-suggestions-button").click()
    house = page.locator(".lsf-tree__node").filter(has=page.locator(".lsf-outliner-item__title", has_text="house"))
    house.nth(len(suggested) - 1).wait_for(timeout=30_000)
    assert house.count() == len(suggested)
    kinds = {re.search(r"lsf-tree__node_type_(\w+)", house.nth(i).get_attribute("class")).group(1)
             for i in range(house.count())}
    assert kinds == {"rectangleregion", "brushregion"}
    screenshot(page, "browser-accepted.png")
    write_artifact("browser_timings.json", {"add_to_suggestions_s": add_to_suggestions_s, "blocked": blocked})
