"""SAM 2.1 as the segmenter (sam2_segmenter.py): random weights at the published Hiera-T config (Hiera-S: loading),
saved as Meta's files and loaded through build_models; masks, scores and low-res logits equal SAM2ImagePredictor's
for the same boxes and clicks, batched images equal one at a time, segment everything equals SAM2AutomaticMaskGenerator
one to one, and the service's entry points (Retrieve Predictions, the prompt box, `*`, clicks, the page's try-it,
`cli.py predict`; Ray: tests/test_ray.py) run on it."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from label_studio_harness import textarea_context
from label_studio_sdk.converter import brush
from model_factory import make_image, make_sam2, service_env
from PIL import Image
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
from sam2.build_sam import build_sam2
from sam2.sam2_image_predictor import SAM2ImagePredictor
from servers import ImageServer
from test_api import predict_payload
from test_cli import run_here

from _wsgi import create_backend_app
from cache import EmbeddingCache, image_digest
from config import ConfigError, Settings
from errors import ModelLoadError
from everything import EverythingParams, segment_everything
from loader import build_models
from pipeline import DetectionParams, Pipeline, TextQuery
from prompts import Phrase
from sam2_segmenter import CONFIGS, Sam2Segmenter

IMAGE = make_image(320, 240, seed=5)
BOXES = np.array([[10, 20, 150, 200], [100, 30, 310, 120], [0, 0, 320, 240]], np.float32)


@pytest.fixture(scope="module")
def hiera_t(tmp_path_factory):
    return make_sam2(tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny.pt", "sam2.1_hiera_t")


@pytest.fixture(scope="module")
def ours(hiera_t):
    return Sam2Segmenter.load(str(hiera_t), "cpu", "sam2.1_hiera_t", EmbeddingCache(8, 2**30))


@pytest.fixture(scope="module")
def reference(hiera_t):
    """Meta's predictor on its own copy of the same model, IMAGE set."""
    predictor = SAM2ImagePredictor(build_sam2(CONFIGS["sam2.1_hiera_t"], str(hiera_t), device="cpu"))
    predictor.set_image(IMAGE)
    return predictor


def test_settings_choose_sam2_by_its_model_type(tmp_path):
    settings = Settings.from_env({"USE_SAM": "true", "SAM_MODEL_TYPE": "SAM2.1_hiera_b+", "MODEL_DIR": "m"})
    assert settings.segmenter == "sam2" and settings.segmenter_model_type == "sam2.1_hiera_b+"
    assert settings.checkpoint("SAM_CHECKPOINT").path == "m/sam2.1_hiera_base_plus.pt"
    assert settings.model_version == "groundingdino_swint_ogc+sam2.1_hiera_base_plus"
    assert Settings.from_env({"USE_SAM": "true"}).segmenter == "sam"  # vit_h, as before
    # USE_SAM wins over USE_MOBILE_SAM, whatever its model type.
    assert Settings.from_env({"USE_SAM": "true", "USE_MOBILE_SAM": "true",
                              "SAM_MODEL_TYPE": "sam2.1_hiera_l"}).segmenter == "sam2"
    with pytest.raises(ConfigError, match=r"SAM_MODEL_TYPE must be one of vit_h, vit_l, vit_b, sam2.1_hiera_t, "
                                          r"sam2.1_hiera_s, sam2.1_hiera_b\+, sam2.1_hiera_l, got 'sam2_hiera_l'"):
        Settings.from_env({"SAM_MODEL_TYPE": "sam2_hiera_l"})


