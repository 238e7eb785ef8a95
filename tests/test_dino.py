"""Grounding DINO wrapper: parity with groundingdino.util.inference.predict on a small random-weight
model loaded through the real loading code, given the same input tensor; the input tensor and the deformable
attention each against groundingdino's own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from groundingdino.models.GroundingDINO import ms_deform_attn
from groundingdino.util.inference import predict
from model_factory import groundingdino_image_tensor, library_deformable_attention, make_image
from PIL import Image
from torchvision.ops import box_convert

from cache import EmbeddingCache, image_digest
from dino import GroundingDino, TextFeatures, caption_and_spans, input_size, levels_batched_deformable_attention
from errors import ModelLoadError
from prompts import Phrase

PHRASES = (Phrase("shape", "cats"), Phrase("round thing", "house"))
CAPTION = "shape . round thing ."


@pytest.fixture(scope="module")
def detector(groundingdino_files):
    config, checkpoint, text_encoder = groundingdino_files
    return GroundingDino.load(str(config), str(checkpoint), str(text_encoder), "cpu")


@pytest.fixture(scope="module")
def image():
    return make_image(160, 24, seed=1)  # wide: resized to 1333x200, a fast forward pass


def reference(detector, image, box_threshold, text_threshold, remove_combined=False):
    """groundingdino's own predict on our input tensor, boxes converted to xyxy pixels of the image."""
    boxes, scores, phrases = predict(detector.model, detector.preprocess(image), CAPTION, box_threshold,
                                     text_threshold, device="cpu", remove_combined=remove_combined)
    h, w = image.shape[:2]
    xyxy = box_convert(boxes * torch.tensor([w, h, w, h]), "cxcywh", "xyxy")
    xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, w)
    xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, h)
    return xyxy.numpy(), scores.numpy(), phrases


@pytest.mark.parametrize("box_threshold", [0.2, 0.5])
def test_same_boxes_and_scores_as_groundingdino_predict(detector, image, box_threshold):
    ours = detector.detect(image, PHRASES, box_threshold, 0.0, max_detections=900, nms_iou=1.0)
    xyxy, scores, _ = reference(detector, image, box_threshold, 0.0)
    assert len(ours) == len(scores) > 0
    order = np.argsort(-scores, kind="stable")
    np.testing.assert_array_equal(ours.scores, scores[order])
    np.testing.assert_allclose(ours.xyxy, xyxy[order], rtol=0, atol=1e-4)


def test_each_box_goes_to_the_phrase_of_its_best_token(detector, image):
    """Where a box's best token lies inside a phrase, groundingdino's remove_combined phrase (the caption
    segment around that token) and our label agree. (Where it is a '.' or [CLS], remove_combined picks
    a neighbouring segment; we pick the phrase whose own tokens score highest.)"""
    ours = detector.detect(image, PHRASES, 0.2, 0.0, max_detections=900, nms_iou=1.0)
    _, scores, phrases = reference(detector, image, 0.2, 0.0, remove_combined=True)
    with torch.no_grad():
        logits = detector.model(detector.preprocess(image)[None], captions=[CAPTION])["pred_logits"]
    logits = logits.sigmoid()[0]
    best_token = logits[logits.max(dim=1).values > 0.2].argmax(dim=1).numpy()
    _, spans = caption_and_spans(PHRASES, detector.model.tokenizer)
    inside = np.isin(best_token, sum(spans, []))
    order = np.argsort(-scores, kind="stable")
    label_of = {p.text: p.label for p in PHRASES}
    pairs = [(phrases[i], label) for i, label in zip(order, ours.labels, strict=True) if inside[i]]
    assert len(pairs) >= 3
    assert {label for _, label in pairs} == {"cats", "house"}  # both phrases get boxes
    assert [label_of[phrase] for phrase, _ in pairs] == [label for _, label in pairs]


def test_thresholds_cap_and_nms(detector, image):
    everything = detector.detect(image, PHRASES, 0.0, 0.0, max_detections=900, nms_iou=1.0)
    assert len(everything) == 100  # every query of the small model
    assert np.all(np.diff(everything.scores) <= 0)  # best first
    top = detector.detect(image, PHRASES, 0.0, 0.0, max_detections=7, nms_iou=1.0)
    np.testing.assert_array_equal(top.scores, everything.scores[:7])
    assert len(detector.detect(image, PHRASES, 0.0, 1.0, max_detections=900, nms_iou=1.0)) == 0
    merged = detector.detect(image, PHRASES, 0.0, 0.0, max_detections=900, nms_iou=0.3)
    assert 0 < len(merged) < len(everything)
    for label in {"cats", "house"}:
        boxes = torch.as_tensor(merged.xyxy[np.array(merged.labels) == label])
        iou = box_iou_upper(boxes)
        assert float(iou.max(initial=0)) <= 0.3 + 1e-6


