"""SAM 3 as the engine (sam3_engine.py): parity with the package's reference inference (Sam3Processor), the CPU
workaround, the cache, the pipeline path, and the loading code's errors.

Most tests use model_factory.tiny_sam3 (the package's parts, shrunk: ~20 M parameters, 224x224 input, ~4 s to
build once per module, 1-2 s per text query: the builder's full-width heads); about 65 s in all on 2 cores.
test_real_size_sam3_loads_through_build_models_and_matches_the_reference (marked real_size) builds the published
architecture (841 M parameters) with random weights, writes it as sam3.pt (3.4 GB) and loads it through
build_models: about 3 minutes on 2 idle cores, most of it two 1008x1008 image encodings.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from model_factory import SAM3_TINY_RESOLUTION, make_image, make_real_size_sam3, sam3_checkpoint_state, tiny_sam3
from PIL import Image
from test_labeling import GUIDE_CONFIG

from cache import EmbeddingCache, image_digest
from config import Settings
from detections import Detections
from errors import InteractiveError, ModelLoadError
from images import ImageLoader
from labeling import parse_label_config
from loader import Models, build_models
from masks import CleanupParams, clean_mask
from pipeline import ClickQuery, DetectionParams, Pipeline, TextQuery, everything_defaults
from prompts import Phrase, parse_prompt
from sam3_engine import Sam3Engine, cuda_redirected
from sam_wrapper import Segmenter

# sam3 0.1.4's own import-time noise (the service shows these two at start with ENGINE=sam3: not yet in
# logs.SILENCED, whose test probe runs the default engine only).
pytestmark = [pytest.mark.filterwarnings(r"ignore:`torch\.jit\.script` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings(r"ignore:CUDA is not available or torch_xla is imported:UserWarning")]

IMAGE = make_image(160, 120, seed=5)
CONFIG = parse_label_config(GUIDE_CONFIG)


@pytest.fixture(scope="module")
def model():
    return tiny_sam3(seed=0)


@pytest.fixture
def engine(model):
    return Sam3Engine(model, "cpu", EmbeddingCache(8, 2**30), resolution=SAM3_TINY_RESOLUTION)


def reference(model, image: np.ndarray, text: str, threshold: float) -> dict:
    """Sam3Processor's answer (the package's documented image inference), its detections sorted by score."""
    from sam3.model.sam3_image_processor import Sam3Processor

    with cuda_redirected("cpu"):  # the processor meets the same hard-coded CUDA (pin_memory) on a CPU
        processor = Sam3Processor(model, resolution=SAM3_TINY_RESOLUTION, device="cpu",
                                  confidence_threshold=threshold)
        state = processor.set_text_prompt(text, processor.set_image(Image.fromarray(image)))
    order = torch.sort(state["scores"], descending=True, stable=True).indices
    return {"boxes": state["boxes"][order].numpy(), "scores": state["scores"][order].numpy(),
            "masks": state["masks"][order][:, 0].numpy()}


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("text, threshold", [("cat", 0.0), ("cat", 0.43), ("red round thing", 0.35)])
def test_detections_equal_the_reference_inference(model, engine, text, threshold):
    expected = reference(model, IMAGE, text, threshold)
    found = engine.detect(IMAGE, [Phrase(text, "cats")], threshold, max_detections=900, nms_iou=1.0,
                          image_id=image_digest(IMAGE))
    assert 0 < len(found) == len(expected["scores"]) <= 200
    assert threshold == 0.0 or len(found) < 200  # the threshold gates something
    assert np.array_equal(found.xyxy, expected["boxes"])
    assert np.array_equal(found.scores, expected["scores"])
    masks = np.asarray(found.masks)
    assert masks.shape == (len(found), 120, 160) and masks.dtype == bool
    assert np.array_equal(masks, expected["masks"])
    assert 0.05 < masks.mean() < 0.95  # neither all-False nor all-True: the comparison means something
    assert found.labels == ("cats",) * len(found)


def test_masks_read_one_by_one_equal_the_whole_array(engine):
    found = engine.detect(IMAGE, [Phrase("cat", "cats")], 0.4, max_detections=900, nms_iou=1.0)
    whole = np.asarray(found.masks)
    assert all(np.array_equal(mask, whole[i]) for i, mask in enumerate(found.masks))
    assert np.array_equal(found.masks[3], whole[3])


def test_the_image_is_encoded_once_and_each_phrase_queried_once(model, engine, monkeypatch):
    image_id = image_digest(IMAGE)
    phrases = [Phrase("cat", "cats"), Phrase("house", "house")]
    first = engine.detect(IMAGE, phrases, 0.4, max_detections=900, nms_iou=1.0, image_id=image_id)
    assert engine.cache.stats()["misses"] == 3 and len(engine.cache) == 3  # the features, then one per phrase
    calls = []
    monkeypatch.setattr(model.backbone, "forward_image", lambda *a: calls.append("image"))
    monkeypatch.setattr(model, "forward_grounding", lambda **k: calls.append("query"))
    again = engine.detect(IMAGE, phrases, 0.4, max_detections=900, nms_iou=1.0, image_id=image_id)
    stricter = engine.detect(IMAGE, phrases[:1], 0.43, max_detections=900, nms_iou=1.0, image_id=image_id)
    assert calls == [] and engine.cache.stats()["hits"] == 5
    assert np.array_equal(first.xyxy, again.xyxy) and np.array_equal(np.asarray(first.masks),
                                                                      np.asarray(again.masks))
    monkeypatch.undo()
    expected = reference(model, IMAGE, "cat", 0.43)  # another threshold on the cached outputs: still the reference
    assert np.array_equal(stricter.scores, expected["scores"]) and np.array_equal(stricter.xyxy, expected["boxes"])
    assert np.array_equal(np.asarray(stricter.masks), expected["masks"])
    uncached = engine.detect(IMAGE, phrases, 0.4, max_detections=900, nms_iou=1.0)
    assert np.array_equal(first.scores, uncached.scores) and engine.cache.stats()["misses"] == 3


def test_each_phrase_is_one_query_with_its_label_then_the_best_are_kept(model, engine):
    phrases = [Phrase("cat", "cats"), Phrase("house", "house")]
    found = engine.detect(IMAGE, phrases, 0.4, max_detections=900, nms_iou=1.0)
    per_phrase = {p.label: reference(model, IMAGE, p.text, 0.4) for p in phrases}
    assert found.labels.count("cats") == len(per_phrase["cats"]["scores"]) > 0
    assert found.labels.count("house") == len(per_phrase["house"]["scores"]) > 0
    assert list(found.scores) == sorted(found.scores, reverse=True)
    for label, expected in per_phrase.items():
        mine = np.array([lab == label for lab in found.labels])
        assert np.array_equal(found.scores[mine], expected["scores"])
    per_gate = engine.detect(IMAGE, phrases, [0.4, 0.99], max_detections=900, nms_iou=1.0)  # one per phrase
    assert list(per_gate.labels) == ["cats"] * len(per_phrase["cats"]["scores"])
    assert np.array_equal(per_gate.scores, per_phrase["cats"]["scores"])
    capped = engine.detect(IMAGE, phrases, 0.4, max_detections=3, nms_iou=1.0)
    assert len(capped) == 3 and np.array_equal(capped.scores, found.scores[:3])
    assert np.array_equal(np.asarray(capped.masks), np.asarray(found.masks)[:3])


def test_nms_drops_overlapping_boxes_of_one_label(engine):
    found = engine.detect(IMAGE, [Phrase("cat", "cats")], 0.0, max_detections=900, nms_iou=1.0)
    kept = engine.detect(IMAGE, [Phrase("cat", "cats")], 0.0, max_detections=900, nms_iou=0.5)
    assert 0 < len(kept) < len(found)
    from torchvision.ops import box_iou

    iou = box_iou(torch.from_numpy(kept.xyxy), torch.from_numpy(kept.xyxy)).fill_diagonal_(0)
    assert iou.max() <= 0.5


def test_nothing_above_the_threshold_and_no_phrase_are_empty(engine):
    assert len(engine.detect(IMAGE, [Phrase("cat", "cats")], 0.99)) == 0
    assert len(engine.detect(IMAGE, [], 0.0)) == 0


# ------------------------------------------------------------------------------------------------ CPU workaround


def test_without_the_redirect_the_builder_needs_cuda():
    """The reason for cuda_redirected: sam3 0.1.4's builder parts ask for CUDA. Fails (and the workaround can go)
    when a sam3 release stops doing so."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    from sam3.model.position_encoding import PositionEmbeddingSine

    with pytest.raises((RuntimeError, AssertionError), match="(?i)cuda|nvidia|accelerator"):
        PositionEmbeddingSine(num_pos_feats=256, precompute_resolution=224)


