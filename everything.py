"""Segment everything: SAM's automatic mask generation on our Segmenter.

The steps and their order are segment_anything's `SamAutomaticMaskGenerator.generate` (MobileSAM's is the same
code, and sam2's SAM2AutomaticMaskGenerator the same steps for SAM 2.1), so on the same model, image and parameters
the masks are the same, in the same order (tests/test_everything.py, tests/test_sam2_segmenter.py): a grid of
`points_per_side`**2 single-point prompts per crop (crop layer 0 is the whole image; `crop_n_layers` adds 4, 16, ...
overlapping crops), three masks per point, the predicted-IoU filter, the stability-score filter, masks touching a
crop's inner edge dropped, box NMS within a crop, then between crops.

What differs is where the work goes:
- the image embedding comes from the segmenter's shared cache (a click or a text prompt on the image encoded it
  already, or a later one reuses it), and the points go through the segmenter's prepared mask decoder
  (sam_decoder.PromptDecoder: the image-only part of the first layer is done once per image, not per point; on
  CPU a few points a pass), in batches of `points_per_batch`, under the segmenter's lock; no second copy of the
  model exists;
- the predicted IoUs need only the decoder's transformer: the points none of whose three masks passes the IoU
  filter skip the decoder's upscaling convolutions and mask products, and only masks that pass it are upscaled
  to the image, two or so at a time, for the stability score, and the stable ones for the box (`mask_boxes`:
  batched_mask_to_box's boxes from two row / column reductions);
- no RLE round trip: a kept mask is held as the packed bits (1 bit a pixel) of its bounding box, taken from that
  one upscaling, and unpacked when the region builder reads it (`EverythingMasks`).

`min_mask_region_area` is not a parameter here: masks.clean_mask (MASK_MIN_AREA) does the same clean-up to every
mask of every mode.

Frames: points and boxes are in pixels of the image ((H, W), displayed orientation); a crop's own masks are in its
pixels and are padded into the image's frame when read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, fields

import numpy as np
import torch
from segment_anything.utils.amg import (
    build_all_layer_point_grids,
    calculate_stability_score,
    generate_crop_boxes,
    is_box_near_crop_edge,
)
from torchvision.ops.boxes import batched_nms, box_area

from detections import LazyMasks
from errors import ParamsError

logger = logging.getLogger(__name__)

# Full-size logits upscaled at a time: 2 masks of a 2048x1536 image (24 MiB fp32), which the stability score's
# passes then read from cache: 21 at a time (detections.UPSCALE_CHUNK_PIXELS) took 1.8x as long per mask.
_UPSCALE_PIXELS = 8 * 2**20


@dataclass(frozen=True)
class EverythingParams:
    """SamAutomaticMaskGenerator's arguments, with its names and its defaults (but min_mask_region_area, which is
    masks.py's MASK_MIN_AREA here, and point_grids / output_mode)."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1


# key -> (kind, lowest, highest)
_RANGES = {
    "points_per_side": (int, 1, 256),
    "points_per_batch": (int, 1, 4096),
    "pred_iou_thresh": (float, 0.0, 1.0),
    "stability_score_thresh": (float, 0.0, 1.0),
    "stability_score_offset": (float, 0.0, 100.0),
    "box_nms_thresh": (float, 0.0, 1.0),
    "crop_n_layers": (int, 0, 4),
    "crop_nms_thresh": (float, 0.0, 1.0),
    "crop_overlap_ratio": (float, 0.0, 0.99),
    "crop_n_points_downscale_factor": (int, 1, 16),
}