def test_per_phrase_thresholds_gate_each_label_as_its_own_threshold_would(detector, image):
    """Thresholds per phrase (a project's label_thresholds): each label's detections are exactly those that
    threshold gives it for every phrase (NMS is per label), the other label's those of its own."""
    gates = {"cats": (0.25, 0.2), "house": (0.15, 0.3)}
    mixed = detector.detect(image, PHRASES, [gates[p.label][0] for p in PHRASES],
                            [gates[p.label][1] for p in PHRASES], max_detections=900, nms_iou=0.5)
    for label, (box_threshold, text_threshold) in gates.items():
        alone = detector.detect(image, PHRASES, box_threshold, text_threshold, max_detections=900, nms_iou=0.5)
        mine, theirs = np.array(mixed.labels) == label, np.array(alone.labels) == label
        assert 0 < mine.sum() < len(mixed)
        np.testing.assert_array_equal(mixed.scores[mine], alone.scores[theirs])
        np.testing.assert_array_equal(mixed.xyxy[mine], alone.xyxy[theirs])


def box_iou_upper(boxes: torch.Tensor) -> np.ndarray:
    from torchvision.ops import box_iou

    iou = box_iou(boxes, boxes).numpy()
    return iou[np.triu_indices(len(boxes), k=1)]


def test_boxes_are_in_image_pixels(detector):
    wide = make_image(300, 40, seed=2)
    found = detector.detect(wide, PHRASES, 0.0, 0.0, max_detections=900, nms_iou=1.0)
    assert found.xyxy[:, [0, 2]].max() <= 300 and found.xyxy[:, [1, 3]].max() <= 40
    assert found.xyxy[:, [0, 2]].max() > 40  # x spans the wide image, not a unit square


def test_no_phrase_no_detection(detector, image):
    assert len(detector.detect(image, (), 0.0, 0.0)) == 0


def test_caption_and_token_spans(detector):
    tokenizer = detector.model.tokenizer
    caption, spans = caption_and_spans(PHRASES, tokenizer)
    assert caption == CAPTION
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(caption)["input_ids"])
    assert [[tokens[i] for i in span] for span in spans] == [["shape"], ["round", "thing"]]


def test_load_errors_name_the_variable_and_path(tmp_path, groundingdino_files):
    config, checkpoint, text_encoder = (str(p) for p in groundingdino_files)
    with pytest.raises(ModelLoadError, match=f"GROUNDINGDINO_CHECKPOINT={tmp_path}/missing.pth: file not found"):
        GroundingDino.load(config, str(tmp_path / "missing.pth"), text_encoder, "cpu")
    with pytest.raises(ModelLoadError, match="GROUNDINGDINO_CONFIG=.*file not found"):
        GroundingDino.load(str(tmp_path / "nope.py"), checkpoint, text_encoder, "cpu")
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match=f"GROUNDINGDINO_CHECKPOINT={broken}: could not load"):
        GroundingDino.load(config, str(broken), text_encoder, "cpu")
    with pytest.raises(ModelLoadError, match="GROUNDINGDINO_TEXT_ENCODER=/no/such/bert"):
        GroundingDino.load(config, checkpoint, "/no/such/bert", "cpu")


def test_cached_backbone_and_outputs_give_the_uncached_detections(detector, image):
    cache = EmbeddingCache(8, 2**30)
    cached = GroundingDino(detector.model, "cpu", cache)
    image_id = image_digest(image)
    backbone_runs = []
    handle = detector.model.backbone.register_forward_hook(lambda *args: backbone_runs.append(1))
    try:
        other = (Phrase("house", "house"),)
        results = [
            cached.detect(image, PHRASES, 0.0, 0.0, max_detections=900, nms_iou=1.0, image_id=image_id),
            cached.detect(image, other, 0.0, 0.0, max_detections=900, nms_iou=1.0, image_id=image_id),
            cached.detect(image, PHRASES, 0.3, 0.0, max_detections=900, nms_iou=1.0, image_id=image_id),
        ]
        assert len(backbone_runs) == 1  # a second prompt on the image reuses the backbone features
        expected = [
            detector.detect(image, PHRASES, 0.0, 0.0, max_detections=900, nms_iou=1.0),
            detector.detect(image, other, 0.0, 0.0, max_detections=900, nms_iou=1.0),
            detector.detect(image, PHRASES, 0.3, 0.0, max_detections=900, nms_iou=1.0),
        ]
    finally:
        handle.remove()
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_array_equal(got.xyxy, want.xyxy)
        np.testing.assert_array_equal(got.scores, want.scores)
        assert got.labels == want.labels
    # backbone + two captions' outputs were computed; the third call was a hit on the first's outputs
    assert cache.stats()["misses"] == 3 and cache.stats()["hits"] == 2


