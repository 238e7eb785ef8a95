"""Segment everything: ours (everything.py on sam_wrapper.Segmenter) against SamAutomaticMaskGenerator.generate.

Random-weight MobileSAM and SAM ViT-B at their published sizes (nothing is downloaded), one photo-sized image,
the same parameters for both. Random weights give low predicted IoUs and stability scores, so the thresholds are
set from this model's own scores on the image (--keep: the share of masks the IoU filter keeps, as SAM's 0.88 does
with real weights on a busy photo; the stability threshold keeps about half of those). Random weights also give
speckled masks that all span the image, so box NMS below 1.0 would keep one mask: --nms (box_nms_thresh) is 1.0
by default, so that "identical" compares many masks. Prints per model:

  reference      SamAutomaticMaskGenerator(model, **params).generate(image)
  ours, fresh    segment_everything on an image not seen before (the encoder runs), every mask read once
  ours, cached   the same image again (its embedding comes from the shared cache)
  identical      the same masks in the same order, and the count

Targets (issue #14): >= 2x faster than the reference fresh, >= 5x cached.

    .venv/bin/python benchmarks/bench_everything.py [--size 2048x1536] [--points 16] [--keep 0.3] [--nms 1.0]
        [--repeats 1] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from model_factory import make_image  # noqa: E402

from cache import EmbeddingCache, image_digest  # noqa: E402
from everything import EverythingParams, segment_everything  # noqa: E402
from sam_wrapper import Segmenter  # noqa: E402


def build(kind: str):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if kind == "mobile_sam":
            from mobile_sam import SamAutomaticMaskGenerator, sam_model_registry

            return sam_model_registry["vit_t"]().eval(), SamAutomaticMaskGenerator
        from segment_anything import SamAutomaticMaskGenerator, sam_model_registry

        return sam_model_registry["vit_b"]().eval(), SamAutomaticMaskGenerator


def thresholds(segmenter: Segmenter, image: np.ndarray, points: int, keep: float) -> dict:
    """pred_iou_thresh keeping `keep` of the masks, stability_score_thresh keeping about half of those: measured
    on this model and image with a coarse grid (not timed)."""
    probe = segment_everything(segmenter, image, EverythingParams(points_per_side=max(4, points // 4),
                                                                  pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                                                  box_nms_thresh=1.0))
    iou = float(np.quantile(probe.predicted_iou, 1 - keep)) if len(probe.predicted_iou) else 0.0
    passing = probe.stability_score[probe.predicted_iou > iou]
    stability = float(np.median(passing)) if len(passing) else 0.0
    return {"pred_iou_thresh": round(iou, 4), "stability_score_thresh": round(stability, 4)}


def timed(fn, *args):
    started = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - started


def run(kind: str, width: int, height: int, points: int, keep: float, nms: float, repeats: int) -> dict:
    """Rounds of (reference, ours fresh, ours cached), so each round's three share the machine's state; the
    medians of the rounds' times and of their ratios."""
    model, Generator = build(kind)
    image = make_image(width, height, seed=7)
    params = {"points_per_side": points, "box_nms_thresh": nms,
              **thresholds(Segmenter(model, "cpu"), image, points, keep)}
    image_id = image_digest(image)

    def ours(segmenter):
        found = segment_everything(segmenter, image, EverythingParams(**params), image_id)
        for _ in found.masks:  # every mask unpacked once, in order, as the region builder reads them
            pass
        return found

    rounds, same = [], True
    for _ in range(repeats):
        reference, t_reference = timed(Generator(model, **params).generate, image)
        segmenter = Segmenter(model, "cpu", EmbeddingCache(8, 2**32))  # an empty cache: a fresh image
        found, t_fresh = timed(ours, segmenter)
        cached, t_cached = timed(ours, segmenter)
        masks = np.asarray(found.masks)
        same = same and len(masks) == len(reference) and np.array_equal(np.asarray(cached.masks), masks) and all(
            np.array_equal(m, r["segmentation"]) for m, r in zip(masks, reference, strict=True))
        rounds.append((t_reference, t_fresh, t_cached))
        count = len(masks)
        del reference, found, cached, masks  # a reference answer holds every full-size mask
    t = np.array(rounds)
    return {"kind": kind, "params": params, "masks": count,
            "identical": same, "reference": float(np.median(t[:, 0])), "fresh": float(np.median(t[:, 1])),
            "cached": float(np.median(t[:, 2])), "fresh_x": float(np.median(t[:, 0] / t[:, 1])),
            "cached_x": float(np.median(t[:, 0] / t[:, 2]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="2048x1536")
    parser.add_argument("--points", type=int, default=16, help="points_per_side (SAM's default: 32)")
    parser.add_argument("--keep", type=float, default=0.3, help="share of masks the IoU threshold keeps")
    parser.add_argument("--nms", type=float, default=1.0, help="box_nms_thresh")
    parser.add_argument("--repeats", type=int, default=1, help="rounds; medians printed (times, and ratios)")
    parser.add_argument("--quick", action="store_true", help="MobileSAM only")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    print(f"segment everything, {width}x{height}, points_per_side {args.points}, medians of {args.repeats} round(s), "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")
    print("| model | reference | ours, fresh | ours, cached | masks identical |")
    print("|---|---|---|---|---|")
    for kind in ["mobile_sam"] if args.quick else ["mobile_sam", "sam_vit_b"]:
        r = run(kind, width, height, args.points, args.keep, args.nms, args.repeats)
        print(f"| {kind} ({r['params']}) | {r['reference']:.1f} s | {r['fresh']:.1f} s "
              f"({r['fresh_x']:.1f}x) | {r['cached']:.1f} s ({r['cached_x']:.1f}x) | "
              f"{'yes' if r['identical'] else 'NO'}, {r['masks']} masks |", flush=True)


if __name__ == "__main__":
    main()
