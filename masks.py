"""Mask clean-up between the segmenter and the region builder: smoothing, holes filled, islands dropped. Pure.

SAM's masks "can have disjointed parts, holes, and jagged edges". Every mask the pipeline hands to the region
builder (text prompts, clicks, boxes, segment everything; brushes and polygons alike) goes through `clean_mask`:

1. optional morphological smoothing: an opening, then a closing, with an elliptical kernel of radius `smooth`
   pixels (diameter 2 * smooth + 1);
2. holes smaller than `min_area` pixels filled, then islands smaller than `min_area` dropped (a mask whose
   islands are all smaller keeps its largest), 8-connected: the output is that of segment_anything's
   `utils.amg.remove_small_regions(mask, min_area, "holes")` then `(..., "islands")`, the same steps SAM's
   automatic mask generator runs for `min_mask_region_area` (tests/test_masks.py).

Every step works on the mask's bounding box (mask_bounds, the one pass over the whole image; with the margin each
step needs), and CleanedMasks hands that box on to the region builder (with_bounds), so the work follows the size
of the object, not of the image; the outputs are the whole-image algorithms', bit for bit (tests/test_masks.py).

Frames: masks are (H, W) bool in pixels of the displayed image (the image as Label Studio shows it).
`CleanedMasks` wraps a (possibly lazy) (N, H, W) mask sequence and cleans each mask as it is read, so the
region builder's memory behaviour (a few full-size masks at a time, sam_wrapper.UpscaledMasks) is kept.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
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


def mask_bounds(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(H, W) mask (nonzero = foreground) -> (y0, y1, x0, x1), its foreground's bounding box in image pixels
    (y1, x1 exclusive); None when it has no foreground. Two reductions over the image, the only full-image
    passes the clean-up and the region builder make per mask (about 0.05 ms at 1280x960)."""
    if mask.dtype.itemsize == 1 and mask.shape[1] % 8 == 0 and mask.flags.c_contiguous and mask.size:
        # Eight pixels a 64-bit word: numpy ORs a row of words at about the speed it reads them, 1.5x faster than
        # any() on the pixels, whose row reduction is the cost of this function. OR-ing the box's rows word-wise
        # leaves each column's byte nonzero where that column has foreground.
        words = mask.view(np.uint64)
        rows = np.flatnonzero(np.bitwise_or.reduce(words, axis=1))
        if not len(rows):
            return None
        cols = np.flatnonzero(np.bitwise_or.reduce(words[rows[0] : rows[-1] + 1], axis=0).view(np.uint8))
    else:
        rows = np.flatnonzero(mask.any(axis=1))
        if not len(rows):
            return None
        cols = np.flatnonzero(mask[rows[0] : rows[-1] + 1].any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def even_crop(bounds: tuple[int, int, int, int], margin: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The box (y0, y1, x0, x1) grown by `margin` pixels where the image (height, width) has room, its top-left
    corner moved to even coordinates: OpenCV labels 8-connected components in 2x2 blocks, so components found in
    such a crop come in the full image's order (a tie for the largest keeps the same one)."""
    y0, y1, x0, x1 = bounds
    return (max(y0 - margin, 0) // 2 * 2, min(y1 + margin, height), max(x0 - margin, 0) // 2 * 2,
            min(x1 + margin, width))


def _outside(box: tuple[int, int, int, int], height: int, width: int) -> list[tuple[tuple[int, ...], int]]:
    """The image (height, width) outside the box (y0, y1, x0, x1): its connected regions as (the box's sides each
    touches: 0 top, 1 bottom, 2 left, 3 right; its pixels). One region, or two when the box spans the image's
    height (left, right) or width (top, bottom), or none."""
    y0, y1, x0, x1 = box
    bands = ((0, y0 * width), (1, (height - y1) * width), (2, x0 * height), (3, (width - x1) * height))
    if y0 == 0 and y1 == height:
        return [((side,), area) for side, area in bands[2:] if area]
    if x0 == 0 and x1 == width:
        return [((side,), area) for side, area in bands[:2] if area]
    return [(tuple(side for side, area in bands if area), height * width - (y1 - y0) * (x1 - x0))]


def _outside_hole_sizes(labels: np.ndarray, sizes: np.ndarray, crop: tuple[int, int, int, int], height: int,
                        width: int) -> dict[int, int]:
    """The full-image sizes of the background components of a holes crop that reach its cut edges.

    labels: (h, w) int32 components of the crop's background (0: the mask); sizes: (count - 1,) their pixel
    counts in the crop; crop: (y0, y1, x0, x1) in image pixels, with a margin of background on every side the
    image continues past (its edge row or column is background, so one label each). Returns {label: pixels of
    its component in the whole image}."""
    edge = (int(labels[0, 0]), int(labels[-1, -1]), int(labels[0, 0]), int(labels[-1, -1]))  # top, bottom, ...
    # Regions outside joined by a crop label they both touch (left and right through the crop) are one component.
    groups: list[tuple[set[int], int]] = []
    for sides, area in _outside(crop, height, width):
        members = {edge[side] for side in sides}
        for other in [g for g in groups if g[0] & members]:
            groups.remove(other)
            members, area = members | other[0], area + other[1]
        groups.append((members, area))
    return {label: area + int(sizes[np.array(list(group)) - 1].sum()) for group, area in groups for label in group}


def _row_runs(crop: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(h, w) bool -> each row's foreground as one run, its first column (h,) and the column after its last (h,),
    int64 in the crop's columns; None when a row has no foreground or several runs. One pass over the crop: its
    rows laid one after the other, each followed by a background column, so a run ends inside its row."""
    h, w = crop.shape
    cols = w + 1
    laid = np.zeros(h * cols + 1, bool)
    laid[1:].reshape(h, cols)[:, :w] = crop
    change = np.flatnonzero(laid[1:] != laid[:-1])  # change p: laid[1:][p] differs from the value before it
    if len(change) != 2 * h:
        return None
    firsts = np.arange(0, h * cols, cols)
    starts, ends = change[0::2] - firsts, change[1::2] - firsts  # changes alternate: a run's start, its end
    if (starts < 0).any() or (starts >= w).any():  # a row without a run, another with several
        return None
    return starts, ends


def _reach_out(touching: np.ndarray, top_open: bool, bottom_open: bool) -> bool:
    """touching: (h,) bool, the box's rows whose background meets one side of it where that side is the image's
    border. Consecutive such rows are joined along that border; each group reaches the region around the box only
    through the box's top row (top_open: the image continues above it) or its bottom row (bottom_open)."""
    if not touching.any():
        return True
    if touching.all():
        return top_open or bottom_open
    top, bottom = int(np.argmin(touching)), int(np.argmin(touching[::-1]))  # rows of the groups at either end
    return (top_open or not top) and (bottom_open or not bottom) and not touching[top : len(touching) - bottom].any()


def _is_clean(mask: np.ndarray, bounds: tuple[int, int, int, int], min_area: int) -> bool:
    """True when the holes and islands steps leave `mask` ((H, W) bool, foreground in `bounds`) as it is, as most
    masks are: one island, and no background of the box cut off from what lies around the box, which is all
    background and in regions of at least min_area pixels. Read on the bounding box: a mask whose rows each hold
    one run of foreground (most smooth objects) from those runs (_row_runs); any other with OpenCV's contour
    tracing (Suzuki: 8-connected foreground, 4-connected background), both several times cheaper than labelling
    it. False also when it can't tell (background cut off along the image's border, in 4-connected terms)."""
    height, width = mask.shape
    y0, y1, x0, x1 = bounds
    outside = _outside(bounds, height, width)
    if any(area < min_area for _, area in outside):
        return False
    # A ragged mask (thousands of runs and contours) is not clean, and tracing it would cost more than labelling
    # it: a sample of its rows with more than a few changes each says so first. No more than 2 changes a row
    # (one run) make the row runs worth a try.
    sample = mask[y0:y1:max(1, (y1 - y0) // 32), x0:x1]
    changes = np.count_nonzero(sample[:, 1:] != sample[:, :-1])
    if changes > 8 * len(sample):
        return False
    runs = _row_runs(mask[y0:y1, x0:x1]) if changes <= 2 * len(sample) else None
    if runs is not None:
        starts, ends = runs
        if (starts[1:] > ends[:-1]).any() or (ends[1:] < starts[:-1]).any():  # rows' runs apart: several islands
            return False
        # The background of a row lies left and right of its run and reaches the box's side along the row: the
        # region around the box lies beyond it, unless that side is the image's border.
        return ((x0 > 0 or _reach_out(starts > 0, y0 > 0, y1 < height))
                and (x1 < width or _reach_out(ends < x1 - x0, y0 > 0, y1 < height)))
    # Two rings around the box: the inner one stands for the pixels around it (background; the image's border
    # where the box meets it, foreground there, so background reaching it counts as cut off), the outer one keeps
    # everything off the traced array's own edge.
    framed = np.zeros((y1 - y0 + 4, x1 - x0 + 4), np.uint8)
    framed[2:-2, 2:-2] = mask[y0:y1, x0:x1]
    _, hierarchy = cv2.findContours(framed, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    parents = hierarchy[0, :, 3]
    if np.count_nonzero(parents < 0) != 1 or (parents >= 0).any():  # several islands, or a hole
        return False
    border = (y0 == 0, y1 == height, x0 == 0, x1 == width)
    if not any(border):
        return True
    framed[1, 1:-1] |= border[0]
    framed[-2, 1:-1] |= border[1]
    framed[1:-1, 1] |= border[2]
    framed[1:-1, -2] |= border[3]
    _, hierarchy = cv2.findContours(framed, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return not (hierarchy[0, :, 3] >= 0).any()


def _remove_small(mask: np.ndarray, min_area: int, holes: bool, bounds: tuple[int, int, int, int] | None
                  ) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    """remove_small_regions(mask, min_area, "holes" if holes else "islands")[0], bit for bit, and its
    mask_bounds, computed on the mask's bounding box `bounds` (mask_bounds; for holes, with a margin of
    background), with a lookup table instead of np.isin (the same labels; a speckled 12-megapixel mask has
    thousands of them). mask: (H, W) bool; the input itself when nothing changes."""
    height, width = mask.shape
    if bounds is None:  # no island; the one "hole" is the whole image (filled if the image is that small)
        if holes and 0 < mask.size < min_area:
            return np.ones_like(mask), (0, height, 0, width)
        return mask, bounds
    # Islands all lie in the bounding box. A hole reaching the margin around it reaches the background outside
    # the crop too: counted with that (_outside_hole_sizes), it is seldom small; when it is, it must be filled
    # outside the crop as well, and the whole image is labelled instead.
    y0, y1, x0, x1 = crop = even_crop(bounds, 1 if holes else 0, height, width)
    count, labels, sizes = _components(~mask[y0:y1, x0:x1] if holes else mask[y0:y1, x0:x1])
    small = sizes < min_area
    if holes and crop != (0, height, 0, width):
        outside = _outside_hole_sizes(labels, sizes, crop, height, width)
        if min(outside.values()) < min_area:
            y0, y1, x0, x1 = 0, height, 0, width
            count, labels, sizes = _components(~mask)
            small = sizes < min_area
        else:
            small[np.array(list(outside)) - 1] = False
    if not small.any():
        return mask, bounds
    fill = np.zeros(count, bool)  # the labels that become foreground
    if holes:
        fill[0] = True  # the mask itself (background of the inverted mask)
        fill[1:] = small
    else:
        fill[1:] = ~small
        if not fill.any():  # every island is small: keep the largest
            fill[int(np.argmax(sizes)) + 1] = True
    out = mask.copy() if holes else np.zeros_like(mask)
    out[y0:y1, x0:x1] = part = fill[labels]
    # Holes filled in the crop lie in the bounding box (its margin belongs to the background outside); islands
    # dropped shrink it: found again in the crop.
    if holes and (y0, y1, x0, x1) != (0, height, 0, width):
        return out, bounds
    r0, r1, c0, c1 = mask_bounds(part)
    return out, (y0 + r0, y0 + r1, x0 + c0, x0 + c1)


def _components(mask: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(h, w) bool -> the count of labels (0: background), the (h, w) int32 labels of its 8-connected
    components and their sizes (count - 1,) in pixels."""
    if mask.size > 1 << 18:  # a large box (a ragged mask's): OpenCV's statistics cost less than counting its labels
        count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
        return count, labels, stats[1:, cv2.CC_STAT_AREA]
    # An object's box: np.bincount costs about half of OpenCV's statistics (the same labelling).
    count, labels = cv2.connectedComponents(mask.view(np.uint8), connectivity=8)
    return count, labels, np.bincount(labels.ravel(), minlength=count)[1:]


def _smooth(mask: np.ndarray, radius: int) -> np.ndarray:
    """An opening, then a closing, with an elliptical kernel of `radius` pixels: on the bounding box grown by
    2 * radius + 1, enough that OpenCV's border (neutral for each operation) meets only what the full image has
    there, background. mask: (H, W) bool."""
    bounds = mask_bounds(mask)
    if bounds is None:
        return mask
    y0, y1, x0, x1 = even_crop(bounds, 2 * radius + 1, *mask.shape)
    size = 2 * radius + 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    work = cv2.morphologyEx(mask[y0:y1, x0:x1].view(np.uint8), cv2.MORPH_OPEN, kernel)
    out = np.zeros_like(mask)
    out[y0:y1, x0:x1] = cv2.morphologyEx(work, cv2.MORPH_CLOSE, kernel).view(bool)
    return out


def clean_mask(mask: np.ndarray, params: CleanupParams) -> np.ndarray:
    """(H, W) bool -> (H, W) bool: smoothed (params.smooth), then holes and islands under params.min_area
    filled / dropped. Returns the input itself when nothing is to be done."""
    return clean_boxed(mask, params)[0]


def clean_boxed(mask: np.ndarray, params: CleanupParams, bounds: tuple[int, int, int, int] | None = ()
                ) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    """clean_mask's mask, with its mask_bounds (found on the way, so the region builder needn't again).
    bounds: the input's mask_bounds when the caller has them (the default, (), finds them)."""
    mask = np.asarray(mask, dtype=bool)
    if params.smooth > 0:
        mask, bounds = _smooth(mask, params.smooth), ()
    bounds = mask_bounds(mask) if bounds == () else bounds
    if params.min_area > 0 and not (bounds is not None and _is_clean(mask, bounds, params.min_area)):
        mask, bounds = _remove_small(mask, params.min_area, True, bounds)
        mask, bounds = _remove_small(mask, params.min_area, False, bounds)
    return mask, bounds


def mask_box(mask: np.ndarray) -> list[float]:
    """(H, W) bool -> [x0, y0, x1, y1] image pixels, x1 / y1 exclusive (the pixel edges); zeros when empty."""
    bounds = mask_bounds(mask)
    if bounds is None:
        return [0.0, 0.0, 0.0, 0.0]
    y0, y1, x0, x1 = bounds
    return [float(x0), float(y0), float(x1), float(y1)]


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

    def with_bounds(self):
        for mask, bounds in with_bounds(self.masks):  # the source's own bounds where it has them
            yield clean_boxed(mask, self.params, bounds)


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

    def with_bounds(self):
        for part in self.parts:
            yield from with_bounds(part)


def with_bounds(masks) -> Iterator[tuple[np.ndarray, tuple[int, int, int, int] | None]]:
    """Each of `masks` ((N, H, W) bool array or lazy sequence), read in order, with its mask_bounds: for
    CleanedMasks (and ConcatMasks of them) those its clean-up found, for sam_wrapper.UpscaledMasks those found on
    the model's device, with no further pass over the image."""
    own = getattr(masks, "with_bounds", None)
    if own is not None:
        yield from own()
        return
    for mask in masks:
        yield mask, mask_bounds(mask)


def cleaned(masks, params: CleanupParams):
    """`masks` ((N, H, W) bool array or lazy sequence) cleaned as read; the masks themselves when params are off."""
    return CleanedMasks(masks, params) if params.active and len(masks) else masks
