"""SAM / MobileSAM wrapper: parity with the packages' own SamPredictor on random-weight models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_factory import make_image, tiny_sam
from segment_anything import SamPredictor

import detections
from cache import EmbeddingCache, image_digest
from errors import ModelLoadError
from sam_wrapper import Segmenter


def boxes_for(width, height, n, seed=0):
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(0, width * 0.7, n)
    y0 = rng.uniform(0, height * 0.7, n)
    w = rng.uniform(width * 0.1, width * 0.3, n)
    h = rng.uniform(height * 0.1, height * 0.3, n)
    return np.stack([x0, y0, x0 + w, y0 + h], axis=1).astype(np.float32)


def reference_masks(predictor, image, boxes):
    """The batched-box recipe of SamPredictor: set_image, apply_boxes, predict_torch."""
    predictor.set_image(image)
    transformed = torch.as_tensor(predictor.transform.apply_boxes(boxes, image.shape[:2]), dtype=torch.float)
    masks, iou, _ = predictor.predict_torch(None, None, boxes=transformed, multimask_output=False)
    return masks[:, 0].numpy(), iou[:, 0].numpy()


@pytest.fixture(scope="module")
def tiny():
    return tiny_sam(seed=0)


@pytest.mark.parametrize("size, n", [((640, 480), 5), ((97, 211), 1), ((2000, 1500), 12)])
def test_tiny_sam_masks_identical_to_sam_predictor(tiny, size, n, monkeypatch):
    # A small chunk forces the upscaling to run a few masks at a time, as on large photos.
    monkeypatch.setattr(detections, "UPSCALE_CHUNK_PIXELS", 4 * size[0] * size[1])
    image = make_image(*size, seed=3)
    boxes = boxes_for(*size, n)
    lazy, iou = Segmenter(tiny, "cpu").segment_boxes(image, boxes)
    expected_masks, expected_iou = reference_masks(SamPredictor(tiny), image, boxes)
    assert lazy.shape == (n, size[1], size[0]) and lazy.dtype == bool
    masks = np.asarray(lazy)
    assert 0 < masks.mean() < 1  # non-degenerate masks, else equality says little
    np.testing.assert_array_equal(masks, expected_masks)
    np.testing.assert_array_equal(iou, expected_iou)
    # Read in order (as the region builder does) and by index: the same masks.
    np.testing.assert_array_equal(np.stack(list(lazy)), expected_masks)
    np.testing.assert_array_equal(lazy[n - 1], expected_masks[n - 1])


def test_mobile_sam_loaded_from_checkpoint_matches_its_predictor(mobile_sam_checkpoint):
    from mobile_sam import SamPredictor as MobileSamPredictor
    from mobile_sam import sam_model_registry

    segmenter = Segmenter.load("mobile_sam", str(mobile_sam_checkpoint), "cpu")
    image = make_image(320, 240, seed=4)
    boxes = boxes_for(320, 240, 4)
    masks, iou = segmenter.segment_boxes(image, boxes)
    masks = np.asarray(masks)
    reference = MobileSamPredictor(sam_model_registry["vit_t"](checkpoint=str(mobile_sam_checkpoint)))
    expected_masks, expected_iou = reference_masks(reference, image, boxes)
    np.testing.assert_array_equal(masks, expected_masks)
    np.testing.assert_array_equal(iou, expected_iou)


@pytest.mark.parametrize("size", [(640, 480), (97, 211), (2048, 1536)])
def test_upscaled_logits_are_sam_postprocess_masks(tiny, size):
    """The same floats, not only the same masks: segment everything's stability scores count them."""
    segmenter = Segmenter(tiny, "cpu")
    embedding = segmenter.embed(make_image(*size, seed=4))
    low_res = torch.randn(3, 256, 256, generator=torch.Generator().manual_seed(5)) * 4
    expected = tiny.postprocess_masks(low_res[:, None], embedding.input_size, embedding.original_size)[:, 0]
    ours = segmenter.upscale_logits(low_res, embedding)
    assert ours.shape == (3, size[1], size[0])
    assert torch.equal(ours, expected)


def test_cached_embedding_gives_the_uncached_masks(tiny):
    cache = EmbeddingCache(4, 2**30)
    cached, plain = Segmenter(tiny, "cpu", cache), Segmenter(tiny, "cpu")
    image = make_image(200, 100, seed=5)
    embedding = plain.embed(image)
    assert embedding.original_size == (100, 200) and embedding.input_size == (512, 1024)
    image_id = image_digest(image)
    boxes = boxes_for(200, 100, 2, seed=1)
    first, again, expected = (np.asarray(s.segment_boxes(image, boxes, image_id)[0])
                              for s in (cached, cached, plain))
    assert cache.stats()["misses"] == 1 and cache.stats()["hits"] == 1
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(again, expected)
    assert cache.stats()["kept"] == 0  # boxes (a prompt, a job) don't keep the embedding; a click does:
    mask, _ = cached.segment_prompt(image, np.array([[50.0, 40.0]]), np.array([1]), image_id=image_id)
    assert cache.stats()["kept"] == 1 and cache.stats()["misses"] == 1
    np.testing.assert_array_equal(mask, plain.segment_prompt(image, np.array([[50.0, 40.0]]), np.array([1]))[0])