def test_boxes_give_the_predictors_masks_scores_and_logits(ours, reference):
    embedding = ours.embedding_for(IMAGE, image_digest(IMAGE))
    low_res, iou = ours.decode(embedding, boxes=BOXES)
    masks, scores, logits = reference.predict(box=BOXES, multimask_output=False)
    assert np.array_equal(iou.numpy(), scores)
    assert np.array_equal(low_res.clamp(-32, 32).numpy(), logits)  # the predictor hands them on clamped
    got, got_scores = ours.segment_boxes(IMAGE, BOXES, image_digest(IMAGE))
    assert np.array_equal(np.asarray(got), masks[:, 0]) and np.array_equal(got_scores, scores[:, 0])
    assert 0.05 < masks.mean() < 0.95  # neither empty nor full: the comparison says something


@pytest.mark.parametrize("points, labels, box", [
    ([[60, 80]], [1], None),  # one click: three masks, the best kept
    ([[60, 80], [200, 100], [250, 200]], [1, 0, 1], None),
    ([[60, 80]], [0], [10, 20, 150, 200]),  # a box and a click
    ([], [], [100, 30, 310, 120]),
])
def test_clicks_and_boxes_give_the_predictors_mask(ours, reference, points, labels, box):
    multimask = box is None and len(points) == 1
    masks, scores, _ = reference.predict(point_coords=np.array(points, np.float32) if points else None,
                                         point_labels=np.array(labels) if points else None,
                                         box=None if box is None else np.array(box, np.float32),
                                         multimask_output=multimask)
    best = int(np.argmax(scores))
    mask, score = ours.segment_prompt(IMAGE, np.array(points, np.float32).reshape(-1, 2), np.array(labels),
                                      None if box is None else np.array(box, np.float32), image_digest(IMAGE))
    assert score == scores[best] and np.array_equal(mask, masks[best])


def test_a_batch_of_images_gives_what_each_alone_gives(ours):
    images = [IMAGE, make_image(200, 300, seed=2)]
    alone = [ours.embedding_for(IMAGE, image_digest(IMAGE)), ours.embed(images[1])]  # IMAGE's: cached above
    ours.embed_batch(images, ["batch-a", "batch-b"])
    for image_id, single in zip(["batch-a", "batch-b"], alone, strict=True):
        batched = ours.cache.get(ours._key(image_id), lambda: pytest.fail("not encoded"))
        for a, b in zip([single.image_embed, *single.high_res], [batched.image_embed, *batched.high_res], strict=True):
            assert float((a - b).norm() / a.norm()) <= 1e-5
        boxes = np.array([[20, 20, 150, 180]], np.float32)
        m1, _ = ours.decode(single, boxes=boxes)
        m2, _ = ours.decode(batched, boxes=boxes)
        assert (ours.upscale(m1[:, 0], single)[0] != ours.upscale(m2[:, 0], batched)[0]).mean() < 1e-3


def test_segment_everything_equals_sam2s_automatic_mask_generator(ours, reference):
    image = make_image(160, 120, seed=3)
    params = {"points_per_side": 4, "points_per_batch": 5, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
              "box_nms_thresh": 1.0}
    expected = SAM2AutomaticMaskGenerator(reference.model, **params).generate(image)
    found = segment_everything(ours, image, EverythingParams(**params), image_digest(image))
    masks = np.asarray(found.masks)
    assert len(expected) >= 2 and len(masks) == len(expected)
    for record, mask, iou, stability, point in zip(expected, masks, found.predicted_iou, found.stability_score,
                                                   found.points, strict=True):
        np.testing.assert_array_equal(mask, record["segmentation"])
        assert iou == np.float32(record["predicted_iou"]) and stability == np.float32(record["stability_score"])
        np.testing.assert_allclose(point, record["point_coords"][0], rtol=1e-6)