def test_redirected_precomputations_equal_the_packages_own_cpu_computations(model):
    from sam3.model.decoder import TransformerDecoder
    from sam3.model.position_encoding import PositionEmbeddingSine

    with cuda_redirected("cpu"):
        precomputed = PositionEmbeddingSine(num_pos_feats=256, precompute_resolution=224)
    lazy = PositionEmbeddingSine(num_pos_feats=256)  # no precompute: computed on the input's device when asked
    assert len(precomputed.cache) == 4
    for size, cached in precomputed.cache.items():
        assert cached.device.type == "cpu"
        assert torch.equal(cached, lazy(torch.zeros((1, 1) + size))[0])  # the cache holds (C, H, W)
    decoder = model.transformer.decoder
    side = SAM3_TINY_RESOLUTION // 14
    assert decoder.compilable_stored_size == (side, side)
    for cached, fresh in zip(decoder.compilable_cord_cache, TransformerDecoder._get_coords(side, side, "cpu"),
                             strict=True):
        assert cached.device.type == "cpu" and torch.equal(cached, fresh)


def test_the_redirect_only_moves_cuda_requests_and_skips_pin_memory():
    tensor = torch.arange(4.0)
    with cuda_redirected("cpu"):
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.tensor([1, 2], device="cuda:0").device.type == "cpu"
        assert torch.ones(2, device="meta").device.type == "meta"  # other devices are left alone
        assert tensor.pin_memory() is tensor
        assert torch.equal(torch.arange(4.0) * 2, tensor * 2)
    assert torch.zeros(2, device="meta").device.type == "meta"


