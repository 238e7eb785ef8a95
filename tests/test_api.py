"""Protocol tests: Label Studio's exact payloads against the real app, with fake models.

The fakes stand in for Grounding DINO and SAM only; prompt parsing, label mapping, image
fetching, region building and the HTTP layer are the real ones. The real models are covered
by test_dino.py, test_sam_wrapper.py and test_e2e_gunicorn.py.
"""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
from conftest import metric_samples
from fakes import FakeDetector, FakeLoader, FakeSegmenter
from label_studio_sdk.converter import brush
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST
from servers import ImageServer
from test_labeling import GUIDE_CONFIG

from _wsgi import create_backend_app
from cache import EmbeddingCache
from heap import heap_stats
from loader import Models


def png(width, height, color=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, "PNG")
    return out.getvalue()


@pytest.fixture
def images():
    files = {"/data/upload/1/aa-cat.png": png(64, 48), "/plain/house.png": png(40, 30),
             "/data/upload/1/bb.png": png(32, 32)}
    with ImageServer(files, token="ls-token") as server:
        yield server


@pytest.fixture
def make_client(tmp_path, images):
    def make(**env):
        env = {"DATA_DIR": str(tmp_path / "data"), "LABEL_STUDIO_URL": images.url, "LABEL_STUDIO_API_KEY": "ls-token",
               **env}
        loader = FakeLoader()
        app = create_backend_app(env, loader=loader)
        client = app.test_client()
        client.loader = loader
        return client
    return make


@pytest.fixture
def client(make_client):
    return make_client()


def setup_payload(extra_params=None, schema=GUIDE_CONFIG):
    return {"project": "1.1700000000", "schema": schema, "hostname": "http://localhost:8080",
            "access_token": "creator-token", "extra_params": extra_params}


def predict_payload(tasks, context=None, label_config=GUIDE_CONFIG):
    return {"tasks": tasks, "project": "1.1700000000", "label_config": label_config,
            "params": {"login": None, "password": None, "context": context}}


def task(tid=1, url="/data/upload/1/aa-cat.png"):
    return {"id": tid, "data": {"image": url}, "annotations": [], "predictions": [], "drafts": []}


TEXTAREA_CONTEXT = {"result": [{"value": {"text": ["brown cat_cats. house"]}, "id": "VliPI9QKLV", "from_name": "prompt",
                                "to_name": "image", "type": "textarea", "origin": "manual"}]}


def decode_mask(region) -> np.ndarray:
    h, w = region["original_height"], region["original_width"]
    return np.reshape(brush.decode_rle(region["value"]["rle"]), (h, w, 4))[:, :, 3] > 0


def test_health_answers_fast_with_load_state(client):
    started = time.perf_counter()
    response = client.get("/health")
    assert time.perf_counter() - started < 1.0
    assert response.status_code == 200
    assert response.json == {"status": "UP", "models": "ready", "model_version": "fake-dino+fake-sam"}


@pytest.mark.parametrize("extra", [None, "", {"prompt": "cat", "box_threshold": 0.5},
                                   '{"prompt": "cat", "box_threshold": 0.5}'])
def test_setup_accepts_object_and_string_extra_params(client, extra):
    response = client.post("/setup", json=setup_payload(extra))
    assert response.status_code == 200, response.json
    assert response.json == {"model_version": "fake-dino+fake-sam"}


@pytest.mark.parametrize(
    "extra, status, message",
    [
        ('{"prompt": "cat"', 400, "extra_params is not valid JSON"),
        ("[1, 2]", 400, "extra_params must be a JSON object"),
        ({"box_treshold": 0.5}, 400, "unknown key(s) ['box_treshold']"),
        ({"box_threshold": 2}, 400, "extra_params.box_threshold must be a number between 0.0 and 1.0"),
        ({"max_detections": 2.5}, 400, "extra_params.max_detections must be a whole number"),
        ({"sam3_score_threshold": "high"}, 400,
         "extra_params.sam3_score_threshold must be a number between 0.0 and 1.0, got 'high'"),
        ({"prompt": 3}, 400, "extra_params.prompt must be a string"),
        ({"label_thresholds": {"dogs": {"box_threshold": 0.2}}}, 400,
         "extra_params.label_thresholds names label(s) the labeling config lacks: 'dogs'; its labels: cats, house"),
        ({"label_thresholds": {"house": {"box_threshold": 1.5}}}, 400,
         "extra_params.label_thresholds.house.box_threshold must be a number between 0.0 and 1.0, got 1.5"),
        ({"label_thresholds": {"house": {"box_treshold": 0.5}}}, 400,
         "extra_params.label_thresholds.house must be an object of one or more of box_threshold, text_threshold, "
         "sam3_score_threshold"),
        ({"label_thresholds": {"house": 0.5}}, 400, "extra_params.label_thresholds.house must be an object"),
        ({"label_thresholds": [0.5]}, 400, "extra_params.label_thresholds must be an object of label"),
    ],
)
def test_setup_rejects_bad_extra_params(client, extra, status, message):
    response = client.post("/setup", json=setup_payload(extra))
    assert response.status_code == status
    assert message in response.json["error"]


