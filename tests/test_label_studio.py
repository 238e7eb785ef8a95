"""End to end through a real Label Studio's API: LS 1.23.2 and `gunicorn _wsgi:app`, both on 127.0.0.1.

Run alone: `make test-label-studio` (or `.venv/bin/python -m pytest -m label_studio`). The first run on a machine
installs Label Studio into ~/.cache/grounded-sam (about 3 minutes); later runs start it in ~40 s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pytest
import requests
from label_studio_harness import (
    LS_TOKEN,
    MODEL_VERSION,
    ROTATED_JPEG,
    URL_PNG,
    WIDE_PNG,
    Backend,
    LabelStudio,
    StaticServer,
    labels_of,
    region_problems,
    start_backend,
    stop_all,
    textarea_context,
    wait_models,
    write_artifact,
)
from model_factory import make_image
from test_e2e_gunicorn import encode
from test_labeling import GUIDE_CONFIG

pytest_plugins = ["label_studio_harness"]
pytestmark = pytest.mark.label_studio

TEXT_PROMPT = "round thing_cats. box_house"
PROJECT_PROMPT = "round thing_cats"  # maps only to `cats`: tells the project's prompt from the default one
TIMINGS: dict[str, float | list[float] | dict] = {}

# The README's labeling config (TextArea prompt, RectangleLabels, BrushLabels) plus the README's smart tools.
SMART_TOOLS = """  <KeyPointLabels name="click" toName="image" smart="true">
    <Label value="cats" background="yellow"/>
  </KeyPointLabels>
  <RectangleLabels name="smartbox" toName="image" smart="true">
    <Label value="cats" background="yellow"/>
  </RectangleLabels>