# ------------------------------------------------------------------------------------------------ pipeline


@pytest.fixture(scope="module")
def mobile_sam(mobile_sam_checkpoint):
    return Segmenter.load("mobile_sam", str(mobile_sam_checkpoint), "cpu", "vit_t")


def sam3_pipeline(model, segmenter, **env):
    settings = Settings.from_env({"ENGINE": "sam3", "DEVICE": "cpu", "SAM3_SCORE_THRESHOLD": "0.4", **env})
    cache = EmbeddingCache(8, 2**30)
    engine = Sam3Engine(model, "cpu", cache, resolution=SAM3_TINY_RESOLUTION)
    if segmenter is not None:
        segmenter.cache = cache
    return Pipeline(Models(engine, segmenter, cache, "sam3"), settings, ImageLoader(settings))


def text_query(prompt="cat_cats. house", max_detections=6, threshold=0.4, cleanup=None):
    plan = parse_prompt(prompt, CONFIG.labels)
    return TextQuery(plan.phrases, DetectionParams(0.3, 0.25, max_detections, threshold), cleanup)


def test_the_pipeline_uses_sam3_masks_cleaned_and_labeled(model, mobile_sam):
    pipeline = sam3_pipeline(model, mobile_sam)
    cleanup = CleanupParams(min_area=30, smooth=0)
    found = pipeline.detect(IMAGE, image_digest(IMAGE), text_query(cleanup=cleanup))
    raw = pipeline.models.detector.detect(IMAGE, [Phrase("cat", "cats"), Phrase("house", "house")], 0.4, 6,
                                          pipeline.settings.nms_iou)
    assert len(found) == 6 and set(found.labels) == {"cats", "house"}
    assert np.array_equal(found.xyxy, raw.xyxy) and found.labels == raw.labels
    expected = [clean_mask(mask, cleanup) for mask in raw.masks]
    assert all(np.array_equal(a, b) for a, b in zip(found.masks, expected, strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(expected, raw.masks, strict=True))  # cleaning did work
    assert ("sam-embedding", id(mobile_sam)) not in {key[:2] for key in pipeline.models.cache._entries}

    regions = pipeline.predict_image(IMAGE, image_digest(IMAGE), CONFIG, text_query())["result"]
    assert sorted({r["type"] for r in regions}) == ["brushlabels", "rectanglelabels"]
    assert {r["value"].get("rectanglelabels", r["value"].get("brushlabels"))[0] for r in regions} == {"cats",
                                                                                                      "house"}
    boxes_only = pipeline.detect(IMAGE, image_digest(IMAGE), text_query(), wants_masks=False)
    assert boxes_only.masks is None and np.array_equal(boxes_only.xyxy, found.xyxy)


def test_a_labeled_star_keeps_sam3_masks_for_the_phrases(model, mobile_sam, monkeypatch):
    """`cat_cats. *_house`: the phrase's detections keep SAM 3's masks (the segmenter is not asked for them), and
    segment everything's masks (MobileSAM's) follow, labeled with the star's label."""
    pipeline = sam3_pipeline(model, mobile_sam)
    monkeypatch.setattr(mobile_sam, "segment_boxes", lambda *a, **k: pytest.fail("SAM 3's masks were replaced"))
    query = replace(text_query("cat_cats. *_house", max_detections=4),
                    everything=replace(everything_defaults(pipeline.settings), points_per_side=4, pred_iou_thresh=0.0,
                                       stability_score_thresh=0.0))
    found = pipeline.detect(IMAGE, image_digest(IMAGE), query)
    raw = pipeline.models.detector.detect(IMAGE, [Phrase("cat", "cats")], 0.4, 4, pipeline.settings.nms_iou)
    assert found.labels[:4] == ("cats",) * 4 and len(found) > 4 and set(found.labels[4:]) == {"house"}
    masks = list(found.masks)
    assert len(masks) == len(found)
    assert all(np.array_equal(masks[i], clean_mask(m, CleanupParams(100, 0))) for i, m in enumerate(raw.masks))


def test_the_project_threshold_and_cap_reach_sam3(model):
    pipeline = sam3_pipeline(model, None)
    low = pipeline.detect(IMAGE, "id", text_query("cat_cats", max_detections=900, threshold=0.0))
    high = pipeline.detect(IMAGE, "id", text_query("cat_cats", max_detections=900, threshold=0.45))
    assert len(low) > len(high) > 0 and (high.scores > 0.45).all()
    assert len(pipeline.detect(IMAGE, "id", text_query("cat_cats", max_detections=2, threshold=0.0))) == 2


def test_clicks_use_the_configured_segmenter(model, mobile_sam):
    click = ClickQuery(((30.0, 40.0),), (1,), None, "cats")
    pipeline = sam3_pipeline(model, mobile_sam)
    answer = pipeline.detect(IMAGE, image_digest(IMAGE), click)
    mask, _ = mobile_sam.segment_prompt(IMAGE, np.array([[48.0, 48.0]]), np.array([1]))
    assert answer.labels == ("cats",) and np.array_equal(answer.masks[0], clean_mask(mask, CleanupParams(100, 0)))
    without = sam3_pipeline(model, None, USE_MOBILE_SAM="false")
    with pytest.raises(InteractiveError, match="clicks need a segmenter"):
        without.check(click)


# ------------------------------------------------------------------------------------------------ loading


def test_load_names_the_variable_of_a_missing_or_unreadable_file(tmp_path):
    tokenizer = Settings.from_env({}).sam3_tokenizer
    with pytest.raises(ModelLoadError, match=f"SAM3_CHECKPOINT={tmp_path}/sam3.pt: file not found"):
        Sam3Engine.load(str(tmp_path / "sam3.pt"), tokenizer, "cpu")
    (tmp_path / "sam3.pt").write_bytes(b"<html>a login page, not a checkpoint</html>")
    with pytest.raises(ModelLoadError, match=f"SAM3_CHECKPOINT={tmp_path}/sam3.pt: could not read it as a "):
        Sam3Engine.load(str(tmp_path / "sam3.pt"), tokenizer, "cpu")
    with pytest.raises(ModelLoadError, match=f"SAM3_TOKENIZER={tmp_path}/bpe.txt.gz: file not found"):
        Sam3Engine.load(str(tmp_path / "sam3.pt"), str(tmp_path / "bpe.txt.gz"), "cpu")


def test_load_refuses_weights_of_another_model(model, tmp_path):
    """The package's own loader prints the missing keys and goes on with random weights; ours refuses (the
    published architecture is built first: ~10 s)."""
    path = tmp_path / "sam3.pt"
    torch.save(sam3_checkpoint_state(model), path)  # the tiny model's: other shapes
    with pytest.raises(ModelLoadError, match="SAM3_CHECKPOINT=.*: not SAM 3 image-model weights"):
        Sam3Engine.load(str(path), Settings.from_env({}).sam3_tokenizer, "cpu")


@pytest.mark.real_size
def test_real_size_sam3_loads_through_build_models_and_matches_the_reference(tmp_path):
    """The published architecture (841 M parameters), random weights written as sam3.pt, loaded by build_models as
    the service does; its detections equal Sam3Processor's on the same model. ~3 min on 2 idle cores (172 s of CPU;
5.9 min wall on a loaded machine), peak RSS 7.5 GB, 3.4 GB of disk while it runs. In `make test`; deselect it
with -m "not real_size"."""
    from sam3.model.sam3_image_processor import Sam3Processor

    checkpoint = make_real_size_sam3(tmp_path / "sam3.pt")
    try:
        settings = Settings.from_env({"ENGINE": "sam3", "SAM3_CHECKPOINT": str(checkpoint),
                                      "USE_MOBILE_SAM": "false", "DEVICE": "cpu"})
        models = build_models(settings)
    finally:
        checkpoint.unlink()
    engine = models.detector
    assert isinstance(engine, Sam3Engine) and models.segmenter is None and models.engine == "sam3"
    assert sum(p.numel() for p in engine.model.parameters()) > 800e6
    image = make_image(320, 240, seed=2)
    found = engine.detect(image, [Phrase("cat", "cats")], 0.0, max_detections=900, nms_iou=1.0,
                          image_id=image_digest(image))
    with cuda_redirected("cpu"):
        processor = Sam3Processor(engine.model, device="cpu", confidence_threshold=0.0)
        state = processor.set_text_prompt("cat", processor.set_image(Image.fromarray(image)))
    order = torch.sort(state["scores"], descending=True, stable=True).indices
    assert len(found) == len(order) > 0
    assert np.array_equal(found.xyxy, state["boxes"][order].numpy())
    assert np.array_equal(found.scores, state["scores"][order].numpy())
    assert np.array_equal(np.asarray(found.masks), state["masks"][order][:, 0].numpy())
    assert isinstance(found, Detections) and found.masks.shape == (len(found), 240, 320)
