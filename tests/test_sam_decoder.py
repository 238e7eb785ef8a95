"""PromptDecoder against the library's own MaskDecoder.forward: identical logits and IoUs, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_factory import tiny_sam

from sam_decoder import PromptDecoder


@pytest.fixture(scope="module", params=["segment_anything", "mobile_sam"])
def model(request, mobile_sam_checkpoint):
    if request.param == "segment_anything":
        return tiny_sam(seed=1)
    from mobile_sam import sam_model_registry

    return sam_model_registry["vit_t"](checkpoint=str(mobile_sam_checkpoint)).eval()


def prompts(batch: int, points: int, box: bool, seed: int):
    """Random prompts in the 1024x1024 input frame: (coords (B, P, 2), labels (B, P)) or None, boxes (B, 4) or None."""
    rng = np.random.default_rng(seed)
    pts = None
    if points:
        coords = torch.as_tensor(rng.uniform(0, 1024, (batch, points, 2)), dtype=torch.float)
        pts = (coords, torch.as_tensor(rng.integers(0, 2, (batch, points)), dtype=torch.int))
    boxes = None
    if box:
        corners = np.sort(rng.uniform(0, 1024, (batch, 2, 2)), axis=1).reshape(batch, 4)
        boxes = torch.as_tensor(corners[:, [0, 2, 1, 3]], dtype=torch.float)
    return pts, boxes


@pytest.mark.parametrize(
    "batch, points, box, multimask, chunk",
    [(1, 1, False, True, None), (1, 2, False, False, 4), (1, 0, True, False, None), (1, 3, True, False, None),
     (5, 0, True, False, None), (3, 1, False, True, 4), (5, 1, False, True, 4), (6, 0, True, False, 4),
     (7, 1, False, True, 4), (9, 1, False, True, 4), (20, 0, True, False, 8), (64, 1, False, True, 4)],
)
def test_decode_identical_to_mask_decoder(model, batch, points, box, multimask, chunk):
    """In one pass and in chunks (in chunks of 4: 5 prompts in one pass, 6 as 3 + 3, 7 as 4 + 3, 9 as 3 x 3,
    64 as 16 x 4; 20 in chunks of 8: 7, 7, 6)."""
    torch.manual_seed(batch + points)
    features = torch.randn(1, 256, 64, 64)
    pts, boxes = prompts(batch, points, box, seed=batch * 10 + points)
    decoder = PromptDecoder(model, chunk)
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(points=pts, boxes=boxes, masks=None)
        expected_masks, expected_iou = model.mask_decoder(
            image_embeddings=features, image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask,
        )
    masks, iou = decoder.decode(decoder.prepare(features), sparse, multimask)
    channels = 3 if multimask else 1
    assert masks.shape == (batch, channels, 256, 256) and iou.shape == (batch, channels)
    assert masks.std() > 0 and (masks > 0).any() and (masks < 0).any()
    assert torch.equal(masks, expected_masks)
    assert torch.equal(iou, expected_iou)


def test_one_prepared_image_serves_many_prompts_and_images_stay_apart(model):
    decoder = PromptDecoder(model)
    first, second = torch.randn(2, 1, 256, 64, 64)
    prepared_first, prepared_second = decoder.prepare(first), decoder.prepare(second)
    pts, _ = prompts(1, 2, False, seed=7)
    with torch.no_grad():
        sparse, _ = model.prompt_encoder(points=pts, boxes=None, masks=None)
    a1, _ = decoder.decode(prepared_first, sparse, False)
    b1, _ = decoder.decode(prepared_second, sparse, False)
    a2, _ = decoder.decode(prepared_first, sparse, False)
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, b1)
    # Decoding leaves the prepared tensors as they were (nothing is updated in place).
    assert torch.equal(prepared_first.src, decoder.prepare(first).src)


@pytest.mark.parametrize("multimask", [True, False])
def test_decode_above_with_no_prompt_above_the_threshold_returns_no_masks(model, multimask):
    """A batch of segment-everything points none of which passes pred_iou_thresh (an empty or flat image) gives
    zero masks, not a reshape error."""
    decoder = PromptDecoder(model)
    pts, _ = prompts(4, 1, False, seed=3)
    with torch.no_grad():
        sparse, _ = model.prompt_encoder(points=pts, boxes=None, masks=None)
        iou, selected, masks = decoder.decode_above(decoder.prepare(torch.randn(1, 256, 64, 64)), sparse, multimask,
                                                    float("inf"))
    channels = 3 if multimask else 1
    assert iou.shape == (4, channels) and selected.shape == (0,) and masks.shape == (0, channels, 256, 256)
