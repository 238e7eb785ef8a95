"""regions.py: LS brush RLE parity with label_studio_sdk, percent boxes, and the regions built from Detections."""

import json

import cv2
import numpy as np
import pytest
from label_studio_sdk.converter import brush

from detections import Detections
from labeling import Control, LabelingConfig
from regions import (
    box_to_percent,
    build_regions,
    encode_rle,
    mask_to_polygons,
    mask_to_rle,
    percent_to_box,
    prediction,
)


def sdk_rle(mask: np.ndarray) -> list[int]:
    return brush.mask2rle(mask.astype(np.uint8) * 255)


def decoded_alpha(rle: list[int], height: int, width: int) -> np.ndarray:
    return np.reshape(brush.decode_rle(rle), (height, width, 4))[:, :, 3]


def mask_from_runs(runs: list[int], first: bool = False) -> np.ndarray:
    """(1, sum(runs)) mask whose flat runs have exactly these pixel lengths, alternating from `first`."""
    flat = np.concatenate([np.full(n, bool(i % 2) != first) for i, n in enumerate(runs)])
    return flat.reshape(1, -1)


def blob(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A filled ellipse at a random place and size."""
    yy, xx = np.mgrid[:height, :width]
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    ry, rx = rng.uniform(0.5, height), rng.uniform(0.5, width)
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


# --- RLE ---------------------------------------------------------------------------------------------------------

# Pixel runs: x4 in the RGBA array. 1, 2 -> <= 8 class; 4 -> 16 (<= 16 class edge); 5 -> 20; 64 -> 256 (<= 256 edge);
# 65 -> 260 (16-bit class); 16384 -> 2**16 (no chunk); 16385 -> one chunk + 4; 32768 -> exactly two chunks' worth.
RUN_CASES = {
    "single pixel": [1],
    "class edges": [1, 2, 4, 5, 64, 65, 1, 2],
    "16-bit edge": [16384, 1, 16385, 2],
    "chunk multiples": [32768, 3, 49152, 1, 65536],
    "chunk plus one": [32769, 16383, 16386],
    "everything": [1, 2, 4, 5, 64, 65, 16384, 16385, 32768, 32769, 3, 7],
}


@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("runs", RUN_CASES.values(), ids=RUN_CASES.keys())
def test_rle_matches_sdk_on_run_boundaries(runs, first):
    mask = mask_from_runs(runs, first)
    assert mask_to_rle(mask) == sdk_rle(mask)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (13, 17), (200, 200), (300, 250), (128, 512)])
@pytest.mark.parametrize("fill", [False, True])
def test_rle_matches_sdk_on_uniform_masks(shape, fill):
    mask = np.full(shape, fill)
    assert mask_to_rle(mask) == sdk_rle(mask)


@pytest.mark.parametrize(
    "pixels, n_bytes",
    [
        (2, 9),  # 53 header bits + one 14-bit token = 67 bits -> padded to 72
        (4, 9),  # + one 15-bit token = 68 bits -> 72
        (10, 10),  # + one 19-bit token = 72 bits exactly -> the SDK still appends a whole zero byte
        (64, 10),
        (100, 11),  # + one 27-bit token = 80 bits exactly -> a whole zero byte again
    ],
)
def test_rle_padding(pixels, n_bytes):
    mask = np.ones((1, pixels), bool)
    rle = mask_to_rle(mask)
    assert rle == sdk_rle(mask)
    assert len(rle) == n_bytes


def random_mask(rng: np.random.Generator) -> np.ndarray:
    height, width = (int(v) for v in rng.integers(1, 301, size=2))
    kind = rng.integers(0, 3)
    if kind == 0:
        return rng.random((height, width)) < rng.uniform(0.05, 0.95)  # pixel noise: many runs of 1-2 pixels
    mask = np.zeros((height, width), bool)
    for _ in range(int(rng.integers(1, 5))):
        mask ^= blob(height, width, rng)
    if kind == 2:
        mask ^= rng.random((height, width)) < 0.02  # speckles on the shapes
    return mask


@pytest.mark.parametrize("seed", range(50))
def test_rle_matches_sdk_on_random_masks(seed):
    mask = random_mask(np.random.default_rng(seed))
    assert mask_to_rle(mask) == sdk_rle(mask)


@pytest.mark.parametrize(
    "mask",
    [
        np.zeros((20, 30), bool),
        np.ones((20, 30), bool),
        mask_from_runs([1, 2, 4, 5, 64, 65, 16384, 16385, 5090]).reshape(190, 200),
        np.random.default_rng(1).random((120, 90)) < 0.5,
        blob(200, 200, np.random.default_rng(2)),
    ],
    ids=["zeros", "ones", "class edges", "noise", "blob"],
)
def test_rle_round_trips_through_sdk_decoder(mask):
    rle = mask_to_rle(mask)
    np.testing.assert_array_equal(decoded_alpha(rle, *mask.shape), mask.astype(np.uint8) * 255)


def test_rle_matches_sdk_on_a_large_smooth_mask():
    mask = np.zeros((600, 800), bool)
    yy, xx = np.mgrid[:600, :800]
    mask[(yy - 300) ** 2 + (xx - 380) ** 2 < 250**2] = True
    mask[50:70, :] = True  # full-width stripe: runs longer than 2**16 values
    assert mask_to_rle(mask) == sdk_rle(mask)


@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.float32])
def test_rle_treats_nonzero_as_foreground(dtype):
    mask = np.random.default_rng(3).random((40, 50)) < 0.3
    assert mask_to_rle((mask * 7).astype(dtype)) == sdk_rle(mask)


@pytest.mark.parametrize("shape", [(10,), (2, 3, 4)])
def test_rle_rejects_non_2d(shape):
    with pytest.raises(ValueError, match="2-D"):
        mask_to_rle(np.zeros(shape, bool))


@pytest.mark.parametrize("seed", range(10))
def test_encode_rle_matches_sdk_on_any_uint8_array(seed):
    # Unlike a repeated mask this has runs of length 1 (the literal-value token) and values other than 0/255.
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 256, size=int(rng.integers(1, 300))).astype(np.uint8)
    values[rng.random(len(values)) < 0.3] = 5
    array = np.repeat(values, rng.choice([1, 1, 2, 9, 17, 300, 70000], size=len(values)))
    assert encode_rle(array) == brush.encode_rle(array)


@pytest.mark.parametrize("seed", range(6))
def test_rles_encoded_together_are_each_the_sdks(seed):
    """_masks_rle (build_regions' brushes, several masks a call) and _encode_streams (several streams a call): each
    stream's bytes are those encoded alone, and the SDK's; empty masks, empty images and long runs among them."""
    from masks import mask_bounds
    from regions import _encode_streams, _mask_cuts, _masks_rle

    rng = np.random.default_rng(seed)
    masks = [random_mask(rng) for _ in range(5)] + [np.zeros((7, 9), bool), np.zeros((0, 4), bool),
                                                   np.ones((300, 260), bool), mask_from_runs([70000, 3, 16385])]
    order = rng.permutation(len(masks))
    masks = [masks[i] for i in order]
    rles = _masks_rle([_mask_cuts(m, mask_bounds(m) if m.size else None) for m in masks])
    assert rles == [mask_to_rle(m) for m in masks]  # one at a time
    assert [r for r, m in zip(rles, masks, strict=True) if m.size] == [sdk_rle(m) for m in masks if m.size]
    arrays = [np.repeat(rng.integers(0, 256, n).astype(np.uint8), rng.choice([1, 2, 9, 300, 70000], n))
              for n in (0, 1, 40, 3)]
    runs = [(np.diff(np.append(s, len(a))), a[s]) for a in arrays
            for s in [np.flatnonzero(np.concatenate([[True], a[1:] != a[:-1]])) if len(a) else np.zeros(0, int)]]
    streams = _encode_streams(np.concatenate([r[0] for r in runs]).astype(np.int64),
                              np.concatenate([r[1] for r in runs]).astype(np.int64),
                              np.array([len(r[0]) for r in runs]), np.array([len(a) for a in arrays]))
    assert streams == [encode_rle(a) for a in arrays]
    assert streams[1:] == [brush.encode_rle(a) for a in arrays[1:]]  # the SDK can't encode an empty array


def test_build_regions_encodes_brushes_in_batches_of_bounded_runs(monkeypatch):
    """Brushes wait for their RLE up to _RLE_BATCH_RUNS runs: with a small bound every few masks are encoded, with
    the default all at once, the same bytes."""
    import regions

    rng = np.random.default_rng(4)
    masks = np.stack([blob(60, 80, rng) ^ (rng.random((60, 80)) < 0.01 * i) for i in range(7)])
    masks[3] = False
    detections = Detections(np.tile([0.0, 0.0, 10.0, 10.0], (7, 1)), np.full(7, 0.5), ["cat"] * 7, masks)
    cfg = config(brushes=(BRUSH,))
    batched = [r["value"]["rle"] for r in build_regions(detections, cfg, 80, 60)]
    monkeypatch.setattr(regions, "_RLE_BATCH_RUNS", 50)
    few = [r["value"]["rle"] for r in build_regions(detections, cfg, 80, 60)]
    assert batched == few == [sdk_rle(m) for m in masks if m.any()]


# --- percent boxes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "xyxy, expected",
    [
        ((160, 80, 260, 130), {"x": 25.0, "y": 100 / 6, "width": 15.625, "height": 50 / 4.8}),
        ((0, 0, 640, 480), {"x": 0.0, "y": 0.0, "width": 100.0, "height": 100.0}),
        ((-50, -20, 100, 48), {"x": 0.0, "y": 0.0, "width": 15.625, "height": 10.0}),  # clipped at the top left
        ((600, 400, 700, 600), {"x": 93.75, "y": 250 / 3, "width": 6.25, "height": 50 / 3}),  # clipped bottom right
        ((700, 500, 800, 600), {"x": 100.0, "y": 100.0, "width": 0.0, "height": 0.0}),  # wholly outside
    ],
)
def test_box_to_percent(xyxy, expected):
    value = box_to_percent(np.array(xyxy, np.float32), 640, 480)
    assert value.keys() == expected.keys()
    for key, want in expected.items():
        assert type(value[key]) is float
        assert value[key] == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_percent_box_round_trip(seed):
    rng = np.random.default_rng(seed)
    width, height = int(rng.integers(1, 5000)), int(rng.integers(1, 5000))
    x0, x1 = np.sort(rng.uniform(0, width, 2))
    y0, y1 = np.sort(rng.uniform(0, height, 2))
    xyxy = np.array([x0, y0, x1, y1], np.float32)
    back = percent_to_box(box_to_percent(xyxy, width, height), width, height)
    assert back.dtype == np.float32 and back.shape == (4,)
    np.testing.assert_allclose(back, xyxy, rtol=1e-5, atol=1e-3)


def test_percent_to_box_known_value():
    value = {"x": 25.0, "y": 100 / 6, "width": 15.625, "height": 50 / 4.8}
    np.testing.assert_allclose(percent_to_box(value, 640, 480), [160, 80, 260, 130], atol=1e-4)


# --- regions -----------------------------------------------------------------------------------------------------

RECT_KEYS = {
    "id",
    "from_name",
    "to_name",
    "type",
    "original_width",
    "original_height",
    "image_rotation",
    "value",
    "score",
}
W, H = 64, 48


def config(rectangles=(), brushes=(), polygons=()) -> LabelingConfig:
    return LabelingConfig(image_name="image", image_key="image", prompt_name="prompt", rectangles=rectangles,
                          brushes=brushes, polygons=polygons)


def detections(labels, with_masks=True) -> Detections:
    n = len(labels)
    xyxy = np.array([[4 + i % 8, 6 + i % 8, 30 + i % 8, 40] for i in range(n)], np.float32)
    scores = np.linspace(0.9, 0.5, n, dtype=np.float32) if n else np.zeros(0, np.float32)
    masks = None
    if with_masks:
        masks = np.zeros((n, H, W), bool)
        for i in range(n):
            masks[i, 6 + i % 8 : 40, 4 + i % 8 : 30 + i % 8] = True
    return Detections(xyxy, scores, tuple(labels), masks)


RECT = Control("label", ("cat", "dog"))
BRUSH = Control("mask", ("cat", "dog"))
POLY = Control("outline", ("cat", "dog"))


@pytest.mark.parametrize(
    "cfg, with_masks, expected",
    [
        (config(rectangles=(RECT,)), True, [("rectanglelabels", "label", "cat"), ("rectanglelabels", "label", "dog")]),
        (config(brushes=(BRUSH,)), True, [("brushlabels", "mask", "cat"), ("brushlabels", "mask", "dog")]),
        (
            config(rectangles=(RECT,), brushes=(BRUSH,)),
            True,
            [
                ("rectanglelabels", "label", "cat"),
                ("brushlabels", "mask", "cat"),
                ("rectanglelabels", "label", "dog"),
                ("brushlabels", "mask", "dog"),
            ],
        ),
        (
            config(rectangles=(RECT,), brushes=(BRUSH,)),
            False,
            [("rectanglelabels", "label", "cat"), ("rectanglelabels", "label", "dog")],
        ),
        (config(brushes=(BRUSH,)), False, []),
        # different label sets: each label goes only to the control that has it
        (
            config(rectangles=(Control("box", ("cat",)),), brushes=(Control("paint", ("dog",)),)),
            True,
            [("rectanglelabels", "box", "cat"), ("brushlabels", "paint", "dog")],
        ),
        # the first control having the label wins
        (
            config(rectangles=(Control("a", ("dog",)), Control("b", ("cat", "dog")))),
            True,
            [("rectanglelabels", "b", "cat"), ("rectanglelabels", "a", "dog")],
        ),
        # a label no control has gets no region
        (config(rectangles=(Control("box", ("bird",)),), brushes=(Control("paint", ("bird",)),)), True, []),
        (
            config(rectangles=(RECT,), brushes=(BRUSH,), polygons=(POLY,)),
            True,
            [
                ("rectanglelabels", "label", "cat"),
                ("brushlabels", "mask", "cat"),
                ("polygonlabels", "outline", "cat"),
                ("rectanglelabels", "label", "dog"),
                ("brushlabels", "mask", "dog"),
                ("polygonlabels", "outline", "dog"),
            ],
        ),
        (config(polygons=(POLY,)), False, []),
    ],
    ids=[
        "rect only",
        "brush only",
        "both",
        "both, no masks",
        "brush, no masks",
        "split labels",
        "first control",
        "unknown label",
        "rect, brush and polygon",
        "polygon, no masks",
    ],
)
def test_build_regions_routes_labels(cfg, with_masks, expected):
    regions = build_regions(detections(["cat", "dog"], with_masks), cfg, W, H)
    got = [(r["type"], r["from_name"], r["value"][r["type"]][0]) for r in regions]
    assert got == expected


def test_build_regions_region_contents_and_json():
    dets = detections(["cat", "dog"])
    regions = build_regions(dets, config(rectangles=(RECT,), brushes=(BRUSH,)), W, H)
    assert len(regions) == 4
    decoded = json.loads(json.dumps(regions))
    assert decoded == regions
    rect, paint = regions[0], regions[1]

    assert rect.keys() == RECT_KEYS and paint.keys() == RECT_KEYS
    assert rect["value"].keys() == {"x", "y", "width", "height", "rotation", "rectanglelabels"}
    assert paint["value"].keys() == {"format", "rle", "brushlabels"}
    for region in regions:
        assert region["to_name"] == "image"
        assert (region["original_width"], region["original_height"], region["image_rotation"]) == (W, H, 0)
        assert type(region["score"]) is float
    assert rect["score"] == paint["score"] == 0.9
    assert regions[2]["score"] == 0.5
    assert rect["value"] == {**box_to_percent(dets.xyxy[0], W, H), "rotation": 0, "rectanglelabels": ["cat"]}
    assert paint["value"]["format"] == "rle"
    assert paint["value"]["rle"] == sdk_rle(dets.masks[0])
    np.testing.assert_array_equal(decoded_alpha(paint["value"]["rle"], H, W), dets.masks[0].astype(np.uint8) * 255)


def test_build_regions_ids_are_unique_short_hex():
    regions = build_regions(detections(["cat", "dog"] * 20), config(rectangles=(RECT,), brushes=(BRUSH,)), W, H)
    ids = [r["id"] for r in regions]
    assert len(ids) == 80 and len(set(ids)) == 80
    assert all(len(i) == 10 and int(i, 16) >= 0 for i in ids)


def test_build_regions_rounds_scores():
    dets = Detections(np.array([[0, 0, 10, 10]], np.float32), np.array([0.123456], np.float32), ("cat",))
    (region,) = build_regions(dets, config(rectangles=(RECT,)), W, H)
    assert region["score"] == 0.1235


def test_build_regions_skips_empty_masks():
    dets = detections(["cat", "dog"])
    masks = dets.masks.copy()
    masks[0] = False
    regions = build_regions(dets.with_masks(masks), config(rectangles=(RECT,), brushes=(BRUSH,)), W, H)
    assert [(r["type"], r["value"][r["type"]][0]) for r in regions] == [
        ("rectanglelabels", "cat"),
        ("rectanglelabels", "dog"),
        ("brushlabels", "dog"),
    ]


def test_build_regions_takes_a_box_from_mask_rows_box_from_the_mask_read():
    """Segment everything's rows (box_from_mask): the rectangle is the box of the mask as read (after clean-up),
    not the stored one; an empty mask gives that row nothing. Other rows keep their own box."""
    dets = detections(["cat", "dog", "cat"])
    masks = dets.masks.copy()
    masks[0] = False
    masks[0, 10:20, 12:16] = True  # smaller than the stored box, as after islands were dropped
    masks[2] = False
    dets = Detections(dets.xyxy, dets.scores, dets.labels, masks, box_from_mask=[True, False, True])
    regions = build_regions(dets, config(rectangles=(RECT,), brushes=(BRUSH,)), W, H)
    assert [(r["type"], r["value"][r["type"]][0]) for r in regions] == [
        ("rectanglelabels", "cat"), ("brushlabels", "cat"), ("rectanglelabels", "dog"), ("brushlabels", "dog")]
    assert regions[0]["value"] == {**box_to_percent([12, 10, 16, 20], W, H), "rotation": 0, "rectanglelabels": ["cat"]}
    assert regions[2]["value"]["x"] == box_to_percent(dets.xyxy[1], W, H)["x"]
    with pytest.raises(ValueError, match="box_from_mask 2"):
        Detections(dets.xyxy, dets.scores, dets.labels, box_from_mask=[True, False])


def test_build_regions_rejects_masks_of_another_size():
    dets = detections(["cat"])
    wrong = dets.with_masks(np.zeros((1, W, H), bool))
    with pytest.raises(ValueError, match=r"\(64, 48\).*\(48, 64\)"):
        build_regions(wrong, config(brushes=(BRUSH,)), W, H)


def test_build_regions_no_detections():
    assert build_regions(Detections.empty(), config(rectangles=(RECT,), brushes=(BRUSH,)), W, H) == []


@pytest.mark.parametrize(
    "scores, expected",
    [([], 0.0), ([0.5], 0.5), ([0.9, 0.5, 0.4], 0.6), ([0.1, 0.2], 0.15)],
)
def test_prediction_mean_score(scores, expected):
    regions = [{"id": str(i), "score": s} for i, s in enumerate(scores)]
    pred = prediction(regions, "grounded-sam-v1")
    assert pred == {"result": regions, "score": pytest.approx(expected), "model_version": "grounded-sam-v1"}
    assert type(pred["score"]) is float
    json.dumps(pred)


def fill(polygons, shape) -> np.ndarray:
    """Rasterise outlines through pixel centres back to a mask (the pixels on and inside each outline)."""
    out = np.zeros(shape, np.uint8)
    for outline in polygons:
        cv2.fillPoly(out, [np.round(outline - 0.5).astype(np.int32)], 1)
    return out.astype(bool)


def ellipses(shape, seed) -> np.ndarray:
    """A mask of a few overlapping ellipses (one part, no holes)."""
    rng = np.random.default_rng(seed)
    out = np.zeros(shape, np.uint8)
    h, w = shape
    for _ in range(4):
        center = (int(w / 2 + rng.uniform(-w / 8, w / 8)), int(h / 2 + rng.uniform(-h / 8, h / 8)))
        axes = (int(rng.uniform(w / 8, w / 3)), int(rng.uniform(h / 8, h / 3)))
        cv2.ellipse(out, center, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return out.astype(bool)


def test_mask_to_polygons_rectangle_has_its_four_pixel_centre_corners():
    mask = np.zeros((H, W), bool)
    mask[5:25, 10:30] = True
    (outline,) = mask_to_polygons(mask)
    assert sorted(map(tuple, outline)) == [(10.5, 5.5), (10.5, 24.5), (29.5, 5.5), (29.5, 24.5)]


@pytest.mark.parametrize("seed", range(4))
def test_mask_to_polygons_outline_fills_back_to_the_mask(seed):
    mask = ellipses((300, 400), seed)
    (exact,) = mask_to_polygons(mask, tolerance=0)
    np.testing.assert_array_equal(fill([exact], mask.shape), mask)
    (simplified,) = mask_to_polygons(mask, tolerance=1.0)
    filled = fill([simplified], mask.shape)
    assert (filled & mask).sum() / (filled | mask).sum() > 0.98
    assert 8 <= len(simplified) < len(exact) / 3


def test_mask_to_polygons_keeps_parts_largest_first_and_drops_specks_and_holes():
    mask = np.zeros((100, 100), bool)
    mask[10:40, 10:40] = True  # 900 px
    mask[20:25, 20:25] = False  # a hole: not kept
    mask[60:80, 60:75] = True  # 300 px
    mask[90:93, 5:8] = True  # 9 px, under a tenth of the largest: a speck
    mask[97, 5:100] = True  # 95 px, but one pixel wide: no polygon
    polygons = mask_to_polygons(mask)
    assert len(polygons) == 2
    np.testing.assert_array_equal(fill(polygons[:1], mask.shape), np.pad(np.ones((30, 30), bool), ((10, 60), (10, 60))))
    assert sorted(map(tuple, polygons[1])) == [(60.5, 60.5), (60.5, 79.5), (74.5, 60.5), (74.5, 79.5)]
    assert mask_to_polygons(np.zeros((10, 10), bool)) == []
    with pytest.raises(ValueError, match="2-D"):
        mask_to_polygons(np.zeros((2, 10, 10), bool))


def test_build_regions_polygon_region_in_percent():
    dets = detections(["cat"])
    (rect, poly) = build_regions(dets, config(rectangles=(RECT,), polygons=(POLY,)), W, H, polygon_tolerance=0.5)
    assert poly.keys() == RECT_KEYS and poly["type"] == "polygonlabels" and poly["from_name"] == "outline"
    assert poly["value"].keys() == {"points", "closed", "polygonlabels"}
    assert poly["value"]["closed"] is True and poly["value"]["polygonlabels"] == ["cat"]
    assert poly["score"] == rect["score"] == 0.9
    # The mask covers pixels x 4..29, y 6..39: corners at those pixels' centres, in percent of W, H.
    expected = [[4.5 * 100 / W, 6.5 * 100 / H], [4.5 * 100 / W, 39.5 * 100 / H],
                [29.5 * 100 / W, 39.5 * 100 / H], [29.5 * 100 / W, 6.5 * 100 / H]]
    assert sorted(poly["value"]["points"]) == sorted(expected)
    assert json.loads(json.dumps(poly)) == poly


def full_image_polygons(mask: np.ndarray, tolerance: float = 1.0) -> list[np.ndarray]:
    """mask_to_polygons as it was (25a3cc2): the same steps on the whole image, the reference for the crop."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    order = np.argsort(-areas, kind="stable")[:20]
    polygons = []
    for part in order[areas[order] >= 0.1 * areas[order[0]]] if count > 1 else ():
        x, y, w, h = stats[part + 1, :4]
        crop = (labels[y : y + h, x : x + w] == part + 1).astype(np.uint8)
        contours, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(int(x), int(y)))
        outline = cv2.approxPolyDP(max(contours, key=len), tolerance, True).reshape(-1, 2)
        if len(outline) >= 3:
            polygons.append(outline.astype(np.float64) + 0.5)
    return polygons


def bounding_box_cases() -> dict[str, np.ndarray]:
    """test_masks' edge cases, islands of equal size (their order), and masks of one bounding box at odd places."""
    from test_masks import EDGE_CASES

    cases = dict(EDGE_CASES)
    ties = np.zeros((40, 41), bool)
    for y, x in ((3, 30), (3, 5), (21, 17), (22, 2), (35, 36)):
        ties[y : y + 3, x : x + 3] = True  # five 9-pixel islands: their order is the labelling's
    cases["equal islands"] = ties
    rng = np.random.default_rng(3)
    for i in range(6):
        mask = np.zeros((int(rng.integers(5, 60)), int(rng.integers(5, 60))), bool)
        y0, x0 = int(rng.integers(0, mask.shape[0])), int(rng.integers(0, mask.shape[1]))
        block = mask[y0 : y0 + int(rng.integers(1, 30)), x0 : x0 + int(rng.integers(1, 30))]
        block[...] = rng.random(block.shape) < 0.6
        cases[f"a ragged box {i}"] = mask
    return cases


BOX_CASES = bounding_box_cases()


@pytest.mark.parametrize("name", BOX_CASES)
def test_rle_on_the_bounding_box_matches_sdk(name):
    mask = BOX_CASES[name]
    assert mask_to_rle(mask) == sdk_rle(mask)
    assert mask_to_rle(mask.astype(np.uint8) * 3) == sdk_rle(mask)


@pytest.mark.parametrize("name", BOX_CASES)
def test_polygons_on_the_bounding_box_are_the_whole_image_ones(name):
    mask = BOX_CASES[name]
    for tolerance in (0.0, 1.0):
        got, expected = mask_to_polygons(mask, tolerance), full_image_polygons(mask, tolerance)
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a, b)