def test_hiera_s_loads_as_meta_builds_it_and_another_types_weights_are_refused(tmp_path):
    """Hiera-S (the other small config) through the same loading code: the same modules and weights as
    build_sam2 makes of the file (its forward is the code Hiera-T's parity tests run above)."""
    checkpoint = make_sam2(tmp_path / "sam2.1_hiera_small.pt", "sam2.1_hiera_s", seed=1)
    segmenter = Sam2Segmenter.load(str(checkpoint), "cpu", "sam2.1_hiera_s")
    reference = build_sam2(CONFIGS["sam2.1_hiera_s"], str(checkpoint), device="cpu")
    ours_state, their_state = segmenter.model.state_dict(), reference.state_dict()
    assert ours_state.keys() == their_state.keys()
    assert all(torch.equal(ours_state[k], their_state[k]) for k in ours_state)
    assert sum(p.numel() for p in segmenter.model.parameters()) == pytest.approx(46e6, rel=0.02)  # Meta: 46 M
    with pytest.raises(ModelLoadError, match=r"SAM_CHECKPOINT=.*sam2.1_hiera_small.pt: could not load as "
                                             r"sam2.1_hiera_t \(does SAM_MODEL_TYPE match the checkpoint\?\)"):
        Sam2Segmenter.load(str(checkpoint), "cpu", "sam2.1_hiera_t")


def test_the_service_runs_grounding_dino_boxes_through_sam2(groundingdino_files, mobile_sam_checkpoint, hiera_t):
    """build_models as the service loads: the model version names SAM 2.1, text prompts get a mask per box, a
    click on the same image reuses its embedding, and the bf16 image encoder stays close to float32."""
    env = service_env(groundingdino_files, mobile_sam_checkpoint, USE_SAM="true", SAM_MODEL_TYPE="sam2.1_hiera_t",
                      SAM_CHECKPOINT=str(hiera_t), MAX_DETECTIONS="4")
    settings = Settings.from_env(env)
    models = build_models(settings)
    assert isinstance(models.segmenter, Sam2Segmenter)
    assert settings.model_version == "groundingdino_tiny+sam2.1_hiera_tiny"
    pipeline = Pipeline(models, settings, None)
    query = TextQuery((Phrase("shape", "cats"),), DetectionParams(0.05, 0.05, 4))
    image_id = image_digest(IMAGE)
    found = pipeline.detect(IMAGE, image_id, query)
    assert len(found) > 0 and np.asarray(found.masks).shape == (len(found), 240, 320)
    misses = models.cache.stats()["misses"]
    mask, _ = models.segmenter.segment_prompt(IMAGE, np.array([[60.0, 80.0]]), np.array([1]), None, image_id)
    assert mask.shape == (240, 320) and models.cache.stats()["misses"] == misses  # the cached embedding

    bf16 = Sam2Segmenter(models.segmenter.model, "cpu", dtype=torch.bfloat16)
    fp32_masks, _ = models.segmenter.segment_boxes(IMAGE, BOXES, image_id)
    bf16_masks, _ = bf16.segment_boxes(IMAGE, BOXES)
    for a, b in zip(np.asarray(fp32_masks), np.asarray(bf16_masks), strict=True):
        assert (a & b).sum() / (a | b).sum() >= 0.95