@pytest.mark.parametrize(
    "schema, message",
    [("<View><Image name='i' value='$i'/>", "not valid XML"),
     ("<View><Image name='i' value='$i'/><Choices name='c' toName='i'><Choice value='a'/></Choices></View>",
      "no <RectangleLabels>, <BrushLabels> or <PolygonLabels>")],
)
def test_setup_and_predict_reject_unusable_configs(client, schema, message):
    response = client.post("/setup", json=setup_payload(schema=schema))
    assert response.status_code == 422 and message in response.json["error"]
    response = client.post("/predict", json=predict_payload([task()], label_config=schema))
    assert response.status_code == 422 and message in response.json["error"]


def test_predict_with_textarea_context(client, images):
    response = client.post("/predict", json=predict_payload([task()], TEXTAREA_CONTEXT))
    assert response.status_code == 200, response.json
    (result,) = response.json["results"]
    regions = result["result"]
    rects = [r for r in regions if r["type"] == "rectanglelabels"]
    brushes = [r for r in regions if r["type"] == "brushlabels"]
    assert [r["value"]["rectanglelabels"] for r in rects] == [["cats"], ["house"]]
    assert [r["value"]["brushlabels"] for r in brushes] == [["cats"], ["house"]]
    assert {r["from_name"] for r in rects} == {"label"} and {r["from_name"] for r in brushes} == {"label2"}
    assert all(r["to_name"] == "image" and r["image_rotation"] == 0 for r in regions)
    assert all((r["original_width"], r["original_height"]) == (64, 48) for r in regions)
    assert len({r["id"] for r in regions}) == len(regions)
    assert result["score"] == pytest.approx(np.mean([r["score"] for r in regions]), abs=1e-4)
    assert result["model_version"] == "fake-dino+fake-sam"
    # The first box covers x 6.4..19.2, y 4.8..28.8 of the 64x48 image: percent and mask agree.
    assert rects[0]["value"]["x"] == pytest.approx(10.0) and rects[0]["value"]["width"] == pytest.approx(20.0)
    mask = decode_mask(brushes[0])
    assert mask.shape == (48, 64)
    ys, xs = np.nonzero(mask)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (6, 18, 4, 27)
    # The upload went to Label Studio with the service's token.
    assert ("/data/upload/1/aa-cat.png", "Token ls-token") in images.requests
    assert client.loader.models.detector.calls[-1][0] == ["brown cat", "house"]


def test_dino_support_batch_context_predicts_every_task(client, images):
    context = {"result": [{"value": {"text": ["house"]}}]}
    tasks = [task(1), task(2, images.url + "/plain/house.png"), task(3, "/data/upload/1/bb.png")]
    response = client.post("/predict", json=predict_payload(tasks, context))
    results = response.json["results"]
    assert len(results) == 3
    sizes = [(r["result"][0]["original_width"], r["result"][0]["original_height"]) for r in results]
    assert sizes == [(64, 48), (40, 30), (32, 32)]
    assert all(r["result"][0]["value"]["rectanglelabels"] == ["house"] for r in results)


def test_context_null_uses_project_prompt_then_label_names(client):
    response = client.post("/predict", json=predict_payload([task()], None))
    assert client.loader.models.detector.calls[-1][0] == ["cats", "house"]  # the config's labels
    assert len(response.json["results"][0]["result"]) == 4
    client.post("/setup", json=setup_payload({"prompt": "round thing_cats", "box_threshold": 0.5}))
    client.post("/predict", json=predict_payload([task()], None))
    assert client.loader.models.detector.calls[-1] == (["round thing"], [0.5])


