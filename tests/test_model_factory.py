"""The generated random-weight models load through the packages' own loaders and behave sanely."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from model_factory import (
    CALIBRATION_CAPTION,
    groundingdino_image_tensor,
    make_image,
    tiny_sam,
)


def test_repo_root_is_importable():
    assert importlib.util.find_spec("config") is not None
    assert importlib.util.find_spec("detections") is not None


def test_text_encoder_keeps_the_hard_coded_ids(text_encoder_dir):
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(text_encoder_dir))
    assert len(tokenizer) == 30522
    ids = tokenizer.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", ";", "?"])
    assert ids == [0, 100, 101, 102, 103, 1012, 1010, 1025, 1029]
    encoded = tokenizer("brown cat . house .")["input_ids"]
    assert encoded[0] == 101 and encoded[-1] == 102 and encoded.count(1012) == 2
    assert tokenizer.convert_ids_to_tokens(encoded) == ["[CLS]", "brown", "cat", ".", "house", ".", "[SEP]"]
    assert tokenizer.unk_token_id not in tokenizer("Zebras, quokkas; xylophone? traffic-light 42")["input_ids"]
    bert = BertModel.from_pretrained(str(text_encoder_dir))
    assert bert.config.hidden_size == 64


def _predict(model, image, caption=CALIBRATION_CAPTION):
    from groundingdino.util.inference import predict

    return predict(model, image, caption, box_threshold=0.0, text_threshold=0.0, device="cpu")


def test_groundingdino_loads_and_is_deterministic(groundingdino_files):
    from groundingdino.util.inference import load_model

    config, checkpoint, _ = groundingdino_files
    first = load_model(str(config), str(checkpoint), device="cpu")
    second = load_model(str(config), str(checkpoint), device="cpu")
    # load_model loads with strict=False: the file must cover every key, or the rest would stay at random init.
    state = torch.load(checkpoint, map_location="cpu")["model"]
    assert set(state) == set(first.state_dict())

    # Two loads give identical outputs (compared on a small input to keep this quick).
    small = torch.nn.functional.interpolate(groundingdino_image_tensor(make_image(64, 48))[None], size=(96, 128))[0]
    with torch.no_grad():
        out1 = first(small[None], captions=[CALIBRATION_CAPTION])
        out2 = second(small[None], captions=[CALIBRATION_CAPTION])
    assert torch.equal(out1["pred_logits"], out2["pred_logits"]) and torch.equal(out1["pred_boxes"], out2["pred_boxes"])

    # The real predict() path on a load_image-sized input: finite, varied boxes and spread scores.
    image = groundingdino_image_tensor(make_image(64, 48))
    assert tuple(image.shape) == (3, 800, 1066)
    boxes, scores, phrases = _predict(first, image)
    assert boxes.shape == (100, 4) and torch.isfinite(boxes).all()
    assert ((boxes >= 0) & (boxes <= 1)).all()
    assert boxes[:, 2].std() > 0.01 and boxes[:, 0].std() > 0.01
    assert scores.min() < 0.35 < scores.max() and scores.std() > 0.1, "scores should spread over ~0.1..0.9"
    assert len(phrases) == 100


def test_mobile_sam_checkpoint_loads(mobile_sam_checkpoint):
    from mobile_sam import sam_model_registry

    model = sam_model_registry["vit_t"](checkpoint=str(mobile_sam_checkpoint))
    state = torch.load(mobile_sam_checkpoint, map_location="cpu")
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())


def test_sam_checkpoint_loads(sam_vit_b_checkpoint):
    from segment_anything import sam_model_registry

    model = sam_model_registry["vit_b"](checkpoint=str(sam_vit_b_checkpoint))  # load_state_dict is strict here
    assert model.image_encoder.patch_embed.proj.out_channels == 768


def test_tiny_sam_masks_are_not_degenerate():
    from segment_anything import SamPredictor

    predictor = SamPredictor(tiny_sam(seed=0))
    predictor.set_image(make_image(64, 48))
    masks, _, _ = predictor.predict(box=np.array([10, 8, 40, 30]), multimask_output=True)
    assert masks.shape == (3, 48, 64)
    for mask in masks:
        assert 0 < mask.mean() < 1
    first, second = tiny_sam(0).state_dict(), tiny_sam(0).state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)


@pytest.mark.parametrize("width,height", [(64, 48), (31, 97)])
def test_make_image(width, height):
    image = make_image(width, height, seed=3)
    assert image.shape == (height, width, 3) and image.dtype == np.uint8
    assert np.array_equal(image, make_image(width, height, seed=3))
    assert not np.array_equal(image, make_image(width, height, seed=4))