def test_compile_warms_the_encoder_up_and_a_failed_compile_stays_eager(ours, monkeypatch, caplog):
    """COMPILE for SAM 2.1: the encoder function (image encoder and the decoder's feature projections) compiled with
    static shapes and warmed at the given batch sizes, then every pass runs through it at a warmed size
    (device.in_warmed_batches: padding tested compiled on a small module in test_gpu_path.py). torch.compile is
    replaced here by a recorder (inductor's own compile of Hiera: test_gpu_path's kind, minutes on this CPU)."""
    calls = []

    def recorder(fn, dynamic):
        assert dynamic is False

        def run(batch):
            calls.append(len(batch))
            return fn(batch)
        return run

    monkeypatch.setattr(torch, "compile", recorder)
    segmenter = Sam2Segmenter(ours.model, "cpu")
    assert segmenter.compile((1,)) and calls == [1]
    embedding = segmenter.embed(IMAGE)
    assert calls == [1, 1]
    cached = ours.embedding_for(IMAGE, image_digest(IMAGE))
    assert torch.equal(embedding.image_embed, cached.image_embed)

    def broken(fn, dynamic):
        def run(batch):
            raise RuntimeError("inductor: no C compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    eager = Sam2Segmenter(ours.model, "cpu")
    assert eager.compile((1, 4)) is False and not eager._warmed
    assert "torch.compile of the segmenter's image encoder failed" in caplog.text


def test_the_http_api_the_page_and_the_cli_run_on_sam2(groundingdino_files, mobile_sam_checkpoint, hiera_t, tmp_path,
                                                        monkeypatch, capsys):
    """The service's entry points with SAM_MODEL_TYPE=sam2.1_hiera_t: /health and every answer name it; Retrieve
    Predictions (no context) and the prompt box answer brush masks; `*` segments everything; the page's try-it
    answers a prompt, then clicks on the held image; `cli.py predict` prints the same regions /predict answers."""
    picture = tmp_path / "a.png"
    Image.fromarray(IMAGE).save(picture)
    version = "groundingdino_tiny+sam2.1_hiera_tiny"
    env = service_env(groundingdino_files, mobile_sam_checkpoint, USE_SAM="true", SAM_MODEL_TYPE="sam2.1_hiera_t",
                      SAM_CHECKPOINT=str(hiera_t), MAX_DETECTIONS="4", DATA_DIR=str(tmp_path / "data"),
                      IMAGE_ALLOWED_HOSTS="127.0.0.1", BOX_THRESHOLD="0.05", TEXT_THRESHOLD="0.05",
                      # random weights: keep every mask of a small grid
                      EVERYTHING_POINTS_PER_SIDE="3", EVERYTHING_PRED_IOU_THRESH="0",
                      EVERYTHING_STABILITY_SCORE_THRESH="0", EVERYTHING_BOX_NMS_THRESH="1.0")
    with ImageServer({"/a.png": picture.read_bytes()}) as images:
        app = create_backend_app(env)
        app.extensions["model_loader"].get(timeout=300)
        client = app.test_client()
        health = client.get("/health").json
        assert (health["status"], health["models"], health["model_version"]) == ("UP", "ready", version)

        def predict(prompt):
            task = {"id": 1, "data": {"image": images.url + "/a.png"}}
            answer = client.post("/predict", json=predict_payload([task], prompt and textarea_context(prompt)))
            assert answer.status_code == 200, answer.json
            (prediction,) = answer.json["results"]
            assert prediction["model_version"] == version
            return prediction["result"]

        for prompt in (None, "shape_cats. house"):  # Retrieve Predictions, then the prompt box
            regions = predict(prompt)
            brushes = [r for r in regions if r["type"] == "brushlabels"]
            assert brushes and len(brushes) == len(regions) // 2
            assert all(len(brush.decode_rle(r["value"]["rle"])) == 320 * 240 * 4 for r in brushes)
        everything = predict("*_cats")
        assert everything and {r["value"]["brushlabels"][0] for r in everything if r["type"] == "brushlabels"} == {
            "cats"}

        tried = client.post("/try", data={"image": (io.BytesIO(picture.read_bytes()), "a.png"), "prompt": "cats"},
                            content_type="multipart/form-data")
        assert tried.status_code == 200, tried.json
        clicked = client.post("/try", json={"image_id": tried.json["image_id"], "label": "cats",
                                            "clicks": [{"x": 60, "y": 80, "positive": True}]})
        assert clicked.status_code == 200, clicked.json
        (region,) = clicked.json["detections"]
        assert region["label"] == "cats" and region["mask"] is not None

    printed = run_here(monkeypatch, capsys, env, "predict", str(picture), "--prompt", "shape_cats. house")
    assert printed.returncode == 0, printed.stderr
    printed = json.loads(printed.stdout)
    assert printed["model_version"] == version
    strip = [{k: v for k, v in r.items() if k != "id"} for r in printed["result"]]
    assert strip == [{k: v for k, v in r.items() if k != "id"} for r in regions]
