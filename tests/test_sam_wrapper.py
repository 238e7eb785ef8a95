"""SAM / MobileSAM wrapper: parity with the packages' own SamPredictor on random-weight models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_factory import make_image, make_sam, tiny_sam
from segment_anything import SamPredictor

import sam_wrapper
from config import ModelLoadError
from sam_wrapper import Segmenter


def boxes_for(width, height, n, seed=0):
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(0, width * 0.7, n)
    y0 = rng.uniform(0, height * 0.7, n)
    w = rng.uniform(width * 0.1, width * 0.3, n)
    h = rng.uniform(height * 0.1, height * 0.3, n)
    return np.stack([x0, y0, x0 + w, y0 + h], axis=1).astype(np.float32)


def reference_masks(predictor, image, boxes):
    """The batched-box recipe of SamPredictor: set_image, apply_boxes_torch, predict_torch."""
    predictor.set_image(image)
    transformed = predictor.transform.apply_boxes_torch(torch.as_tensor(boxes), image.shape[:2])
    masks, iou, _ = predictor.predict_torch(None, None, boxes=transformed, multimask_output=False)
    return masks[:, 0].numpy(), iou[:, 0].numpy()


@pytest.fixture(scope="module")
def tiny():
    return tiny_sam(seed=0)


@pytest.mark.parametrize("size, n", [((640, 480), 5), ((97, 211), 1), ((2000, 1500), 12)])
def test_tiny_sam_masks_identical_to_sam_predictor(tiny, size, n, monkeypatch):
    # A small chunk forces the upscaling to run a few masks at a time, as on large photos.
    monkeypatch.setattr(sam_wrapper, "_UPSCALE_CHUNK_PIXELS", 4 * size[0] * size[1])
    image = make_image(*size, seed=3)
    boxes = boxes_for(*size, n)
    masks, iou = Segmenter(tiny, "cpu", "tiny").segment_boxes(image, boxes)
    expected_masks, expected_iou = reference_masks(SamPredictor(tiny), image, boxes)
    assert masks.shape == (n, size[1], size[0]) and masks.dtype == bool
    assert 0 < masks.mean() < 1  # non-degenerate masks, else equality says little
    np.testing.assert_array_equal(masks, expected_masks)
    np.testing.assert_array_equal(iou, expected_iou)


def test_mobile_sam_loaded_from_checkpoint_matches_its_predictor(mobile_sam_checkpoint):
    from mobile_sam import SamPredictor as MobileSamPredictor
    from mobile_sam import sam_model_registry

    segmenter = Segmenter.load("mobile_sam", str(mobile_sam_checkpoint), "cpu")
    assert segmenter.name == "mobile_sam"
    image = make_image(320, 240, seed=4)
    boxes = boxes_for(320, 240, 4)
    masks, iou = segmenter.segment_boxes(image, boxes)
    reference = MobileSamPredictor(sam_model_registry["vit_t"](checkpoint=str(mobile_sam_checkpoint)))
    expected_masks, expected_iou = reference_masks(reference, image, boxes)
    np.testing.assert_array_equal(masks, expected_masks)
    np.testing.assert_array_equal(iou, expected_iou)


def test_embedding_computed_once_and_reusable(tiny):
    segmenter = Segmenter(tiny, "cpu", "tiny")
    image = make_image(200, 100, seed=5)
    embedding = segmenter.embed(image)
    assert embedding.original_size == (100, 200) and embedding.input_size == (512, 1024)
    first, _ = segmenter.segment_boxes(image, boxes_for(200, 100, 2, seed=1), embedding=embedding)
    again, _ = segmenter.segment_boxes(image, boxes_for(200, 100, 2, seed=1))
    np.testing.assert_array_equal(first, again)


def test_no_box_skips_the_image_encoder(tiny):
    calls = []
    handle = tiny.image_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        masks, iou = Segmenter(tiny, "cpu", "tiny").segment_boxes(make_image(50, 40), np.zeros((0, 4), np.float32))
    finally:
        handle.remove()
    assert masks.shape == (0, 40, 50) and iou.shape == (0,) and calls == []


def test_sam_vit_b_loads_through_the_registry(tmp_path):
    path = make_sam(tmp_path / "sam_vit_b_01ec64.pth", "vit_b")
    segmenter = Segmenter.load("sam", str(path), "cpu", "vit_b")
    assert segmenter.name == "sam_vit_b_01ec64"
    assert segmenter.model.image_encoder.patch_embed.proj.out_channels == 768  # ViT-B width
    with pytest.raises(ModelLoadError, match="SAM_CHECKPOINT=.*could not load as vit_l.*SAM_MODEL_TYPE"):
        Segmenter.load("sam", str(path), "cpu", "vit_l")


def test_load_errors_name_variable_and_path(tmp_path, mobile_sam_checkpoint):
    with pytest.raises(ModelLoadError, match=f"MOBILESAM_CHECKPOINT={tmp_path}/none.pt: file not found"):
        Segmenter.load("mobile_sam", str(tmp_path / "none.pt"), "cpu")
    truncated = tmp_path / "mobile_sam.pt"
    truncated.write_bytes(mobile_sam_checkpoint.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=f"MOBILESAM_CHECKPOINT={truncated}: could not load"):
        Segmenter.load("mobile_sam", str(truncated), "cpu")