def test_label_thresholds_gate_their_labels_detections(client):
    """A label's own box threshold over the project's: each phrase is gated by its label's."""
    client.post("/setup", json=setup_payload({"prompt": "round thing_cats. house", "box_threshold": 0.5,
                                              "label_thresholds": {"house": {"box_threshold": 0.85}}}))
    response = client.post("/predict", json=predict_payload([task()], None))
    assert client.loader.models.detector.calls[-1] == (["round thing", "house"], [0.5, 0.85])
    labels = {r["value"].get("rectanglelabels", r["value"].get("brushlabels", [None]))[0]
              for r in response.json["results"][0]["result"]}
    assert labels == {"cats"}  # house scored 0.8: under its 0.85, over the project's 0.5


def test_textarea_context_wins_over_project_prompt(client):
    client.post("/setup", json=setup_payload({"prompt": "house"}))
    client.post("/predict", json=predict_payload([task()], TEXTAREA_CONTEXT))
    assert client.loader.models.detector.calls[-1][0] == ["brown cat", "house"]


def test_other_regions_in_context_are_not_the_prompt(client):
    """The prompt is the TextArea's region, not blindly result[0]."""
    context = {"result": [
        {"from_name": "label", "to_name": "image", "type": "rectanglelabels",
         "value": {"x": 1, "y": 1, "width": 2, "height": 2, "rectanglelabels": ["cats"]}},
        {"from_name": "other_text", "type": "textarea", "value": {"text": ["tree"]}},
        TEXTAREA_CONTEXT["result"][0],
    ]}
    client.post("/predict", json=predict_payload([task()], context))
    assert client.loader.models.detector.calls[-1][0] == ["brown cat", "house"]


def test_empty_default_prompt_turns_prediction_without_prompt_off(make_client):
    client = make_client(DEFAULT_PROMPT="")
    response = client.post("/predict", json=predict_payload([task(), task(2)], None))
    assert response.json["results"] == [{"result": [], "score": 0.0, "model_version": "fake-dino+fake-sam"}] * 2
    assert client.loader.models.detector.calls == []


def test_default_prompt_variable(make_client):
    client = make_client(DEFAULT_PROMPT="tabby_cats")
    client.post("/predict", json=predict_payload([task()], None))
    assert client.loader.models.detector.calls[-1][0] == ["tabby"]


def test_boxes_only_config_skips_segmenter(client):
    schema = """<View><Image name="image" value="$image"/>
      <RectangleLabels name="label" toName="image"><Label value="cats"/></RectangleLabels></View>"""
    response = client.post("/predict", json=predict_payload([task()], None, label_config=schema))
    assert [r["type"] for r in response.json["results"][0]["result"]] == ["rectanglelabels"]
    assert client.loader.models.segmenter.calls == 0


def test_brush_only_config(client):
    schema = """<View><Image name="image" value="$image"/>
      <BrushLabels name="masks" toName="image"><Label value="cats"/></BrushLabels></View>"""
    response = client.post("/predict", json=predict_payload([task()], None, label_config=schema))
    (region,) = response.json["results"][0]["result"]
    assert (region["type"], region["from_name"], region["value"]["brushlabels"]) == ("brushlabels", "masks", ["cats"])


POLYGON_CONFIG = """<View><Image name="image" value="$image"/>
  <TextArea name="prompt" toName="image"/>
  <PolygonLabels name="outline" toName="image"><Label value="cats"/><Label value="house"/></PolygonLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="house"/></KeyPointLabels></View>"""


def test_polygon_config_gets_the_masks_as_polygons(client):
    response = client.post("/predict", json=predict_payload([task()], TEXTAREA_CONTEXT, label_config=POLYGON_CONFIG))
    regions = response.json["results"][0]["result"]
    assert [(r["type"], r["from_name"], r["value"]["polygonlabels"]) for r in regions] == [
        ("polygonlabels", "outline", ["cats"]), ("polygonlabels", "outline", ["house"])]
    assert client.loader.models.segmenter.calls == 1
    # The fake mask of phrase 0 is its box, pixels x 6..18, y 4..27 of the 64x48 image: the polygon's corners
    # are those pixels' centres, in percent.
    xs, ys = zip(*regions[0]["value"]["points"], strict=True)
    assert (min(xs), max(xs)) == (6.5 * 100 / 64, 18.5 * 100 / 64)
    assert (min(ys), max(ys)) == (4.5 * 100 / 48, 27.5 * 100 / 48)
    assert regions[0]["value"]["closed"] is True and regions[0]["score"] == 0.9


