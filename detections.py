"""The one data type that flows detector → segmenter → region builder."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

# Lazy masks upscale about this many float32 mask pixels at once: a 4032x3024 image is ~49 MB per mask, so 50
# masks never materialise a 2.4 GB (N, H, W) float tensor, while a chunk of several keeps every CPU thread busy.
UPSCALE_CHUNK_PIXELS = 64 * 2**20


class LazyMasks:
    """N masks (H, W) bool in image pixels, computed a chunk at a time when read (from a model's low-resolution
    logits, or from packed bits). Subclasses give `_chunk(start, stop) -> (stop - start, H, W) bool`, or their
    own __getitem__ and __iter__ (masks.CleanedMasks, ConcatMasks: other sequences read through). Reading them in
    order (iteration, as the region builder does) holds one chunk of full-size masks at a time; np.asarray()
    gives (N, H, W)."""

    def __init__(self, count: int, size: tuple[int, int]):
        self.shape = (count, *size)
        self.ndim, self.dtype = 3, np.dtype(bool)

    def _chunk(self, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int) -> np.ndarray:
        return self._chunk(index, index + 1)[0]

    def _chunks(self) -> range:
        """The start of each chunk: about UPSCALE_CHUNK_PIXELS mask pixels each."""
        return range(0, len(self), max(1, UPSCALE_CHUNK_PIXELS // (self.shape[1] * self.shape[2])))

    def __iter__(self):
        for start in self._chunks():
            yield from self._chunk(start, min(start + self._chunks().step, len(self)))

    def __array__(self, dtype=None, copy=None):
        out = np.empty(self.shape, bool)
        for i, mask in enumerate(self):
            out[i] = mask
        return out if dtype is None else out.astype(dtype)


def profile_bounds(rows: np.ndarray, cols: np.ndarray) -> tuple[int, int, int, int] | None:
    """A mask's bounding box (y0, y1, x0, x1) in its pixels, y1 / x1 exclusive, from whether each of its rows
    (H,) bool and columns (W,) bool holds foreground; None when none does (masks.mask_bounds' frame)."""
    ys, xs = np.flatnonzero(rows), np.flatnonzero(cols)
    return (int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1) if len(ys) else None


@dataclass(frozen=True)
class Detections:
    """Objects found in one image, all in the image's displayed pixel frame.

    xyxy:   (N, 4) float32, x0, y0, x1, y1 in pixels of the displayed (EXIF-rotated) image.
    scores: (N,) float32 in [0, 1], the detector's confidence.
    labels: N config label names (the label each region will carry).
    masks:  (N, H, W) bool, or None when no segmenter ran. H, W = displayed image size. An array,
            or a lazy sequence with the same len/shape/dtype (sam_wrapper.UpscaledMasks,
            everything.EverythingMasks, masks.CleanedMasks / ConcatMasks): read them in order.
    box_from_mask: (N,) bool, or None for all False: the rows whose box is their mask's own bounding box
            (segment everything's), which the region builder takes again from the mask as it reads it, so the
            rectangle follows the mask clean-up.
    """

    xyxy: np.ndarray
    scores: np.ndarray
    labels: tuple[str, ...]
    masks: np.ndarray | None = None
    box_from_mask: np.ndarray | None = None

    def __post_init__(self):
        xyxy = np.asarray(self.xyxy, dtype=np.float32).reshape(-1, 4)
        scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        object.__setattr__(self, "xyxy", xyxy)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "labels", tuple(self.labels))
        n = len(xyxy)
        from_mask = np.zeros(n, bool) if self.box_from_mask is None else np.asarray(self.box_from_mask, bool)
        object.__setattr__(self, "box_from_mask", from_mask.reshape(-1))
        if len(scores) != n or len(self.labels) != n or len(self.box_from_mask) != n:
            raise ValueError(
                f"Detections: xyxy has {n} rows but scores has {len(scores)}, labels {len(self.labels)} and "
                f"box_from_mask {len(self.box_from_mask)}"
            )
        if self.masks is not None and (self.masks.ndim != 3 or len(self.masks) != n or self.masks.dtype != bool):
            raise ValueError(
                f"Detections: masks must be bool of shape ({n}, H, W), got {self.masks.dtype} {self.masks.shape}"
            )

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), ())

    def __len__(self) -> int:
        return len(self.xyxy)

    def with_masks(self, masks: np.ndarray) -> Detections:
        return replace(self, masks=masks)