def test_the_text_encoder_runs_once_per_caption_and_changes_no_output(groundingdino_files, detector, image):
    """TextFeatures: BERT runs once for a caption however many images (and batches) use it, and the outputs are
    the library model's own (loaded afresh through groundingdino's load_model, nothing wrapped), image by image and
    in a batch of two. (Both run our deformable attention: test_the_whole_model_gives_the_library_attention_outputs.)"""
    from groundingdino.util.inference import load_model

    config, checkpoint, text_encoder = groundingdino_files
    library = load_model(str(config), str(checkpoint), device="cpu", text_encoder_type=str(text_encoder)).eval()
    assert not isinstance(library.bert, TextFeatures) and isinstance(detector.model.bert, TextFeatures)
    fresh = GroundingDino(detector.model, "cpu", EmbeddingCache(8, 2**30))
    detector.model.bert._outputs.clear()
    runs = []
    handle = detector.model.bert.encoder.register_forward_hook(lambda *args: runs.append(1))
    images = [image, make_image(160, 24, seed=2)]
    try:
        ours = [fresh._forward(picture, CAPTION, None) for picture in images]
        fresh.encode_batch(images, ["a", "b"], PHRASES)
        batched = [fresh.cache.get(fresh._outputs_key(image_id, CAPTION), pytest.fail) for image_id in ("a", "b")]
        fresh._forward(image, "shape .", None)
    finally:
        handle.remove()
    assert len(runs) == 2  # CAPTION once for two images and a batch of two, then "shape ." once
    with torch.no_grad():
        for picture, (logits, boxes), (batch_logits, batch_boxes) in zip(images, ours, batched, strict=True):
            want = library(fresh.preprocess(picture)[None], captions=[CAPTION])
            np.testing.assert_allclose(logits, want["pred_logits"].sigmoid()[0], rtol=0, atol=1e-5)
            np.testing.assert_allclose(boxes, want["pred_boxes"][0], rtol=0, atol=1e-5)
            np.testing.assert_allclose(batch_logits, logits, rtol=0, atol=1e-4)
            np.testing.assert_allclose(batch_boxes, boxes, rtol=0, atol=1e-4)


@pytest.mark.parametrize("batch, queries, shapes", [
    (1, 900, [(100, 134), (50, 67), (25, 34), (13, 17)]),  # the decoder's queries over a 1066x800 input's levels
    (2, 37, [(7, 3), (4, 2), (2, 1), (1, 1)]),  # a batch; thin and one-pixel maps
])
def test_levels_batched_deformable_attention_matches_the_library(batch, queries, shapes):
    generator = torch.Generator().manual_seed(0)
    spatial_shapes = torch.tensor(shapes)
    size = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    value = torch.randn(batch, size, 8, 32, generator=generator)
    # Locations beyond [0, 1] too: their neighbours outside the map count as zeros.
    locations = torch.rand(batch, queries, 8, len(shapes), 4, 2, generator=generator) * 1.4 - 0.2
    weights = torch.rand(batch, queries, 8, len(shapes), 4, generator=generator)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    want = library_deformable_attention()(value, spatial_shapes, locations, weights)
    got = levels_batched_deformable_attention(value, spatial_shapes, locations, weights)
    assert got.shape == want.shape == (batch, queries, 8 * 32)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


def test_the_whole_model_gives_the_library_attention_outputs(detector, image, monkeypatch):
    tensor = detector.preprocess(image)[None]
    with torch.no_grad():
        ours = detector.model(tensor, captions=[CAPTION])
        monkeypatch.setattr(ms_deform_attn, "multi_scale_deformable_attn_pytorch", library_deformable_attention())
        library = detector.model(tensor, captions=[CAPTION])
    np.testing.assert_allclose(ours["pred_logits"], library["pred_logits"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(ours["pred_boxes"], library["pred_boxes"], rtol=0, atol=1e-4)


def test_input_sizes_are_groundingdinos():
    """input_size against groundingdino's RandomResize([800], max_size=1333) on images of many shapes."""
    import groundingdino.datasets.transforms as T

    resize = T.RandomResize([800], max_size=1333)
    rng = np.random.default_rng(0)
    shapes = [(800, 800), (799, 1332), (600, 1000), (24, 160), (1, 1), (960, 1280), (4000, 3000)]
    shapes += [tuple(int(v) for v in rng.integers(1, 3000, 2)) for _ in range(60)]
    for height, width in shapes:
        resized, _ = resize(Image.new("1", (width, height)))
        assert input_size(height, width) == (resized.height, resized.width), (height, width)


@pytest.mark.parametrize("width, height", [(1280, 960), (160, 24), (400, 600), (801, 799)])
def test_the_input_tensor_is_load_images_within_one_level(detector, width, height):
    """Resized by torch on the device, not by PIL: a few pixels in ten thousand one level (1/255) apart."""
    picture = make_image(width, height, seed=3)
    picture[::7] = np.random.default_rng(3).integers(0, 256, picture[::7].shape)  # edges everywhere
    ours, want = detector.preprocess(picture), groundingdino_image_tensor(picture)
    assert ours.shape == want.shape and ours.dtype == torch.float32
    level = (ours - want).abs() * torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) * 255  # in levels
    assert level.max() < 1 + 1e-3
    assert (level > 0.5).float().mean() < 2e-3