</View>"""
SMART_CONFIG = GUIDE_CONFIG.removesuffix("</View>") + SMART_TOOLS
# An image no other test uses, so its first click is the first time our service sees it; a red disc around
# (30 %, 40 %) and a blue block at (55-90 %, 50-85 %) (make_image).
CLICK_PNG = ("clicks.png", encode(make_image(240, 60, seed=21), "PNG"), "image/png", (240, 60))


@dataclass
class Project:
    id: int
    ml_backend: int
    tasks: list[dict]  # oldest first: wide.png upload, rotated.jpg upload, URL image
    sizes: dict[int, tuple[int, int]]  # task id -> displayed (width, height)

    @property
    def task_ids(self) -> list[int]:
        return [t["id"] for t in self.tasks]


@pytest.fixture(scope="module")
def project(label_studio: LabelStudio, backend: Backend, image_server: StaticServer) -> Project:
    ls = label_studio
    pid = ls.create_project("Grounded SAM end to end")
    for name, data, content_type, _ in (WIDE_PNG, ROTATED_JPEG):
        ls.upload(pid, name, data, content_type)
    ls.import_urls(pid, [image_server.url + URL_PNG[0]])
    tasks = ls.tasks(pid)
    assert len(tasks) == 3, tasks
    sizes = {t["id"]: size for t, size in zip(tasks, (WIDE_PNG[3], ROTATED_JPEG[3], URL_PNG[3]), strict=True)}
    started = time.perf_counter()
    ml = ls.connect_backend(pid, backend.url, {"prompt": PROJECT_PROMPT})
    TIMINGS["connect_s"] = round(time.perf_counter() - started, 3)
    return Project(pid, ml["id"], tasks, sizes)


def test_tasks_point_at_uploads_and_the_url(project: Project, image_server: StaticServer):
    images = [t["data"]["image"] for t in project.tasks]
    assert images[0].startswith(f"/data/upload/{project.id}/") and images[0].endswith("-wide.png")
    assert images[1].startswith(f"/data/upload/{project.id}/") and images[1].endswith("-rotated.jpg")
    assert images[2] == image_server.url + URL_PNG[0]


def test_backend_is_connected_with_our_model_version(label_studio: LabelStudio, project: Project, backend: Backend):
    ls = label_studio
    rows = ls.json("GET", "/api/ml/", params={"project": project.id})  # LS re-checks /health and /setup here
    assert [r["id"] for r in rows] == [project.ml_backend]
    row = rows[0]
    assert row["state"] == "CO", row
    assert row["is_interactive"] is True
    assert row["model_version"] == MODEL_VERSION  # what our /setup answered
    assert row["extra_params"] == {"prompt": PROJECT_PROMPT}  # stored as the object it was sent as
    # The project's model_version is the backend row's title (protocol doc), not the backend's model_version.
    assert ls.json("GET", f"/api/projects/{project.id}")["model_version"] == row["title"] == "Grounded SAM"
    assert backend.health()["model_version"] == MODEL_VERSION


def test_interactive_text_prompt_gives_boxes_and_masks(label_studio: LabelStudio, project: Project, e2e_stack):
    """Auto-Annotation: the textarea context of the UI, forwarded by LS to /predict; LS stores nothing."""
    ls = label_studio
    TIMINGS["startup_s"] = e2e_stack.startup_s
    round_trips = []
    for task in project.task_ids:
        answer, seconds = ls.interactive(project.ml_backend, task, textarea_context(TEXT_PROMPT))
        round_trips.append(round(seconds, 3))
        assert "errors" not in answer, answer
        regions = answer["data"]["result"]
        kinds = {r["type"] for r in regions}
        assert kinds == {"rectanglelabels", "brushlabels"}, f"task {task}: {kinds}"
        assert len([r for r in regions if r["type"] == "rectanglelabels"]) <= 5  # MAX_DETECTIONS
        assert region_problems(regions, project.sizes[task]) == []
        assert answer["data"]["model_version"] == MODEL_VERSION
        assert ls.predictions(task) == []  # interactive answers are suggestions, never stored
    # The first prediction of each image size is slower (oneDNN builds kernels per input shape): time a repeat too.
    answer, seconds = ls.interactive(project.ml_backend, project.task_ids[0], textarea_context(TEXT_PROMPT))
    assert answer["data"]["result"]
    TIMINGS["interactive_round_trip_first_s"] = round_trips
    TIMINGS["interactive_round_trip_repeat_s"] = round(seconds, 3)
    write_artifact("label_studio_timings.json", TIMINGS)


def retrieve(ls: LabelStudio, project: Project) -> dict[int, list[dict]]:
    """Retrieve Predictions over all tasks; the stored prediction of each task (exactly one)."""
    started = time.perf_counter()
    reply = ls.retrieve_predictions(project.id)
    TIMINGS.setdefault("retrieve_predictions_s", []).append(round(time.perf_counter() - started, 3))
    assert reply["processed_items"] == 3, reply
    stored = {task: ls.predictions(task) for task in project.task_ids}  # the action is synchronous without Redis
    assert all(len(p) == 1 for p in stored.values()), stored
    return {task: p[0] for task, p in stored.items()}


def test_retrieve_predictions_uses_the_project_prompt_then_the_default(
        label_studio: LabelStudio, project: Project, backend: Backend, image_server: StaticServer):
    ls = label_studio
    row = ls.json("GET", f"/api/ml/{project.ml_backend}")
    ls.delete_predictions(project.task_ids)

    # 1. The project's extra-params prompt maps to `cats` only.
    predictions = retrieve(ls, project)
    for task, prediction in predictions.items():
        assert prediction["model_version"] == MODEL_VERSION, prediction
        regions = prediction["result"]
        assert regions, f"task {task}: empty prediction"
        assert region_problems(regions, project.sizes[task]) == []
        assert labels_of(regions) == {"cats"}, f"task {task}"
    # Our service fetched the URL image itself, without LS (at its first prediction of it this session: it keeps a
    # downloaded image for IMAGE_CACHE_SECONDS).
    assert any(path == URL_PNG[0] and "python-requests" in agent for path, agent in image_server.requests)

    # 2. Without the project's prompt the default is the config's label names, "cats. house".
    assert ls.delete_predictions(project.task_ids) == 3
    setups = backend.setups()
    updated = ls.json("PATCH", f"/api/ml/{project.ml_backend}",
                      json={"url": row["url"], "project": project.id, "extra_params": {}})
    assert updated["state"] == "CO" and updated["extra_params"] == {}
    assert backend.setups() > setups, "LS did not call /setup again after the extra params changed"
    predictions = retrieve(ls, project)
    for task, prediction in predictions.items():
        assert region_problems(prediction["result"], project.sizes[task]) == []
    assert set.union(*(labels_of(p["result"]) for p in predictions.values())) == {"cats", "house"}
    write_artifact("label_studio_timings.json", TIMINGS)


def test_extra_params_as_a_json_string(label_studio: LabelStudio, project: Project, backend: Backend):
    """The UI's "Extra params" box sends a string; /setup parses it and refuses malformed JSON (LS shows why)."""
    ls = label_studio
    row = ls.json("GET", f"/api/ml/{project.ml_backend}")
    setups = backend.setups()
    text = '{"prompt": "round thing_cats", "box_threshold": 0.3}'
    updated = ls.json("PATCH", f"/api/ml/{project.ml_backend}",
                      json={"url": row["url"], "project": project.id, "extra_params": text})
    assert updated["state"] == "CO" and updated["extra_params"] == text
    assert backend.setups() > setups
    # LS refuses a row whose /setup fails, but shows only "400 Client Error: BAD REQUEST for url: .../setup",
    # not our answer's message: that one is in our log.
    for bad, reason in (('{"prompt": ', "extra_params is not valid JSON"),
                        ({"promt": "cats"}, "extra_params: unknown key(s) ['promt']")):
        refused = ls.api("PATCH", f"/api/ml/{project.ml_backend}", expect=(400,),
                         json={"url": row["url"], "project": project.id, "extra_params": bad})
        assert "doesn't look like a valid ML backend" in refused.text and "/setup" in refused.text
        assert f"POST /setup -> 400: {reason}" in backend.process.log_text()
    assert ls.json("GET", f"/api/ml/{project.ml_backend}")["extra_params"] == text  # the refused ones were not saved


