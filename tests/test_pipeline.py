"""The pipeline on its own, with no HTTP layer: `build_models` from settings, one image, one task, and each way a
task can fail. Real random-weight models (generated checkpoints loaded through the real loading code)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fakes import LoadedModels
from label_studio_sdk.converter import brush
from model_factory import make_image, service_env
from servers import ImageServer
from test_e2e_gunicorn import encode
from test_labeling import GUIDE_CONFIG

from _wsgi import create_backend_app
from cache import image_digest
from config import Settings
from dino import GroundingDino
from errors import InteractiveError, ModelLoadError
from images import ImageLoader
from labeling import parse_label_config
from loader import ModelLoader, build_models
from pipeline import ClickQuery, DetectionParams, Pipeline, TextQuery
from prompts import parse_prompt
from sam_wrapper import Segmenter

ROOT = Path(__file__).resolve().parent.parent
CONFIG = parse_label_config(GUIDE_CONFIG)
IMAGE = make_image(96, 64, seed=3)


@pytest.fixture(scope="module")
def env(groundingdino_files, mobile_sam_checkpoint):
    return service_env(groundingdino_files, mobile_sam_checkpoint)


@pytest.fixture(scope="module")
def models(env):
    return build_models(Settings.from_env(env))


@pytest.fixture(scope="module")
def server():
    files = {"/data/upload/1/a.png": encode(IMAGE, "PNG"), "/data/upload/1/garbage.png": b"not an image",
             "/data/upload/1/huge.png": encode(make_image(400, 300), "PNG")}
    with ImageServer(files, token="pipe-token") as s:
        yield s


@pytest.fixture
def pipeline(models, env, server):
    settings = Settings.from_env({**env, "LABEL_STUDIO_URL": server.url, "LABEL_STUDIO_API_KEY": "pipe-token",
                                  "IMAGE_MAX_PIXELS": "50000"})
    return Pipeline(models, settings, ImageLoader(settings))


def text_query(prompt="shape_cats. round thing_house", box_threshold=0.3):
    plan = parse_prompt(prompt, CONFIG.labels)
    return TextQuery(plan.phrases, DetectionParams(box_threshold, 0.25, 5))


def test_build_models_loads_what_the_settings_name(env, models):
    assert isinstance(models.detector, GroundingDino) and isinstance(models.segmenter, Segmenter)
    assert models.detector.cache is models.cache and models.segmenter.cache is models.cache
    boxes_only = build_models(Settings.from_env({**env, "USE_MOBILE_SAM": "false"}))
    assert boxes_only.segmenter is None


def test_build_models_names_the_variable_of_a_missing_file(env, tmp_path):
    with pytest.raises(ModelLoadError, match=f"MOBILESAM_CHECKPOINT={tmp_path}/none.pt: file not found"):
        build_models(Settings.from_env({**env, "MOBILESAM_CHECKPOINT": str(tmp_path / "none.pt")}))


def test_the_background_loader_wraps_build_models(env):
    loader = ModelLoader(Settings.from_env(env))
    models = loader.get(timeout=300)
    assert loader.state()["models"] == "ready" and isinstance(models.detector, GroundingDino)


def test_detect_one_image(pipeline):
    detections = pipeline.detect(IMAGE, image_digest(IMAGE), text_query())
    assert 0 < len(detections) <= 5 and set(detections.labels) <= {"cats", "house"}
    masks = np.asarray(detections.masks)
    assert masks.shape == (len(detections), 64, 96) and masks.dtype == bool
    assert (detections.xyxy[:, 2:] <= [96, 64]).all() and (detections.xyxy >= 0).all()
    no_masks = pipeline.detect(IMAGE, image_digest(IMAGE), text_query(), wants_masks=False)
    assert no_masks.masks is None and np.array_equal(no_masks.xyxy, detections.xyxy)


def test_a_task_is_predicted_as_through_the_http_layer(pipeline, models, env, server, tmp_path):
    task = {"id": 7, "data": {"image": "/data/upload/1/a.png"}}
    outcome = pipeline.predict_task(task, CONFIG, text_query())
    assert outcome.failure is None and outcome.task_id == 7 and outcome.seconds > 0
    regions = outcome.prediction["result"]
    assert {r["type"] for r in regions} == {"rectanglelabels", "brushlabels"}
    for region in (r for r in regions if r["type"] == "brushlabels"):
        assert len(brush.decode_rle(region["value"]["rle"])) == 96 * 64 * 4

    # The same loaded models behind the service's app.
    app = create_backend_app({**env, "DATA_DIR": str(tmp_path), "LABEL_STUDIO_URL": server.url,
                              "LABEL_STUDIO_API_KEY": "pipe-token"},
                             loader=LoadedModels(models, Settings.from_env(env).model_version))
    context = {"result": [{"from_name": "prompt", "type": "textarea",
                           "value": {"text": ["shape_cats. round thing_house"]}}]}
    answer = app.test_client().post("/predict", json={"tasks": [task], "label_config": GUIDE_CONFIG,
                                                       "params": {"context": context}}).json["results"][0]

    def without_ids(prediction):
        return [{k: v for k, v in r.items() if k != "id"} for r in prediction["result"]]

    assert without_ids(answer) == without_ids(outcome.prediction)
    assert answer["score"] == outcome.prediction["score"]
    assert answer["model_version"] == outcome.prediction["model_version"] == "groundingdino_tiny+mobile_sam"


@pytest.mark.parametrize(
    "data, kind, reason",
    [
        ({"text": "no image"}, "no_image_url", "no image URL under 'image'"),
        ({"image": "/data/upload/1/missing.png"}, "unreachable", "HTTP 404"),
        ({"image": "/data/upload/1/garbage.png"}, "undecodable", "not a recognised image format"),
        ({"image": "/data/upload/1/huge.png"}, "too_large", "over the IMAGE_MAX_PIXELS limit"),
        ({"image": "ftp://example.test/a.png"}, "unsupported", "unsupported image URL scheme 'ftp'"),
        ({"image": "s3://bucket/a.png"}, "unreachable", "found no storage of the project"),  # resolve route: 404
    ],
)
def test_a_task_that_cannot_be_predicted_is_a_failure_with_its_kind(pipeline, data, kind, reason):
    outcome = pipeline.predict_task({"id": 1, "data": data}, CONFIG, text_query())
    assert outcome.prediction is None
    assert outcome.failure.kind == kind and reason in outcome.failure.reason


def test_a_click_is_one_mask_with_the_masks_bounding_box(pipeline):
    query = ClickQuery(((50.0, 50.0),), (1,), None, "cats")
    detections = pipeline.detect(IMAGE, image_digest(IMAGE), query)
    (mask,) = np.asarray(detections.masks)
    assert detections.labels == ("cats",) and mask.any()
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    assert detections.xyxy[0].tolist() == [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]
    result = pipeline.predict_image(IMAGE, image_digest(IMAGE), CONFIG, query)
    assert [r["type"] for r in result["result"]] == ["brushlabels"]  # the click is the user's rectangle


def test_clicks_without_a_segmenter_are_refused(env, pipeline):
    boxes_only = Pipeline(build_models(Settings.from_env({**env, "USE_MOBILE_SAM": "false"})), pipeline.settings,
                          pipeline.images)
    with pytest.raises(InteractiveError, match="clicks need a segmenter"):
        boxes_only.predict_task({"id": 1, "data": {"image": "/data/upload/1/a.png"}}, CONFIG,
                                ClickQuery(((5.0, 5.0),), (1,), None, "cats"))


def test_the_pipeline_imports_no_http_layer():
    code = ("import sys, pipeline, loader, cli; "
            "print(sorted(m for m in ('flask', 'werkzeug', 'api', 'mlbase', 'model', '_wsgi') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_start_tasks_runs_the_model_passes_and_leaves_the_host_work(pipeline, monkeypatch):
    tasks = [{"id": i, "data": {"image": "/data/upload/1/a.png"}} for i in (1, 2)] + [{"id": 3, "data": {}}]
    expected = pipeline.predict_tasks(tasks, CONFIG, text_query())
    passes = []
    for owner, name in ((pipeline.models.detector, "detect"), (pipeline.models.segmenter, "decode"),
                        (pipeline.models.segmenter, "embed_batch")):
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _f=original, _n=name, **k: passes.append(_n) or _f(*a, **k))
    finish = pipeline.start_tasks(tasks, CONFIG, text_query())
    during_passes = list(passes)
    outcomes = finish()
    assert "decode" in during_passes and passes == during_passes  # the host work runs no model pass

    def without_ids(outcome):
        return outcome.failure or [{k: v for k, v in r.items() if k != "id"} for r in outcome.prediction["result"]]

    assert [o.task_id for o in outcomes] == [1, 2, 3] and outcomes[2].failure.kind == "no_image_url"
    assert [without_ids(o) for o in outcomes] == [without_ids(o) for o in expected]
    assert outcomes[0].prediction["result"] and all(o.seconds > 0 for o in outcomes)


def test_loaders_that_overlap_in_one_process_all_load(groundingdino_files, mobile_sam_checkpoint, tmp_path):
    # While transformers builds Grounding DINO's BERT it patches torch.nn.Module process-wide (init_empty_weights):
    # a model built meanwhile by another thread got meta tensors and its load failed.
    loaders = [ModelLoader(Settings.from_env(service_env(groundingdino_files, mobile_sam_checkpoint,
                                                         DATA_DIR=str(tmp_path / str(i))))) for i in range(3)]
    for loader in loaders:
        loader.start()
    for loader in loaders:
        loader.get(timeout=300)
    assert [loader.state()["models"] for loader in loaders] == ["ready"] * 3
