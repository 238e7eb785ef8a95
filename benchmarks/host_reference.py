"""Today's host work, as it was at 25a3cc2 (before issue #23), copied verbatim as the reference of
benchmarks/bench_host.py: the mask clean-up (masks.py), the RLE encoder and the polygons (regions.py) and the
region builder, all over full-image arrays, with the helpers and constants of regions.py they use (so a change there
doesn't change this side of the comparison). Not used by the product."""

from __future__ import annotations

import logging
import uuid

import cv2
import numpy as np

from detections import Detections
from labeling import LabelingConfig
from masks import CleanupParams

logger = logging.getLogger(__name__)

# The LS brush RLE (thi-ng rle-pack) header: 32-bit value count, 5-bit word size - 1, four 4-bit run-size classes - 1.
_WORD_SIZE = 8
_RLE_SIZES = (3, 4, 8, 16)  # bits of the run length field for run classes 0..3
_CHUNK = 2**16  # runs longer than this are split into chunks of exactly 2**16 values
# A mask's parts smaller than this share of its largest part are specks, not polygons; at most this many parts.
_MIN_PART_SHARE = 0.1
_MAX_PARTS = 20


def _header_code(num: int) -> tuple[list[int], list[int]]:
    """The header as two tokens (codes, widths): the value count, then word size and run-size classes."""
    if num >= 2**32:
        raise ValueError(f"RLE: {num} values do not fit the 32-bit count of the LS brush format")
    sizes = 0
    for size in _RLE_SIZES:
        sizes = (sizes << 4) | (size - 1)
    return [num, ((_WORD_SIZE - 1) << 16) | sizes], [32, 5 + 16]


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


def _new_id(used: set[str]) -> str:
    """A short random hex region id, not yet in used (ids must be unique within one response)."""
    while True:
        region_id = uuid.uuid4().hex[:10]
        if region_id not in used:
            used.add(region_id)
            return region_id


def _remove_small(mask: np.ndarray, min_area: int, holes: bool) -> np.ndarray:
    """remove_small_regions(mask, min_area, "holes" if holes else "islands")[0], bit for bit, computed on the
    mask's bounding box where that gives the same components, with a lookup table instead of np.isin (the same
    labels; a speckled 12-megapixel mask has thousands of them). mask: (H, W) bool."""
    height, width = mask.shape
    if not mask.any():  # no island; the one "hole" is the whole image (filled if the image is that small)
        return np.ones_like(mask) if holes and 0 < mask.size < min_area else mask
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    # Islands all lie in the bounding box. For holes, a 1-pixel margin of background around it (where the image
    # has room) joins every hole touching the margin to the region outside the crop; when each band of the image
    # outside the crop has at least min_area pixels, such a hole is never small, so the crop decides the rest.
    margin = 1 if holes else 0
    # The crop starts on even coordinates: OpenCV labels 8-connected components in 2x2 blocks, so the labels
    # come in the full image's order and a tie for the largest island keeps the same one.
    y0, y1 = max(rows[0] - margin, 0) // 2 * 2, min(rows[-1] + 1 + margin, height)
    x0, x1 = max(cols[0] - margin, 0) // 2 * 2, min(cols[-1] + 1 + margin, width)
    bands = [a for a in (x0 * height, (width - x1) * height, y0 * width, (height - y1) * width) if a > 0]
    if holes and bands and min(bands) < min_area:
        y0, y1, x0, x1 = 0, height, 0, width
    crop = mask[y0:y1, x0:x1]
    working = (~crop if holes else crop).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(working, connectivity=8)
    sizes = stats[1:, cv2.CC_STAT_AREA]
    small = sizes < min_area
    if holes:
        outside = [side for side, cut in ((labels[0], y0 > 0), (labels[-1], y1 < height), (labels[:, 0], x0 > 0),
                                          (labels[:, -1], x1 < width)) if cut]
        if outside:
            small[np.unique(np.concatenate(outside)) - 1] = False  # margin pixels are all background: labels >= 1
    if not small.any():
        return mask
    fill = np.zeros(count, bool)  # the labels that become foreground
    if holes:
        fill[0] = True  # the mask itself (background of the inverted mask)
        fill[1:] = small
    else:
        fill[1:] = ~small
        if not fill.any():  # every island is small: keep the largest
            fill[int(np.argmax(sizes)) + 1] = True
    out = np.zeros_like(mask) if not holes else mask.copy()
    out[y0:y1, x0:x1] = fill[labels]
    return out


