"""Detections -> Label Studio result regions (rectangles and polygons in percent, brush masks as LS RLE).

Pure functions. The RLE encoder reproduces label_studio_sdk.converter.brush byte for byte, vectorised with numpy:
the SDK's encoder builds a Python string bit by bit, which takes seconds on a 12-megapixel mask.
"""

from __future__ import annotations

import logging
import uuid

import cv2
import numpy as np

from detections import Detections
from labeling import LabelingConfig
from masks import even_crop, mask_bounds, with_bounds

logger = logging.getLogger(__name__)

# The LS brush RLE (thi-ng rle-pack) header: 32-bit value count, 5-bit word size - 1, four 4-bit run-size classes - 1.
_WORD_SIZE = 8
_RLE_SIZES = (3, 4, 8, 16)  # bits of the run length field for run classes 0..3
_HEADER_BITS = 32 + 5 + 16
_CHUNK = 2**16  # runs longer than this are split into chunks of exactly 2**16 values
_CHUNK_BITS = 1 + 2 + 16 + _WORD_SIZE  # a chunk's token
_CLASS_LIMITS = np.array([8, 16, 256])  # the longest run of classes 0..2
# A token's flag and class shifted past its length field, and its width in bits, by flag << 2 | class.
_HEADS = np.array([(flag << 2 | c) << _RLE_SIZES[c] for flag in (0, 1) for c in range(4)], dtype=np.int64)
_WIDTHS = np.array([1 + 2 + _RLE_SIZES[c] + _WORD_SIZE for flag in (0, 1) for c in range(4)], dtype=np.int64)
# A mask's parts smaller than this share of its largest part are specks, not polygons; at most this many parts.
_MIN_PART_SHARE = 0.1
_MAX_PARTS = 20
# At most this many runs of masks wait to be encoded together (each takes ~100 bytes in the encoder's arrays).
_RLE_BATCH_RUNS = 2**18


def _encode_runs(lengths: np.ndarray, values: np.ndarray, num: int) -> list[int]:
    """Encode runs (lengths >= 1, values 0..255, summing to num) into LS brush RLE bytes.

    lengths: (R,) int64 run lengths in values of the flat array; values: (R,) the value of each run.
    Returns a list of Python ints 0..255, identical to brush.encode_rle on the expanded array.
    """
    return _encode_streams(np.asarray(lengths, np.int64), np.asarray(values, np.int64), np.array([len(lengths)]),
                           np.array([num]))[0]