def everything_params(values, defaults: EverythingParams, prefix: str = "extra_params.everything.") -> EverythingParams:
    """EverythingParams from `values` (a mapping of SamAutomaticMaskGenerator argument names, each optional) over
    `defaults`. ParamsError names the key (after `prefix`) and what it must be."""
    if values is None:
        return defaults
    if not isinstance(values, Mapping):
        raise ParamsError(f"{prefix.rstrip('.')} must be an object of SamAutomaticMaskGenerator arguments, got "
                          f"{type(values).__name__}")
    if "min_mask_region_area" in values:
        raise ParamsError(f"{prefix}min_mask_region_area is not used here: set extra_params.mask_min_area (the "
                          "clean-up every mask gets, the same holes-and-islands step)")
    unknown = sorted(set(values) - set(_RANGES))
    if unknown:
        raise ParamsError(f"{prefix.rstrip('.')}: unknown key(s) {unknown}; allowed: {sorted(_RANGES)}")
    out = {}
    for field in fields(EverythingParams):
        value = values.get(field.name, getattr(defaults, field.name))
        kind, lo, hi = _RANGES[field.name]
        if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
            raise ParamsError(f"{prefix}{field.name} must be a number between {lo:g} and {hi:g}, got {value!r}")
        if kind is int and value != int(value):
            raise ParamsError(f"{prefix}{field.name} must be a whole number, got {value!r}")
        out[field.name] = kind(value)
    return EverythingParams(**out)