def test_personal_access_token_with_legacy_tokens_off(
        label_studio: LabelStudio, project: Project, backend: Backend, groundingdino_files, mobile_sam_checkpoint,
        tmp_path_factory):
    """Legacy tokens off for the organisation; a second instance of our service gets a personal access token (a
    JWT refresh token) and still fetches uploads: it exchanges the PAT at /api/token/refresh/ itself."""
    ls = label_studio
    pat = ls.json("POST", "/api/token/")["token"]
    access = ls.json("POST", "/api/token/refresh/", json={"refresh": pat})["access"]
    second = None
    try:
        settings = ls.json("POST", "/api/jwt/settings", json={"api_tokens_enabled": True,
                                                              "legacy_api_tokens_enabled": False})
        assert settings["legacy_api_tokens_enabled"] is False
        ls.use_bearer(access)
        legacy = requests.get(ls.url + "/api/current-user/whoami", headers={"Authorization": f"Token {LS_TOKEN}"},
                              timeout=10)
        assert legacy.status_code == 401, legacy.text
        upload = ls.url + project.tasks[0]["data"]["image"]
        assert requests.get(upload, headers={"Authorization": f"Token {LS_TOKEN}"}, timeout=10).status_code == 401
        assert requests.get(upload, headers={"Authorization": f"Bearer {pat}"}, timeout=10).status_code == 401
        assert requests.get(upload, headers={"Authorization": f"Bearer {access}"}, timeout=10).status_code == 200

        second = start_backend("grounded-sam-pat", groundingdino_files, mobile_sam_checkpoint, ls.url, pat,
                               tmp_path_factory.mktemp("backend-pat-data"))
        wait_models(second)
        moved = ls.json("PATCH", f"/api/ml/{project.ml_backend}", json={"url": second.url, "project": project.id})
        assert moved["state"] == "CO"
        ls_log = len(ls.process.log_text())
        for task in project.task_ids[:2]:  # the two uploads: regions only if the image was fetched
            answer, _ = ls.interactive(project.ml_backend, task, textarea_context(TEXT_PROMPT))
            assert "errors" not in answer, answer
            regions = answer["data"]["result"]
            assert regions and region_problems(regions, project.sizes[task]) == []
        # Our service exchanged the PAT for an access token itself (the LS log shows its refresh call).
        assert '"POST /api/token/refresh/ HTTP/1.1" 200' in ls.process.log_text()[ls_log:]
        log = second.process.log_text()
        assert pat not in log and access not in log
    finally:
        try:
            # Leave the project and the organisation as the other tests expect them: our first service, legacy on.
            ls.use_bearer(ls.json("POST", "/api/token/refresh/", json={"refresh": pat})["access"])
            ls.json("PATCH", f"/api/ml/{project.ml_backend}", json={"url": backend.url, "project": project.id})
            ls.json("POST", "/api/jwt/settings", json={"api_tokens_enabled": True, "legacy_api_tokens_enabled": True})
            ls.use_legacy_token()
        finally:
            if second is not None:
                second.process.stop()  # also checks its port is closed
    assert ls.json("GET", "/api/current-user/whoami")["email"]