def test_a_click_in_a_polygon_config_gets_a_polygon(client):
    response = client.post("/predict", json=predict_payload(
        [task()], {"result": [keypoint(50, 50, label="house")]}, label_config=POLYGON_CONFIG))
    (region,) = response.json["results"][0]["result"]
    assert (region["type"], region["value"]["polygonlabels"], region["score"]) == ("polygonlabels", ["house"], 0.875)
    xs, ys = zip(*region["value"]["points"], strict=True)  # the fake's 5x5 square around pixel (32, 24)
    assert (min(xs), max(xs), min(ys), max(ys)) == (30.5 * 100 / 64, 34.5 * 100 / 64, 22.5 * 100 / 48, 26.5 * 100 / 48)


class SlowDetector(FakeDetector):
    def detect(self, *args, **kwargs):
        time.sleep(0.2)
        return super().detect(*args, **kwargs)


@pytest.mark.parametrize("budget, predicted", [("0.3", 1), ("0", 3), ("60", 3)])
def test_predict_time_budget_leaves_the_last_tasks_without_prediction(make_client, budget, predicted):
    client = make_client(PREDICT_TIME_BUDGET=budget, BACKGROUND_PREDICTIONS="false")
    client.loader.models = Models(SlowDetector(), FakeSegmenter(), EmbeddingCache(4, 2**20))
    response = client.post("/predict", json=predict_payload([task(1), task(2), task(3)], TEXTAREA_CONTEXT))
    results = response.json["results"]
    assert len(results) == 3
    # After one 0.2 s task, a second would end at ~0.4 s, past a 0.3 s budget: the others get [] (no prediction).
    assert all(r["result"] for r in results[:predicted]) and results[predicted:] == [[]] * (3 - predicted)
    assert len(client.loader.models.detector.calls) == predicted


def test_a_batch_dropped_at_its_deadline_answers_the_tasks_it_predicted(make_client):
    """Retrieve Predictions over 4 tasks of 0.2 s each, within a budget of 60 s but a REQUEST_DEADLINE of 0.5 s: a
    pass that would end past the deadline is dropped, yet the predictions made before it are answered."""
    client = make_client(REQUEST_DEADLINE="0.5", PREDICT_TIME_BUDGET="60", BACKGROUND_PREDICTIONS="false")
    client.loader.models = Models(SlowDetector(), FakeSegmenter(), EmbeddingCache(4, 2**20))
    response = client.post("/predict", json=predict_payload([task(i) for i in range(1, 5)], None))
    assert response.status_code == 200, response.json
    results = response.json["results"]
    predicted = [r for r in results if r]
    assert results[0]["result"] and results[-1] == [] and predicted == results[: len(predicted)]
    assert len(client.loader.models.detector.calls) == len(predicted)  # the dropped pass never ran
    assert client.get("/status").json["queue"]["refused"] == {"deadline passed": 1}


def test_one_bad_task_does_not_lose_the_others(client, images):
    tasks = [task(1), {"id": 2, "data": {"text": "no image"}}, task(3, "/data/upload/1/missing.png"),
             task(4, "s3://bucket/x.png"), task(5, images.url + "/plain/house.png")]
    response = client.post("/predict", json=predict_payload(tasks, TEXTAREA_CONTEXT))
    assert response.status_code == 200
    counts = [len(r["result"]) for r in response.json["results"]]
    assert counts == [4, 0, 0, 0, 4]


@pytest.mark.parametrize(
    "body, message",
    [
        (b"{not json", "request body is not valid JSON"),
        (b"", "request body is empty"),
        (b"[1, 2]", "request body must be a JSON object"),
        (json.dumps({"tasks": {"id": 1}}).encode(), "'tasks' must be a list"),
        (json.dumps({"tasks": [1, 2]}).encode(), "tasks [0, 1] are not JSON objects"),
        (json.dumps(predict_payload([task()], "text")).encode(), "'params.context' must be an object"),
        (json.dumps(predict_payload([task()], {"result": [{"from_name": "prompt", "value": {"text": ["dog_dogs"]}}]}))
         .encode(), "label 'dogs' is not in the labeling config"),
    ],
)
def test_bad_predict_requests_get_json_4xx_and_the_next_one_works(client, body, message):
    response = client.post("/predict", data=body, content_type="application/json")
    assert 400 <= response.status_code < 500
    assert message in response.json["error"]
    good = client.post("/predict", json=predict_payload([task()], TEXTAREA_CONTEXT))
    assert good.status_code == 200 and len(good.json["results"][0]["result"]) == 4