class EverythingMasks(LazyMasks):
    """N masks (H, W) bool in image pixels, each held as the packed bits of its bounding box and unpacked when
    read (a crop's masks placed into the image's frame). np.asarray() gives the whole (N, H, W) array.

    bits: N uint8 arrays, np.packbits of the mask within its box; boxes: (N, 4) int x0, y0, x1, y1 image pixels,
    x1 / y1 exclusive (an empty mask: the one pixel at 0, 0, unset)."""

    def __init__(self, bits: list[np.ndarray], boxes: np.ndarray, size: tuple[int, int]):
        super().__init__(len(bits), size)
        self.bits, self.boxes = bits, np.asarray(boxes, np.int64).reshape(-1, 4)

    def select(self, indices) -> EverythingMasks:
        """The masks at `indices` (K,), in that order, still packed."""
        indices = [int(i) for i in indices]
        return EverythingMasks([self.bits[i] for i in indices], self.boxes[indices], self.shape[1:])

    def _chunk(self, start: int, stop: int) -> np.ndarray:
        out = np.zeros((stop - start, *self.shape[1:]), bool)
        for mask, bits, (x0, y0, x1, y1) in zip(out, self.bits[start:stop], self.boxes[start:stop], strict=True):
            area = (x1 - x0) * (y1 - y0)
            mask[y0:y1, x0:x1] = np.unpackbits(bits, count=area).reshape(y1 - y0, x1 - x0).view(bool)
        return out


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(K, H, W) bool -> (K, 4) int64 x0, y0, x1, y1 with x1 / y1 inclusive, zeros for an empty mask: exactly
    segment_anything's batched_mask_to_box (tests/test_everything.py), from the rows and columns that hold any
    pixel rather than from coordinate-weighted maxima over every pixel."""
    pixels = masks.view(torch.uint8)  # on CPU a uint8 maximum is 10-40x faster than a bool any()
    rows, cols = pixels.amax(dim=2), pixels.amax(dim=1)

    def first_last(hits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = hits.shape[1]  # argmax gives the first maximum
        return hits.argmax(dim=1), n - 1 - hits.flip(1).argmax(dim=1)

    (top, bottom), (left, right) = first_last(rows), first_last(cols)
    boxes = torch.stack([left, top, right, bottom], dim=1)
    return boxes * (rows.amax(dim=1, keepdim=True) > 0)


@dataclass(frozen=True)
class Everything:
    """What segment everything found, best first (SamAutomaticMaskGenerator.generate's order).

    masks: (N, H, W) bool, lazy (EverythingMasks). boxes: (N, 4) float32 x0, y0, x1, y1 image pixels, the
    mask's bounding box with x1 / y1 exclusive (SamAutomaticMaskGenerator's "bbox" has them inclusive).
    predicted_iou, stability_score: (N,) float32. points: (N, 2) float64 x, y image pixels of each mask's point.
    crop_boxes: (N, 4) int x0, y0, x1, y1 of the crop each mask came from. complete: False when a deadline cut
    the point grid short (the masks are those of the points done).
    """

    masks: EverythingMasks
    boxes: np.ndarray
    predicted_iou: np.ndarray
    stability_score: np.ndarray
    points: np.ndarray
    crop_boxes: np.ndarray
    complete: bool = True


def segment_everything(segmenter, image: np.ndarray, params: EverythingParams, image_id: str | None = None,
                       model_pass: Callable[[], AbstractContextManager] = nullcontext,
                       deadline: float | None = None) -> Everything:
    """Every mask SAM finds in `image` ((H, W, 3) uint8 RGB) with SamAutomaticMaskGenerator's algorithm.

    segmenter: a sam_wrapper.Segmenter or sam2_segmenter.Sam2Segmenter (its cache serves the embedding when
    `image_id` is given).
    model_pass: wraps each model pass (the request's scheduler.Ticket.model_pass). deadline: a
    time.monotonic() after which no further batch starts (the answer then holds the masks found so far).
    """
    height, width = image.shape[:2]
    crop_boxes, layer_idxs = generate_crop_boxes((height, width), params.crop_n_layers, params.crop_overlap_ratio)
    grids = build_all_layer_point_grids(params.points_per_side, params.crop_n_layers,
                                        params.crop_n_points_downscale_factor)
    bits, per_crop_boxes, ious, stabilities, points_out, crop_of = [], [], [], [], [], []
    complete = True
    for crop_box, layer in zip(crop_boxes, layer_idxs, strict=True):
        x0, y0, x1, y1 = crop_box
        whole = crop_box == [0, 0, width, height]
        crop_image = image if whole else image[y0:y1, x0:x1, :]
        crop_id = image_id if whole or image_id is None else f"{image_id}:crop{x0},{y0},{x1},{y1}"
        if deadline is not None and time.monotonic() > deadline:
            complete = False
            break
        with model_pass():
            embedding = segmenter.embedding_for(crop_image, crop_id)
        crop_size = crop_image.shape[:2]
        grid = grids[layer] * np.array(crop_size)[None, ::-1]
        found = []  # per batch: (bits (K,), iou (K,), stability (K,), boxes (K, 4), points (K, 2))
        for start in range(0, len(grid), params.points_per_batch):
            if deadline is not None and time.monotonic() > deadline:
                complete = False
                break
            with model_pass():
                found.append(_batch(segmenter, embedding, grid[start:start + params.points_per_batch], params,
                                    crop_box, (height, width)))
        if not found:
            continue
        crop_bits = [b for f in found for b in f[0]]
        boxes = torch.cat([f[3] for f in found])
        iou = torch.cat([f[1] for f in found])
        keep = batched_nms(boxes.float(), iou, torch.zeros(len(boxes)), iou_threshold=params.box_nms_thresh)
        offset = torch.tensor([[x0, y0, x0, y0]])
        bits += [crop_bits[k] for k in keep.tolist()]
        crop_of += [crop_box] * len(keep)
        per_crop_boxes.append(boxes[keep] + offset)
        ious.append(iou[keep])
        stabilities.append(torch.cat([f[2] for f in found])[keep])
        points_out.append(np.concatenate([f[4] for f in found])[keep.numpy()] + [x0, y0])
        if not complete:
            break
    if not complete:
        logger.warning("segment everything: the deadline (PREDICT_TIME_BUDGET) cut the point grid short; the "
                       "answer holds the masks found so far")
    boxes = torch.cat(per_crop_boxes) if per_crop_boxes else torch.zeros((0, 4))
    iou = torch.cat(ious) if ious else torch.zeros(0)
    stability = torch.cat(stabilities) if stabilities else torch.zeros(0)
    points = np.concatenate(points_out) if points_out else np.zeros((0, 2))
    crop_array = torch.tensor(crop_of, dtype=torch.int64).reshape(-1, 4)
    if len(crop_boxes) > 1 and len(boxes):
        # Between crops, prefer the masks of smaller crops (SamAutomaticMaskGenerator._generate_masks).
        keep = batched_nms(boxes.float(), 1 / box_area(crop_array), torch.zeros(len(boxes)),
                           iou_threshold=params.crop_nms_thresh)
        bits = [bits[k] for k in keep.tolist()]
        boxes, iou, stability = boxes[keep], iou[keep], stability[keep]
        points, crop_array = points[keep.numpy()], crop_array[keep]
    exclusive = boxes.numpy().reshape(-1, 4) + np.array([0, 0, 1, 1])
    masks = EverythingMasks(bits, exclusive, (height, width))
    return Everything(masks, exclusive.astype(np.float32), iou.numpy().astype(np.float32),
                      stability.numpy().astype(np.float32), points.reshape(-1, 2), crop_array.numpy(), complete)


def _batch(segmenter, embedding, points: np.ndarray, params: EverythingParams, crop_box: list[int],
           size: tuple[int, int]):
    """One batch of grid points (K, 2) in crop pixels -> what passes the IoU, stability and crop-edge filters:
    (bits: list of np.packbits of each mask within its box, iou (M,), stability (M,), boxes (M, 4) crop pixels
    inclusive, points (M, 2)), in SamAutomaticMaskGenerator._process_batch's order (point by point, its three
    masks in turn)."""
    height, width = size
    coords = segmenter.input_points(points, embedding.original_size)  # as the package's own generator maps them
    labels = torch.ones(coords.shape[0], dtype=torch.int, device=coords.device)
    # Only the points with a mask above the IoU threshold get their masks computed (the IoUs need no upscaling).
    iou_thresh = params.pred_iou_thresh if params.pred_iou_thresh > 0.0 else float("-inf")
    iou, selected, logits = segmenter.decode_input_points(embedding, coords[:, None, :], labels[:, None],
                                                          multimask=True, iou_thresh=iou_thresh)
    iou, logits = iou[selected].flatten(0, 1), logits.flatten(0, 1)
    point_of = points[selected.cpu().numpy()].repeat(3, axis=0)
    keep = iou > iou_thresh
    logits, iou, point_of = logits[keep], iou[keep], point_of[keep.cpu().numpy()]
    crop_h, crop_w = embedding.original_size
    step = max(1, _UPSCALE_PIXELS // (crop_h * crop_w))
    threshold = segmenter.mask_threshold
    bits, stability, boxes, kept = [], [], [], []
    for start in range(0, len(logits), step):
        full = segmenter.upscale_logits(logits[start:start + step], embedding)
        chunk_stability = calculate_stability_score(full, threshold, params.stability_score_offset)
        # The filters only remove masks, so the boxes are needed only for the stable ones.
        rows = torch.arange(start, start + len(full), device=full.device)
        if params.stability_score_thresh > 0.0:
            stable = chunk_stability >= params.stability_score_thresh
            full, chunk_stability, rows = full[stable], chunk_stability[stable], rows[stable]
        masks = full > threshold
        del full
        chunk_boxes = mask_boxes(masks)
        inside = ~is_box_near_crop_edge(chunk_boxes, crop_box, [0, 0, width, height])
        for i in torch.nonzero(inside).flatten().tolist():
            x0, y0, x1, y1 = chunk_boxes[i].tolist()
            bits.append(np.packbits(masks[i, y0:y1 + 1, x0:x1 + 1].cpu().numpy()))
        stability.append(chunk_stability[inside].cpu())
        boxes.append(chunk_boxes[inside].cpu())
        kept.append(rows[inside].cpu())
    kept = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.int64)
    return (bits, iou[kept.to(iou.device)].cpu(), torch.cat(stability) if stability else torch.zeros(0),
            torch.cat(boxes) if boxes else torch.zeros((0, 4), dtype=torch.int64), point_of[kept.numpy()])