POLYGON_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1" showSubmitButton="true"/>
  <PolygonLabels name="outline" toName="image">
    <Label value="cats" background="yellow"/>
    <Label value="house" background="blue"/>
  </PolygonLabels>
</View>"""


def test_polygon_labels_are_suggested_and_stored(label_studio: LabelStudio, backend: Backend):
    """A PolygonLabels config: Auto-Annotation suggests polygons, and Retrieve Predictions stores them."""
    ls = label_studio
    pid = ls.create_project("Grounded SAM polygons", POLYGON_CONFIG)
    name, data, content_type, _ = WIDE_PNG
    ls.upload(pid, name, data, content_type)
    (task,) = ls.tasks(pid)
    ml = ls.connect_backend(pid, backend.url, {"prompt": TEXT_PROMPT})
    assert ml["state"] == "CO", ml
    answer, _ = ls.interactive(ml["id"], task["id"], textarea_context(TEXT_PROMPT))
    assert "errors" not in answer, answer
    reply = ls.retrieve_predictions(pid)
    assert reply["processed_items"] == 1, reply
    (stored,) = ls.predictions(task["id"])
    for regions in (answer["data"]["result"], stored["result"]):
        assert regions and {(r["type"], r["from_name"], r["to_name"]) for r in regions} == {
            ("polygonlabels", "outline", "image")}
        assert labels_of(regions) <= {"cats", "house"}
        for region in regions:
            points = np.asarray(region["value"]["points"])
            assert points.ndim == 2 and points.shape[1] == 2 and len(points) >= 3, region["value"]
            assert ((0 <= points) & (points <= 100)).all() and region["value"]["closed"] is True
    assert stored["model_version"] == MODEL_VERSION and stored["result"][0]["score"] > 0


def test_predict_time_budget_spreads_a_batch_over_several_retrieves(
        label_studio: LabelStudio, groundingdino_files, mobile_sam_checkpoint, tmp_path_factory):
    """A backend whose PREDICT_TIME_BUDGET allows one task per answer: each Retrieve Predictions stores one more
    prediction, because Label Studio stores nothing for a task answered with [] and sends it again next time."""
    ls = label_studio
    slow = start_backend("grounded-sam-budget", groundingdino_files, mobile_sam_checkpoint, ls.url, LS_TOKEN,
                         tmp_path_factory.mktemp("budget-backend-data"), PREDICT_TIME_BUDGET="0.001",
                         BACKGROUND_PREDICTIONS="false")
    try:
        wait_models(slow)
        pid = ls.create_project("Grounded SAM budget")
        for name, data, content_type, _ in (WIDE_PNG, ROTATED_JPEG, CLICK_PNG):
            ls.upload(pid, name, data, content_type)
        tasks = [t["id"] for t in ls.tasks(pid)]
        ls.connect_backend(pid, slow.url, {"prompt": TEXT_PROMPT})
        stored = []
        for _ in range(4):
            ls.retrieve_predictions(pid)
            stored.append(sum(len(ls.predictions(task)) for task in tasks))
        assert stored == [1, 2, 3, 3], stored
        assert all(p["result"] for task in tasks for p in ls.predictions(task))
    finally:
        stop_all([slow.process])


@dataclass
class ClickProject:
    id: int
    ml_backend: int
    task: int
    size: tuple[int, int]  # displayed (width, height)


@pytest.fixture(scope="module")
def click_project(label_studio: LabelStudio, backend: Backend) -> ClickProject:
    """A second project, with smart KeyPointLabels and RectangleLabels next to the README config's controls."""
    ls = label_studio
    pid = ls.create_project("Grounded SAM clicks", SMART_CONFIG)
    name, data, content_type, size = CLICK_PNG
    ls.upload(pid, name, data, content_type)
    (task,) = ls.tasks(pid)
    ml = ls.connect_backend(pid, backend.url, {})
    assert ml["state"] == "CO", ml
    return ClickProject(pid, ml["id"], task["id"], size)