def _encode_streams(lengths: np.ndarray, values: np.ndarray, counts: np.ndarray, nums: np.ndarray
                    ) -> list[list[int]]:
    """Several RLE streams encoded at once: numpy's cost per call, not per run, is most of a smooth mask's encoding
    (a few hundred runs), so an answer's masks share each step.

    lengths, values: (R,) int64, the runs of all streams one after the other (lengths >= 1, values 0..255);
    counts: (M,) int64 runs of each stream; nums: (M,) its values in all (its lengths' sum). Returns M lists of
    ints 0..255, each identical to brush.encode_rle on its stream's expanded array.
    """
    if (nums >= 2**32).any():
        raise ValueError(f"RLE: {int(nums.max())} values do not fit the 32-bit count of the LS brush format")
    # Run class: 0 for length <= 8 (and single values), 1 for <= 16, 2 for <= 256, 3 for longer.
    # A run's token: a flag (0: literal values follow, only length-1 runs here; 1: a repeated value), its class,
    # its length - 1 in the class's bits, then the value. The flag and class, shifted past the length field, and
    # the token's width come from tables by (flag, class): few passes over a ragged mask's many runs.
    key = ((lengths > 1) << 2) | np.searchsorted(_CLASS_LIMITS, lengths)
    codes = ((_HEADS[key] | (lengths - 1)) << _WORD_SIZE) | values
    widths = _WIDTHS[key]
    spans = widths  # the bits of each run's tokens
    long = None
    if lengths.max(initial=0) > _CHUNK:
        # The SDK splits a class-3 run into chunks while more than 2**16 values remain; each chunk covers 2**16
        # values and is written with length field 2**16 - 1. The run's final token then carries what is left.
        # Only runs over 2**16 values (a mask's few long runs of background): their chunks' tokens are placed
        # by bit offset after the others, so the other runs take no extra pass.
        long = np.flatnonzero(lengths > _CHUNK)
        n_chunks = (lengths[long] - 1) // _CHUNK
        codes[long] = ((_HEADS[key[long]] | (lengths[long] - n_chunks * _CHUNK - 1)) << _WORD_SIZE) | values[long]
        spans = widths.copy()
        spans[long] += n_chunks * _CHUNK_BITS
    # Each stream: its 53-bit header, its tokens, the SDK's padding (8 - len % 8 zero bits: a whole zero byte when
    # the length is a multiple of 8); the streams lie one after the other in one bit array, each from a 32-bit word.
    ends = np.cumsum(spans)
    firsts = np.cumsum(counts) - counts  # each stream's first run
    before = np.concatenate([[0], ends])[firsts]  # the tokens' bits before each stream
    n_bytes = (_HEADER_BITS + np.concatenate([[0], ends])[firsts + counts] - before) // 8 + 1
    n_words = (n_bytes + 3) // 4
    base = 32 * (np.cumsum(n_words) - n_words)  # each stream's first bit
    ends = ends + np.repeat(base + _HEADER_BITS - before, counts)
    offsets = ends - widths  # a run's final token ends its span
    if long is not None:
        run = np.repeat(long, n_chunks)
        nth = np.arange(len(run)) - np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)  # 0, 1, ... a run
        chunk = (1 << (2 + 16 + _WORD_SIZE)) | (3 << (16 + _WORD_SIZE)) | ((_CHUNK - 1) << _WORD_SIZE)
        codes = np.concatenate([codes, chunk | values[run]])
        offsets = np.concatenate([offsets, ends[run] - spans[run] + nth * _CHUNK_BITS])
        widths = np.concatenate([widths, np.full(len(run), _CHUNK_BITS)])
    # Every token (at most 27 bits) lands in one or two big-endian 32-bit words: shifted in 64 bits to its offset
    # in the first, its high half goes to that word and its low half to the next. Tokens cover disjoint bits, so
    # summing their parts per word is a bitwise OR, which lets np.bincount do the scatter (sums below 2**32:
    # exact in float64; weights given as float64, which np.bincount takes several times faster than integers).
    total_words = int(n_words.sum())
    placed = codes.astype(np.uint64) << (64 - (offsets & 31) - widths).astype(np.uint64)
    word = offsets >> 5
    words = np.bincount(word, weights=(placed >> 32).astype(np.float64), minlength=total_words + 1)
    words += np.bincount(word + 1, weights=(placed & 0xFFFFFFFF).astype(np.float64), minlength=total_words + 1)
    # The header: the value count (a word), then word size - 1 and the run-size classes - 1 (21 bits).
    sizes = 0
    for size in _RLE_SIZES:
        sizes = (sizes << 4) | (size - 1)
    words[base // 32] += nums
    words[base // 32 + 1] += (((_WORD_SIZE - 1) << 16) | sizes) << (64 - _HEADER_BITS)
    data = words[:total_words].astype(">u4").tobytes()
    return [list(data[b : b + n]) for b, n in zip((base // 8).tolist(), n_bytes.tolist(), strict=True)]


def encode_rle(array: np.ndarray) -> list[int]:
    """(N,) uint8 flat array -> LS RLE bytes, identical to brush.encode_rle(array) (word size 8, sizes 3, 4, 8, 16)."""
    flat = np.asarray(array).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() > 255):
        raise ValueError("encode_rle: values must be in 0..255")
    starts = np.flatnonzero(np.concatenate([[True], flat[1:] != flat[:-1]])) if flat.size else np.zeros(0, np.int64)
    lengths = np.diff(np.append(starts, flat.size))
    return _encode_runs(lengths, flat[starts], flat.size)


def _mask_cuts(mask: np.ndarray, bounds: tuple[int, int, int, int] | None) -> tuple[np.ndarray, int]:
    """(H, W) mask (nonzero = foreground) with its masks.mask_bounds -> where its runs meet in the flat image,
    (R + 1,) int64 rising from 0 to H * W, and the value of its first run (0 background, 1 foreground).

    Found on the mask's bounding box: the runs of background around it follow from its place in the image."""
    height, width = mask.shape
    total = height * width
    if bounds is None:  # an empty mask: one run of background (none in an empty image)
        return np.array([0, total] if total else [0]), 0
    y0, y1, x0, x1 = bounds
    h, w = y1 - y0, x1 - x0
    # The box's rows as they lie in the flat image, each followed by one column standing for the background up
    # to the next row's box (none when the box spans the width), between a background value on each end.
    cols = w + (w < width)
    laid = np.zeros(h * cols + 2, bool)
    laid[1:-1].reshape(h, cols)[:, :w] = mask[y0:y1, x0:x1]
    change = np.flatnonzero(laid[1:] != laid[:-1])  # change p: value p of the rows differs from the one before
    rows, cols_at = np.divmod(change, cols)
    changes = (y0 + rows) * width + x0 + cols_at  # where each run after a change starts in the flat image
    changes = changes[changes < total]  # a change at the image's very end starts no run
    first = int(changes[0] == 0)  # the image starts with a run of foreground
    return np.concatenate((changes, [total]) if first else ([0], changes, [total])), first


def _masks_rle(cuts: list[tuple[np.ndarray, int]]) -> list[list[int]]:
    """The LS brush RLEs of several masks at once, each from its _mask_cuts (cuts, first value): the encoder's
    steps run once for all of them (_encode_streams)."""
    joined = np.concatenate([c for c, _ in cuts])
    counts = np.array([len(c) - 1 for c, _ in cuts])
    steps = np.diff(joined)
    lengths = steps[steps > 0] * 4  # each pixel is 4 RGBA values; from one mask's end to the next's start: < 0
    firsts = np.cumsum(counts) - counts
    parity = np.repeat(np.array([first for _, first in cuts]) - firsts, counts)
    values = ((np.arange(len(lengths)) + parity) & 1) * 255  # runs alternate between background and foreground
    return _encode_streams(lengths, values, counts, np.array([c[-1] for c, _ in cuts]) * 4)


def mask_to_rle(mask: np.ndarray, bounds: tuple[int, int, int, int] | None = ()) -> list[int]:
    """(H, W) mask (row-major, nonzero = foreground) -> Label Studio brush RLE as a list of ints 0..255.
    bounds: masks.mask_bounds(mask) when the caller has it (the default, (), finds them).

    Byte for byte label_studio_sdk.converter.brush.mask2rle(mask.astype(np.uint8) * 255): the mask is encoded as
    H*W RGBA pixels, every channel 255 on the foreground and 0 elsewhere. Rather than repeating the image 4x, the
    runs of the flat mask are found once and their lengths multiplied by 4; and only on the mask's bounding box
    (_mask_cuts). build_regions encodes an answer's masks together (_masks_rle).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask_to_rle: mask must be 2-D (H, W), got shape {mask.shape}")
    return _masks_rle([_mask_cuts(mask, mask_bounds(mask) if bounds == () else bounds)])[0]


def mask_to_polygons(mask: np.ndarray, tolerance: float = 1.0, bounds: tuple[int, int, int, int] | None = ()
                     ) -> list[np.ndarray]:
    """(H, W) bool mask -> one outline per part, each (K, 2) float64 x, y in image pixels, K >= 3.

    Parts are the 8-connected pieces of the mask, largest first; pieces under a tenth of the largest are
    dropped as specks (at most 20 parts), and holes are not kept (a Label Studio polygon has none). Each
    outline runs through the centres of the part's boundary pixels, (x + 0.5, y + 0.5), simplified with
    Douglas-Peucker so the outline stays within `tolerance` pixels of it; outlines of fewer than 3 vertices
    after that (lines one pixel wide) are dropped. Computed on the mask's bounding box (masks.even_crop: the
    parts come in the full image's order); bounds: masks.mask_bounds(mask) when the caller has it (the
    default, (), finds them).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask_to_polygons: mask must be 2-D (H, W), got shape {mask.shape}")
    bounds = mask_bounds(mask) if bounds == () else bounds
    if bounds is None:
        return []
    y0, y1, x0, x1 = even_crop(bounds, 0, *mask.shape)
    crop = mask[y0:y1, x0:x1].astype(np.uint8)
    # A mask of one part (most) needs no labelling: OpenCV's contour tracing (8-connected foreground) gives every
    # part one outer border, the top level of RETR_CCOMP's two (islands in holes are there too), traced from the
    # part's first pixel as it is alone: the outline found below, at several times less than labelling the box.
    contours, hierarchy = cv2.findContours(crop, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE, offset=(x0, y0))
    outer = np.flatnonzero(hierarchy[0, :, 3] < 0)
    if len(outer) == 1:
        outline = cv2.approxPolyDP(contours[outer[0]], tolerance, True).reshape(-1, 2)
        return [outline.astype(np.float64) + 0.5] if len(outline) >= 3 else []
    # Sizes from connected components (C++), so a speckled mask's many specks cost no Python loop.
    count, labels, stats, _ = cv2.connectedComponentsWithStats(crop, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    order = np.argsort(-areas, kind="stable")[:_MAX_PARTS]
    polygons = []
    for part in order[areas[order] >= _MIN_PART_SHARE * areas[order[0]]]:
        x, y, w, h = stats[part + 1, :4]
        crop = (labels[y : y + h, x : x + w] == part + 1).astype(np.uint8)
        contours, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE,
                                       offset=(int(x + x0), int(y + y0)))
        outline = cv2.approxPolyDP(max(contours, key=len), tolerance, True).reshape(-1, 2)
        if len(outline) >= 3:
            polygons.append(outline.astype(np.float64) + 0.5)
    return polygons


def box_to_percent(xyxy, width: int, height: int) -> dict:
    """(4,) x0, y0, x1, y1 in image pixels -> {"x", "y", "width", "height"} in percent of the image.

    The box is clipped to the image first (detector boxes can overshoot the border); the values are plain floats.
    """
    x0, y0, x1, y1 = (float(v) for v in np.asarray(xyxy, dtype=np.float64).reshape(4))
    x0, x1 = sorted((min(max(x0, 0.0), width), min(max(x1, 0.0), width)))
    y0, y1 = sorted((min(max(y0, 0.0), height), min(max(y1, 0.0), height)))
    return {
        "x": x0 * 100.0 / width,
        "y": y0 * 100.0 / height,
        "width": (x1 - x0) * 100.0 / width,
        "height": (y1 - y0) * 100.0 / height,
    }


def percent_to_box(value: dict, width: int, height: int) -> np.ndarray:
    """LS {"x", "y", "width", "height"} in percent of the image -> (4,) float32 x0, y0, x1, y1 in image pixels."""
    x, y = float(value["x"]), float(value["y"])
    w, h = float(value["width"]), float(value["height"])
    return np.array(
        [x * width / 100.0, y * height / 100.0, (x + w) * width / 100.0, (y + h) * height / 100.0], dtype=np.float32
    )


def _new_id(used: set[str]) -> str:
    """A short random hex region id, not yet in used (ids must be unique within one response)."""
    while True:
        region_id = uuid.uuid4().hex[:10]
        if region_id not in used:
            used.add(region_id)
            return region_id


def build_regions(detections: Detections, config: LabelingConfig, width: int, height: int,
                  polygon_tolerance: float = 1.0) -> list[dict]:
    """Rectanglelabels, brushlabels and polygonlabels regions for each detection, as LS prediction results.

    detections: boxes in pixels of the displayed image, masks (N, height, width) bool or None.
    width, height: the displayed image size (LS's original_width / original_height).
    A detection gets a rectangle when a RectangleLabels control has its label (the first such control; for a
    `box_from_mask` row, the box of its mask as read, and nothing when that mask is empty); when it
    has a non-empty mask, a brush when a BrushLabels control has its label and one polygon per part of the mask
    (mask_to_polygons, `polygon_tolerance` pixels) when a PolygonLabels control has it. Labels no control has
    get nothing. Raises ValueError when the masks are not (height, width): the RLE only renders at that size.
    """
    if detections.masks is not None and detections.masks.shape[1:] != (height, width):
        raise ValueError(
            f"build_regions: masks have shape {detections.masks.shape[1:]} but the image is (height, width) = "
            f"{(height, width)}"
        )

    def control_for(controls) -> dict:
        found = {}
        for control in controls:
            for label in control.labels:
                found.setdefault(label, control)
        return found

    rect_for, brush_for, polygon_for = (control_for(c) for c in (config.rectangles, config.brushes, config.polygons))
    used: set[str] = set()
    regions: list[dict] = []

    def add(control, kind: str, value: dict, label: str, score: float) -> None:
        regions.append({"id": _new_id(used), "from_name": control.name, "to_name": config.image_name, "type": kind,
                        "original_width": width, "original_height": height, "image_rotation": 0,
                        "value": {**value, kind: [label]}, "score": score})

    # Masks are read once each, in order (a lazy mask sequence then computes them a few at a time), with their
    # bounding boxes: everything below works on those, none of it on the whole image.
    masks = with_bounds(detections.masks) if detections.masks is not None else None
    # The brushes' runs wait for their RLE, encoded together (_masks_rle), up to _RLE_BATCH_RUNS runs at a time.
    brushes: list[tuple[dict, tuple[np.ndarray, int]]] = []

    def encode_brushes() -> None:
        for value, rle in zip([v for v, _ in brushes], _masks_rle([c for _, c in brushes]), strict=True):
            value["rle"] = rle
        brushes.clear()

    for i, label in enumerate(detections.labels):
        mask, bounds = next(masks) if masks is not None else (None, None)
        score = round(float(detections.scores[i]), 4)
        box = detections.xyxy[i]
        if mask is not None and detections.box_from_mask[i]:
            if bounds is None:
                continue
            box = [bounds[2], bounds[0], bounds[3], bounds[1]]  # after the clean-up, which may drop or fill parts
        if label in rect_for:
            add(rect_for[label], "rectanglelabels", {**box_to_percent(box, width, height), "rotation": 0}, label,
                score)
        if mask is None or (label not in brush_for and label not in polygon_for):
            continue
        if bounds is None:
            # An empty mask renders as nothing and only clutters the task.
            logger.debug("skipping the empty mask of detection %d (%s)", i, label)
            continue
        if label in brush_for:
            add(brush_for[label], "brushlabels", {"format": "rle", "rle": None}, label, score)
            brushes.append((regions[-1]["value"], _mask_cuts(mask, bounds)))
            if sum(len(c) for _, (c, _) in brushes) > _RLE_BATCH_RUNS:
                encode_brushes()
        if label in polygon_for:
            for outline in mask_to_polygons(mask, polygon_tolerance, bounds):
                points = (outline * 100.0 / np.array([width, height])).tolist()
                add(polygon_for[label], "polygonlabels", {"points": points, "closed": True}, label, score)
    if brushes:
        encode_brushes()
    return regions


def prediction(regions: list[dict], model_version: str) -> dict:
    """One LS prediction: the regions, their mean score (0.0 when there are none) and the model version."""
    scores = [float(r["score"]) for r in regions if "score" in r]
    mean = round(sum(scores) / len(scores), 4) if scores else 0.0
    return {"result": regions, "score": mean, "model_version": model_version}