def test_upload_fetched_with_token_from_setup_when_env_has_none(make_client, images):
    client = make_client(LABEL_STUDIO_URL="", LABEL_STUDIO_API_KEY="")
    payload = setup_payload()
    payload.update(hostname=images.url, access_token="ls-token")
    assert client.post("/setup", json=payload).status_code == 200
    response = client.post("/predict", json=predict_payload([task()], None))
    assert len(response.json["results"][0]["result"]) == 4


def test_webhook_and_metrics(client):
    response = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 1},
                                             "task": {"id": 1}, "annotation": {"id": 1}})
    assert response.status_code == 201
    client.post("/predict", json=predict_payload([task()], None))
    client.post("/predict", json=predict_payload([task()], TEXTAREA_CONTEXT))
    client.post("/predict", data=b"{not json", content_type="application/json")
    response = client.get("/metrics")
    assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST  # Prometheus' text format
    metrics = metric_samples(response.get_data(as_text=True))
    assert metrics["grounded_sam_webhooks_total"] == 1 and metrics["grounded_sam_predicted_tasks_total"] == 2
    assert metrics["grounded_sam_errors_total{status=400}"] == 1
    # Latency by route, the kind the scheduler ran it as, and status.
    assert metrics["grounded_sam_request_seconds_count{kind=batch,route=/predict,status=200}"] == 1
    assert metrics["grounded_sam_request_seconds_count{kind=prompt,route=/predict,status=200}"] == 1
    assert metrics["grounded_sam_request_seconds_count{kind=,route=/predict,status=400}"] == 1
    assert metrics["grounded_sam_request_seconds_count{kind=,route=/webhook,status=201}"] == 1
    # Each prompt: a detector and a segmenter pass through the scheduler, their waits and times.
    assert metrics["grounded_sam_model_pass_seconds_count{kind=prompt,model=detector}"] == 1
    assert metrics["grounded_sam_model_pass_seconds_count{kind=batch,model=segmenter}"] == 1
    assert metrics["grounded_sam_queue_wait_seconds_count{kind=prompt}"] == 2
    assert metrics["grounded_sam_queue_admitted{kind=prompt}"] == 0
    assert metrics["grounded_sam_model_passes_running"] == 0
    assert metrics["process_resident_memory_bytes"] > 0
    if heap_stats() is not None:  # glibc
        assert metrics["grounded_sam_heap_in_use_bytes"] > 2**20 and "grounded_sam_heap_free_bytes" in metrics
    assert metrics["grounded_sam_cache_max_bytes"] == 2**20 and metrics["grounded_sam_cache_entries"] >= 1


def basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_basic_auth_guards_every_route_but_health(make_client):
    client = make_client(BASIC_AUTH_USER="ls", BASIC_AUTH_PASS="s3cret")
    assert client.get("/health").status_code == 200
    for method, path in [("post", "/setup"), ("post", "/predict"), ("post", "/webhook"), ("get", "/metrics")]:
        response = getattr(client, method)(path, json={})
        assert response.status_code == 401 and "authentication required" in response.json["error"]
        wrong = getattr(client, method)(path, json={}, headers=basic("ls", "nope"))
        assert wrong.status_code == 401
    ok = client.post("/setup", json=setup_payload(), headers=basic("ls", "s3cret"))
    assert ok.status_code == 200


def test_failed_model_load_answers_503_naming_variable_and_file(tmp_path):
    app = create_backend_app({"DATA_DIR": str(tmp_path), "GROUNDINGDINO_CHECKPOINT": str(tmp_path / "nope.pth"),
                              "MODEL_LOAD_WAIT": "10"})
    client = app.test_client()
    response = client.post("/predict", json=predict_payload([task()], None))
    assert response.status_code == 503
    assert f"GROUNDINGDINO_CHECKPOINT={tmp_path / 'nope.pth'}: file not found" in response.json["error"]
    health = client.get("/health").json
    assert health["models"] == "failed" and "GROUNDINGDINO_CHECKPOINT" in health["error"]