def test_rle_and_polygons_of_a_photo_sized_mask_near_the_border():
    yy, xx = np.mgrid[0:960, 0:1280]
    mask = ((xx - 1250) / 200) ** 2 + ((yy - 30) / 90) ** 2 < 1  # cut by the top and right borders
    mask[40:45, 1200:1205] = False
    assert mask_to_rle(mask) == sdk_rle(mask)
    assert [p.tolist() for p in mask_to_polygons(mask)] == [p.tolist() for p in full_image_polygons(mask)]


@pytest.mark.parametrize("seed", range(30))
def test_polygons_of_one_part_masks_are_the_whole_image_ones(seed):
    """Masks of one 8-connected part (mask_to_polygons reads them without labelling): shapes with holes, notches,
    lines one pixel wide and single pixels, on and off the borders; with an island in a hole or a second part they
    take the labelling path; both give the whole image's outlines."""
    rng = np.random.default_rng(seed)
    height, width = (int(v) for v in rng.integers(3, 90, 2))
    mask = blob(height, width, rng)
    if seed % 3 == 1:
        mask &= ~blob(height, width, rng)  # a bite out of it, or a hole
    if seed % 5 == 2:
        mask[int(rng.integers(0, height)), :] = True  # a line one pixel wide across the image
    if seed % 7 == 3:
        mask = np.zeros_like(mask)
        mask[int(rng.integers(0, height)), int(rng.integers(0, width))] = True
    variants = [mask]
    ring = np.zeros((30, 30), bool)
    ring[5:25, 5:25] = True
    ring[8:22, 8:22] = False
    variants += [ring, ring | np.pad(np.ones((4, 4), bool), 13)]  # one part; an island in its hole: two
    for m in variants:
        for tolerance in (0.0, 1.0, 2.5):
            got, expected = mask_to_polygons(m, tolerance), full_image_polygons(m, tolerance)
            assert [p.tolist() for p in got] == [p.tolist() for p in expected]
