"""Mask clean-up between the segmenter and the region builder: smoothing, holes filled, islands dropped. Pure.

SAM's masks "can have disjointed parts, holes, and jagged edges". Every mask the pipeline hands to the region
builder (text prompts, clicks, boxes, segment everything; brushes and polygons alike) goes through `clean_mask`:

1. optional morphological smoothing: an opening, then a closing, with an elliptical kernel of radius `smooth`
   pixels (diameter 2 * smooth + 1);
2. holes smaller than `min_area` pixels filled, then islands smaller than `min_area` dropped (a mask whose
   islands are all smaller keeps its largest), 8-connected: the output is that of segment_anything's
   `utils.amg.remove_small_regions(mask, min_area, "holes")` then `(..., "islands")`, the same steps SAM's
   automatic mask generator runs for `min_mask_region_area` (tests/test_masks.py).

Frames: masks are (H, W) bool in pixels of the displayed image (the image as Label Studio shows it).
`CleanedMasks` wraps a (possibly lazy) (N, H, W) mask sequence and cleans each mask as it is read, so the
region builder's memory behaviour (a few full-size masks at a time, sam_wrapper.UpscaledMasks) is kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import cv2
import numpy as np

from detections import LazyMasks
from errors import ParamsError


@dataclass(frozen=True)
class CleanupParams:
    """min_area: holes and islands smaller than this many image pixels are filled / dropped (0: off).
    smooth: radius in image pixels of the opening + closing kernel (0: off)."""

    min_area: int = 0
    smooth: int = 0

    @property
    def active(self) -> bool:
        return self.min_area > 0 or self.smooth > 0


def cleanup_params(values: Mapping, min_area: int, smooth: int, prefix: str = "") -> CleanupParams:
    """CleanupParams from `values` ({"mask_min_area", "mask_smooth"}, each optional) over the given defaults;
    ParamsError names the key (after `prefix`) and the range."""

    def whole(key, default, hi):
        value = values.get(key, default)
        if (isinstance(value, bool) or not isinstance(value, int | float) or value != int(value)
                or not 0 <= value <= hi):
            raise ParamsError(f"{prefix}{key} must be a whole number between 0 and {hi}, got {value!r}")
        return int(value)

    return CleanupParams(whole("mask_min_area", min_area, 10**8), whole("mask_smooth", smooth, 100))


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


class CleanedMasks(LazyMasks):
    """N masks (H, W) bool: `masks` (an array or a lazy sequence such as sam_wrapper.UpscaledMasks) cleaned
    with `params` as they are read. Iterating reads the source in order, one mask at a time, so no more
    full-size masks exist at once than the source itself holds; np.asarray() gives the whole (N, H, W) array."""

    def __init__(self, masks, params: CleanupParams):
        super().__init__(len(masks), tuple(masks.shape[1:]))
        self.masks, self.params = masks, params

    def __getitem__(self, index: int) -> np.ndarray:
        return clean_mask(self.masks[index], self.params)

    def __iter__(self):
        for mask in self.masks:
            yield clean_mask(mask, self.params)


class ConcatMasks(LazyMasks):
    """Several (Ni, H, W) mask sequences (arrays or lazy) read one after the other as one (sum Ni, H, W)."""

    def __init__(self, parts):
        self.parts = list(parts)
        super().__init__(sum(len(p) for p in self.parts), tuple(self.parts[0].shape[1:]))

    def __getitem__(self, index: int) -> np.ndarray:
        for part in self.parts:
            if index < len(part):
                return part[index]
            index -= len(part)
        raise IndexError(index)

    def __iter__(self):
        for part in self.parts:
            yield from part


def cleaned(masks, params: CleanupParams):
    """`masks` ((N, H, W) bool array or lazy sequence) cleaned as read; the masks themselves when params are off."""
    return CleanedMasks(masks, params) if params.active and len(masks) else masks