def smart_keypoint(x: float, y: float, size: tuple[int, int], is_positive: bool | None = True) -> dict:
    """A smart keypoint region as the labeling UI sends it: percent of the displayed image; Alt-click sends
    is_positive false, and some positive clicks come without is_positive."""
    width, height = size
    region = {"original_width": width, "original_height": height, "image_rotation": 0,
              "value": {"x": x, "y": y, "width": 0.6, "keypointlabels": ["cats"]},
              "id": f"kp{x:g}-{y:g}", "from_name": "click", "to_name": "image", "type": "keypointlabels",
              "origin": "manual"}
    if is_positive is not None:
        region["is_positive"] = is_positive
    return region


def smart_rectangle(x: float, y: float, w: float, h: float, size: tuple[int, int]) -> dict:
    width, height = size
    return {"original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": ["cats"]},
            "id": "smartbox1", "from_name": "smartbox", "to_name": "image", "type": "rectanglelabels",
            "origin": "manual"}


def test_smart_clicks_give_one_brush_and_reuse_the_embedding(
        label_studio: LabelStudio, click_project: ClickProject, backend: Backend):
    """Smart keypoints and a smart rectangle, as the UI sends them through LS's interactive-annotating: one brush
    mask each. The image is encoded at the first click only: the next ones hit the embedding cache.

    Last in the module: its entries push older images out of the bounded cache (EMBEDDING_CACHE_SIZE), which would
    slow the Retrieve Predictions steps above and blur their timings."""
    from label_studio_sdk.converter import brush

    ls, p = label_studio, click_project
    width, height = p.size
    steps = {
        "one_keypoint": [smart_keypoint(30, 40, p.size)],
        "positive_and_negative_keypoints": [smart_keypoint(30, 40, p.size, is_positive=None),
                                            smart_keypoint(75, 70, p.size, is_positive=False)],
        "smart_rectangle": [smart_rectangle(18, 10, 24, 65, p.size)],
    }
    round_trips, cache = {}, []
    for step, regions in steps.items():
        before = backend.health()["embedding_cache"]
        answer, seconds = ls.interactive(p.ml_backend, p.task, {"result": regions})
        after = backend.health()["embedding_cache"]
        round_trips[step] = round(seconds, 3)
        cache.append({"hits": after["hits"] - before["hits"], "misses": after["misses"] - before["misses"]})
        assert "errors" not in answer, f"{step}: {answer}"
        assert answer["data"]["model_version"] == MODEL_VERSION
        (region,) = answer["data"]["result"]  # exactly one region: the mask (the click already is the region)
        assert (region["type"], region["from_name"], region["to_name"]) == ("brushlabels", "label2", "image"), step
        assert region["value"]["brushlabels"] == ["cats"], step
        assert (region["original_width"], region["original_height"]) == (width, height), step
        decoded = np.asarray(brush.decode_rle(region["value"]["rle"]))
        assert decoded.size == width * height * 4, f"{step}: RLE of {decoded.size} values, not {width}x{height}x4"
        assert decoded.reshape(height, width, 4)[:, :, 3].any(), f"{step}: empty mask"
        assert region_problems([region], p.size) == []
    TIMINGS["click_round_trip_s"] = round_trips
    TIMINGS["click_embedding_cache"] = cache
    write_artifact("label_studio_timings.json", TIMINGS)
    # The first click downloads the image and runs SAM's image encoder (two cache misses); the next ones find
    # both in the cache: hits only.
    assert cache[0]["misses"] >= 1, cache
    for step, delta in zip(list(steps)[1:], cache[1:], strict=True):
        assert delta["misses"] == 0 and delta["hits"] >= 1, f"{step} re-encoded the image: {cache}"
    assert ls.predictions(p.task) == []  # suggestions, never stored

    # The TextArea prompt still works in the same config, and reuses the image's SAM embedding.
    before = backend.health()["embedding_cache"]
    answer, seconds = ls.interactive(p.ml_backend, p.task, textarea_context(TEXT_PROMPT))
    TIMINGS["click_project_text_prompt_s"] = round(seconds, 3)
    write_artifact("label_studio_timings.json", TIMINGS)
    assert "errors" not in answer, answer
    regions = answer["data"]["result"]
    assert {r["type"] for r in regions} == {"rectanglelabels", "brushlabels"}
    assert {r["from_name"] for r in regions} == {"label", "label2"}  # the README config's controls, not the smart ones
    assert region_problems(regions, p.size) == []
    # Hits for the image and its SAM embedding at least (Grounding DINO's features of it are new: misses).
    assert backend.health()["embedding_cache"]["hits"] >= before["hits"] + 2