SMART_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1" showSubmitButton="true"/>
  <RectangleLabels name="label" toName="image"><Label value="cats"/><Label value="house"/></RectangleLabels>
  <RectangleLabels name="smartbox" toName="image" smart="true">
    <Label value="cats"/><Label value="house"/>
  </RectangleLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="cat"/><Label value="house"/></KeyPointLabels>
  <BrushLabels name="label2" toName="image"><Label value="cats"/><Label value="house"/></BrushLabels>
</View>"""


def keypoint(x, y, label="cat", is_positive=None):
    """A smart keypoint region as Label Studio's UI sends it (is_positive is sometimes missing)."""
    region = {"original_width": 64, "original_height": 48, "image_rotation": 0,
              "value": {"x": x, "y": y, "width": 0.6, "keypointlabels": [label]},
              "id": f"kp{x}", "from_name": "kp", "to_name": "image", "type": "keypointlabels", "origin": "manual"}
    if is_positive is not None:
        region["is_positive"] = is_positive
    return region


def smart_box(x, y, w, h, label="house"):
    return {"original_width": 64, "original_height": 48, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label]},
            "id": "box1", "from_name": "smartbox", "to_name": "image", "type": "rectanglelabels", "origin": "manual"}


def click_request(client, regions):
    return client.post("/predict", json=predict_payload([task()], {"result": regions}, label_config=SMART_CONFIG))


@pytest.mark.parametrize(
    "regions, points, labels, box, label",
    [
        ([keypoint(25, 50, is_positive=True)], [[16, 24]], [1], None, "cats"),  # 'cat' -> brush label 'cats'
        ([keypoint(25, 50), keypoint(50, 25, is_positive=False), keypoint(75, 75, is_positive=True)],
         [[16, 24], [32, 12], [48, 36]], [1, 0, 1], None, "cats"),
        ([smart_box(12.5, 25, 50, 50)], [], [], [8, 12, 40, 36], "house"),
        ([smart_box(12.5, 25, 50, 50), keypoint(25, 50, label="house")], [[16, 24]], [1], [8, 12, 40, 36], "house"),
    ],
)
def test_smart_clicks_and_boxes_become_one_sam_prompt(client, regions, points, labels, box, label):
    response = click_request(client, regions)
    assert response.status_code == 200, response.json
    (region,) = response.json["results"][0]["result"]
    assert (region["type"], region["from_name"], region["to_name"]) == ("brushlabels", "label2", "image")
    assert region["value"]["brushlabels"] == [label] and region["score"] == 0.875
    assert decode_mask(region).shape == (48, 64)
    assert client.loader.models.segmenter.prompts == [(points, labels, box)]
    assert client.loader.models.detector.calls == []  # a smart rectangle never runs Grounding DINO


def test_click_mask_lands_where_clicked(client):
    response = click_request(client, [keypoint(50, 50)])
    ys, xs = np.nonzero(decode_mask(response.json["results"][0]["result"][0]))
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (30, 34, 22, 26)  # 5x5 around pixel (32, 24)


def test_textarea_result_takes_the_text_path_in_a_smart_config(client):
    context = {"result": [{"value": {"text": ["house"]}, "from_name": "prompt", "to_name": "image",
                           "type": "textarea", "origin": "manual"}]}
    response = client.post("/predict", json=predict_payload([task()], context, label_config=SMART_CONFIG))
    assert {r["type"] for r in response.json["results"][0]["result"]} == {"rectanglelabels", "brushlabels"}
    assert client.loader.models.segmenter.prompts == []
    assert client.loader.models.detector.calls[-1][0] == ["house"]


@pytest.mark.parametrize(
    "regions, message",
    [
        ([keypoint(25, 50, label="tree")], "clicked label 'tree' has no BrushLabels or PolygonLabels label"),
        ([{**keypoint(25, 50), "value": {"keypointlabels": ["cat"]}}], "has no usable x/y"),
        ([{**keypoint(25, 50), "value": {"x": 1, "y": 2}}], "carries no label"),
    ],
)
def test_bad_clicks_get_4xx(client, regions, message):
    response = click_request(client, regions)
    assert 400 <= response.status_code < 500 and message in response.json["error"]


def test_clicks_without_a_segmenter_get_422(make_client):
    client = make_client()
    client.loader.models = Models(FakeDetector(), None, EmbeddingCache(1, 1))
    response = click_request(client, [keypoint(25, 50)])
    assert response.status_code == 422 and "USE_MOBILE_SAM" in response.json["error"]