def test_no_box_skips_the_image_encoder(tiny):
    calls = []
    handle = tiny.image_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        masks, iou = Segmenter(tiny, "cpu").segment_boxes(make_image(50, 40), np.zeros((0, 4), np.float32))
    finally:
        handle.remove()
    assert masks.shape == (0, 40, 50) and iou.shape == (0,) and calls == []


def test_sam_vit_b_loads_through_the_registry(sam_vit_b_checkpoint):
    segmenter = Segmenter.load("sam", str(sam_vit_b_checkpoint), "cpu", "vit_b")
    assert segmenter.model.image_encoder.patch_embed.proj.out_channels == 768  # ViT-B width
    with pytest.raises(ModelLoadError, match="SAM_CHECKPOINT=.*could not load as vit_l.*SAM_MODEL_TYPE"):
        Segmenter.load("sam", str(sam_vit_b_checkpoint), "cpu", "vit_l")


def test_load_errors_name_variable_and_path(tmp_path, mobile_sam_checkpoint):
    with pytest.raises(ModelLoadError, match=f"MOBILESAM_CHECKPOINT={tmp_path}/none.pt: file not found"):
        Segmenter.load("mobile_sam", str(tmp_path / "none.pt"), "cpu")
    truncated = tmp_path / "mobile_sam.pt"
    truncated.write_bytes(mobile_sam_checkpoint.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=f"MOBILESAM_CHECKPOINT={truncated}: could not load"):
        Segmenter.load("mobile_sam", str(truncated), "cpu")


@pytest.mark.parametrize(
    "points, labels, box",
    [
        ([[120, 80]], [1], None),  # one click: three masks, the best one
        ([[120, 80], [300, 200]], [1, 0], None),  # a positive and a negative click
        ([], [], [60, 40, 400, 300]),  # a box
        ([[200, 150]], [1], [60, 40, 400, 300]),  # a box with a click
    ],
)
def test_click_and_box_prompts_identical_to_sam_predictor(tiny, points, labels, box):
    image = make_image(640, 480, seed=6)
    points = np.array(points, dtype=np.float32).reshape(-1, 2)
    labels = np.array(labels, dtype=np.int64)
    box = None if box is None else np.array(box, dtype=np.float32)
    mask, score = Segmenter(tiny, "cpu").segment_prompt(image, points, labels, box)

    predictor = SamPredictor(tiny)
    predictor.set_image(image)
    multimask = box is None and len(points) == 1
    masks, scores, _ = predictor.predict(point_coords=points if len(points) else None,
                                         point_labels=labels if len(points) else None,
                                         box=box, multimask_output=multimask)
    assert len(masks) == (3 if multimask else 1)
    best = int(np.argmax(scores))
    assert mask.shape == (480, 640) and 0 < mask.mean() < 1
    np.testing.assert_array_equal(mask, masks[best])
    assert score == float(scores[best])


def test_a_prompt_needs_a_point_or_a_box(tiny):
    with pytest.raises(ValueError, match="at least one point or a box"):
        Segmenter(tiny, "cpu").segment_prompt(make_image(20, 20), np.zeros((0, 2)), np.zeros(0), None)


def test_upscaled_masks_come_with_their_bounding_boxes(tiny, monkeypatch):
    """UpscaledMasks.with_bounds: the masks iteration gives, each with masks.mask_bounds of it, found before the
    masks leave the device; cleaned masks take them over."""
    from masks import CleanupParams, cleaned, mask_bounds, with_bounds

    monkeypatch.setattr(detections, "UPSCALE_CHUNK_PIXELS", 3 * 320 * 240)  # three masks a chunk
    image = make_image(320, 240, seed=4)
    lazy, _ = Segmenter(tiny, "cpu").segment_boxes(image, boxes_for(320, 240, 7, seed=2))
    pairs = list(lazy.with_bounds())
    expected = np.asarray(lazy)
    np.testing.assert_array_equal(np.stack([m for m, _ in pairs]), expected)
    assert [b for _, b in pairs] == [mask_bounds(m) for m in expected]
    assert any(b is not None and b != (0, 240, 0, 320) for _, b in pairs)  # boxes that say something
    params = CleanupParams(50, 0)
    got = list(with_bounds(cleaned(lazy, params)))
    cleaned_here = cleaned(expected, params)
    assert [b for _, b in got] == [mask_bounds(m) for m, _ in got] == [mask_bounds(m) for m in cleaned_here]