def clean_mask(mask: np.ndarray, params: CleanupParams) -> np.ndarray:
    """(H, W) bool -> (H, W) bool: smoothed (params.smooth), then holes and islands under params.min_area
    filled / dropped. Returns the input itself when nothing is to be done."""
    mask = np.asarray(mask, dtype=bool)
    if params.smooth > 0 and mask.any():
        size = 2 * params.smooth + 1
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
        work = mask.astype(np.uint8)
        work = cv2.morphologyEx(work, cv2.MORPH_OPEN, kernel)
        work = cv2.morphologyEx(work, cv2.MORPH_CLOSE, kernel)
        mask = work.astype(bool)
    if params.min_area > 0:
        mask = _remove_small(mask, params.min_area, holes=True)
        mask = _remove_small(mask, params.min_area, holes=False)
    return mask


def mask_box(mask: np.ndarray) -> list[float]:
    """(H, W) bool -> [x0, y0, x1, y1] image pixels, x1 / y1 exclusive (the pixel edges); zeros when empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return [0.0, 0.0, 0.0, 0.0]
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def _encode_runs(lengths: np.ndarray, values: np.ndarray, num: int) -> list[int]:
    """Encode runs (lengths >= 1, values 0..255, summing to num) into LS brush RLE bytes.

    lengths: (R,) int64 run lengths in values of the flat array; values: (R,) the value of each run.
    Returns a list of Python ints 0..255, identical to brush.encode_rle on the expanded array.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    values = np.asarray(values, dtype=np.int64)

    # Run class: 0 for length <= 8 (and single values), 1 for <= 16, 2 for <= 256, 3 for longer.
    cls = (lengths > 8).astype(np.int64) + (lengths > 16) + (lengths > 256)
    n_bits = np.array(_RLE_SIZES, dtype=np.int64)[cls]
    # The SDK splits a class-3 run into chunks while more than 2**16 values remain; each chunk covers 2**16 values
    # and is written with length field 2**16 - 1. The run's final token then carries what is left.
    n_chunks = np.where(cls == 3, (lengths - 1) // _CHUNK, 0)
    field = lengths - n_chunks * _CHUNK - 1
    flag = (lengths > 1).astype(np.int64)  # 0: literal values follow (only length-1 runs here), 1: a repeated value
    codes = (flag << (2 + n_bits + _WORD_SIZE)) | (cls << (n_bits + _WORD_SIZE)) | (field << _WORD_SIZE) | values
    widths = 1 + 2 + n_bits + _WORD_SIZE
    if n_chunks.any():  # only runs over 2**16 values: rare, so the common case skips the expansion
        per_run = n_chunks + 1
        final = np.cumsum(per_run) - 1
        chunk_code = (1 << (2 + 16 + _WORD_SIZE)) | (3 << (16 + _WORD_SIZE)) | ((_CHUNK - 1) << _WORD_SIZE) | values
        all_codes = np.repeat(chunk_code, per_run)
        all_codes[final] = codes
        all_widths = np.full(len(all_codes), 1 + 2 + 16 + _WORD_SIZE, dtype=np.int64)
        all_widths[final] = widths
        codes, widths = all_codes, all_widths

    head_codes, head_widths = _header_code(num)
    codes = np.concatenate([np.array(head_codes, dtype=np.int64), codes])
    widths = np.concatenate([np.array(head_widths, dtype=np.int64), widths])
    return _pack_bits(codes, widths)


def _pack_bits(codes: np.ndarray, widths: np.ndarray) -> list[int]:
    """Concatenate codes (int64, each < 2**width) MSB first, pad like the SDK, return the bytes as a list of ints.

    Every code is at most 32 bits wide, so it lands in one or two big-endian 32-bit words. The codes cover
    disjoint bits, so summing their contributions per word is a bitwise OR; float64 sums of integers < 2**32
    are exact, which lets np.bincount do the scatter.
    """
    offsets = np.cumsum(widths) - widths
    total_bits = int(offsets[-1] + widths[-1])
    # The SDK pads with 8 - len % 8 zero bits: a whole zero byte when the length is already a multiple of 8.
    n_bytes = total_bits // 8 + 1
    n_words = (n_bytes + 3) // 4

    word = offsets >> 5
    end = (offsets & 31) + widths  # where the code ends, counted from the start of its first word
    spill = np.maximum(end - 32, 0)  # bits that run into the next word
    first = (codes >> spill) << np.maximum(32 - end, 0)
    second = (codes & ((1 << spill) - 1)) << (32 - spill)
    has_second = spill > 0
    index = np.concatenate([word, word[has_second] + 1])
    weights = np.concatenate([first, second[has_second]]).astype(np.float64)
    words = np.bincount(index, weights=weights, minlength=n_words).astype(np.uint32)
    return np.frombuffer(words.astype(">u4").tobytes(), dtype=np.uint8)[:n_bytes].tolist()


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """(H, W) bool mask (row-major, nonzero = foreground) -> Label Studio brush RLE as a list of ints 0..255.

    Byte for byte label_studio_sdk.converter.brush.mask2rle(mask.astype(np.uint8) * 255): the mask is encoded as
    H*W RGBA pixels, every channel 255 on the foreground and 0 elsewhere. Rather than repeating the image 4x, the
    runs of the flat mask are found once and their lengths multiplied by 4.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask_to_rle: mask must be 2-D (H, W), got shape {mask.shape}")
    flat = mask.reshape(-1).astype(bool, copy=False)
    if flat.size == 0:
        return _pack_bits(*map(np.array, _header_code(0)))
    starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate([[0], starts])
    lengths = np.diff(np.append(starts, flat.size)) * 4
    values = flat[starts].astype(np.int64) * 255
    return _encode_runs(lengths, values, flat.size * 4)


def mask_to_polygons(mask: np.ndarray, tolerance: float = 1.0) -> list[np.ndarray]:
    """(H, W) bool mask -> one outline per part, each (K, 2) float64 x, y in image pixels, K >= 3.

    Parts are the 8-connected pieces of the mask, largest first; pieces under a tenth of the largest are
    dropped as specks (at most 20 parts), and holes are not kept (a Label Studio polygon has none). Each
    outline runs through the centres of the part's boundary pixels, (x + 0.5, y + 0.5), simplified with
    Douglas-Peucker so the outline stays within `tolerance` pixels of it; outlines of fewer than 3 vertices
    after that (lines one pixel wide) are dropped.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask_to_polygons: mask must be 2-D (H, W), got shape {mask.shape}")
    # Sizes from connected components (C++), so a speckled mask's many specks cost no Python loop.
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    order = np.argsort(-areas, kind="stable")[:_MAX_PARTS]
    polygons = []
    for part in order[areas[order] >= _MIN_PART_SHARE * areas[order[0]]] if count > 1 else ():
        x, y, w, h = stats[part + 1, :4]
        crop = (labels[y : y + h, x : x + w] == part + 1).astype(np.uint8)
        contours, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(int(x), int(y)))
        outline = cv2.approxPolyDP(max(contours, key=len), tolerance, True).reshape(-1, 2)
        if len(outline) >= 3:
            polygons.append(outline.astype(np.float64) + 0.5)
    return polygons


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

    # Masks are read once each, in order: a lazy mask sequence then computes them a few at a time.
    masks = iter(detections.masks) if detections.masks is not None else None
    for i, label in enumerate(detections.labels):
        mask = next(masks) if masks is not None else None
        score = round(float(detections.scores[i]), 4)
        box = detections.xyxy[i]
        if mask is not None and detections.box_from_mask[i]:
            if not mask.any():
                continue
            box = mask_box(mask)  # after the clean-up, which may have dropped or filled parts
        if label in rect_for:
            add(rect_for[label], "rectanglelabels", {**box_to_percent(box, width, height), "rotation": 0}, label,
                score)
        if mask is None or (label not in brush_for and label not in polygon_for):
            continue
        if not mask.any():
            # An empty mask renders as nothing and only clutters the task.
            logger.debug("skipping the empty mask of detection %d (%s)", i, label)
            continue
        if label in brush_for:
            add(brush_for[label], "brushlabels", {"format": "rle", "rle": mask_to_rle(mask)}, label, score)
        if label in polygon_for:
            for outline in mask_to_polygons(mask, polygon_tolerance):
                points = (outline * 100.0 / np.array([width, height])).tolist()
                add(polygon_for[label], "polygonlabels", {"points": points, "closed": True}, label, score)
    return regions