def test_a_refused_setup_stores_nothing(client):
    assert client.post("/setup", json=setup_payload({"prompt": "house"})).status_code == 200
    assert client.post("/setup", json=setup_payload({"prompt": "cat", "box_threshold": 7})).status_code == 400
    client.post("/predict", json=predict_payload([task()], None))
    assert client.loader.models.detector.calls[-1][0] == ["house"]


@pytest.mark.parametrize("seconds, fetches", [("300", 1), ("0", 3)])
def test_a_series_of_clicks_fetches_the_image_once(make_client, images, seconds, fetches):
    client = make_client(IMAGE_CACHE_SECONDS=seconds)
    for x in (20, 40, 60):
        assert click_request(client, [keypoint(x, 50)]).status_code == 200
    assert [path for path, _ in images.requests].count("/data/upload/1/aa-cat.png") == fetches


@pytest.mark.parametrize(
    "regions, message",
    [
        ([keypoint(120, 50)], "context region 'kp120' (keypointlabels): x=120 is outside the image"),
        ([keypoint(25, -3)], "context region 'kp25' (keypointlabels): y=-3 is outside the image"),
        ([smart_box(10, 10, 0, 20)], "context region 'box1' (rectanglelabels): the rectangle x=10 y=10 width=0"),
        ([smart_box(10, 10, 20, -5)], "height=-5 is outside the image"),
        ([smart_box(90, 10, 20, 20)], "is empty or runs outside the image"),
        ([smart_box(10, 10, 20, 20), keypoint(101, 5, label="house")], "context region 'kp101'"),
    ],
)
def test_clicks_and_boxes_outside_the_image_get_422_naming_the_region(client, regions, message):
    response = click_request(client, regions)
    assert response.status_code == 422 and message in response.json["error"], response.json
    assert client.loader.models.segmenter.prompts == [] and client.loader.models.detector.calls == []


@pytest.mark.parametrize(
    "regions",
    [
        [{"id": "r1", "from_name": "kp", "type": "keypointlabels"}],  # no value
        [{"id": "r2", "from_name": "label", "type": "rectanglelabels",  # not a smart tool
          "value": {"x": 1, "y": 1, "width": 2, "height": 2, "rectanglelabels": ["cats"]}}],
        [{"id": "r3", "from_name": "prompt", "type": "textarea", "value": {"text": ["  "]}}],  # an empty prompt
        [{"id": "r4", "type": "choices", "value": {"choices": ["a"]}}, "not a region"],
    ],
)
def test_a_context_with_no_usable_region_gets_422_not_the_default_prompt(client, regions):
    response = click_request(client, regions)
    assert response.status_code == 422, response.json
    assert f"holds {len(regions)} region(s)" in response.json["error"]
    assert "none this service can use" in response.json["error"]
    assert client.loader.models.detector.calls == [] and client.loader.models.segmenter.prompts == []


def test_every_domain_error_has_its_status():
    import inspect

    import api
    import errors
    from images import ImageError

    expected = {errors.ParamsError: 400, errors.LabelConfigError: 422, errors.PromptError: 422,
                errors.InteractiveError: 422, errors.ModelsNotReady: 503, errors.LabelStudioError: 502,
                api.RequestError: 400, ImageError: 400, errors.ModelLoadError: 400}
    for cls, status in expected.items():
        assert api.status_of(cls("x")) == status, cls
    declared = {cls for _, cls in inspect.getmembers(errors, inspect.isclass) if issubclass(cls, errors.ServiceError)}
    # Each error a request can raise has a row of its own; ModelLoadError only reaches requests as ModelsNotReady.
    assert declared - set(api.ERROR_STATUS) == {errors.ModelLoadError}


def test_a_request_past_its_deadline_gets_503_with_retry_after_and_no_model_pass(make_client):
    """The scheduler's refusals (scheduler.Busy) through the HTTP layer: 503, Retry-After, a JSON message; the model
    never ran. A deadline of a microsecond has passed by the time the first pass would start."""
    client = make_client(REQUEST_DEADLINE="0.000001")
    response = client.post("/predict", json=predict_payload([task()], TEXTAREA_CONTEXT))
    assert response.status_code == 503, response.json
    assert int(response.headers["Retry-After"]) >= 1
    assert response.json["error"].startswith("busy: ") and "past its deadline" in response.json["error"]
    assert client.loader.models.detector.calls == []
    ok = make_client().post("/predict", json=predict_payload([task()], TEXTAREA_CONTEXT))
    assert ok.status_code == 200
