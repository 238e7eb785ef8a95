"""The mask clean-up's cost (masks.py), on CPU.

Part 1: one 4032x3024 mask, smooth (an ellipse) and speckled (the ellipse with 1 % of its pixels flipped):
segment_anything's remove_small_regions (holes, then islands) against masks.clean_mask at MASK_MIN_AREA=100, the
outputs compared; then clean_mask with MASK_SMOOTH=2 as well.

Part 2: a 50-mask answer on a 4032x3024 photo: random-weight MobileSAM masks of 50 seeded boxes (speckled) or the
smooth ellipses of bench_regions.py (--masks ellipses), read in order as the region builder reads them and
RLE-encoded, without and with the clean-up (masks.cleaned over sam_wrapper.UpscaledMasks): time, and the extra
peak RSS of each path over its RSS before (VmHWM reset through /proc/self/clear_refs, as bench_regions.py does).

Run: .venv/bin/python benchmarks/bench_cleanup.py [--masks ellipses] [--boxes 50]   (about 2 minutes)
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_regions import _status_kib, ellipse_logits, reset_peak_rss, spread_boxes  # noqa: E402
from segment_anything.utils.amg import remove_small_regions  # noqa: E402

from masks import CleanupParams, clean_mask, cleaned  # noqa: E402
from regions import mask_to_rle  # noqa: E402

WIDTH, HEIGHT = 4032, 3024


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def one_mask() -> None:
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    smooth = (xx - 2000) ** 2 / 1500**2 + (yy - 1500) ** 2 / 1000**2 < 1
    speckled = smooth ^ (np.random.default_rng(0).random((HEIGHT, WIDTH)) < 0.01)
    print(f"== one {WIDTH}x{HEIGHT} mask, MASK_MIN_AREA=100")
    print("| mask | remove_small_regions (holes, islands) | clean_mask | identical | clean_mask, MASK_SMOOTH=2 |")
    print("|---|---|---|---|---|")
    for name, mask in (("smooth", smooth), ("speckled", speckled)):
        expected, t_ref = timed(lambda m=mask: remove_small_regions(remove_small_regions(m, 100, "holes")[0], 100,
                                                                    "islands")[0])
        ours, t_ours = timed(lambda m=mask: clean_mask(m, CleanupParams(100, 0)))
        _, t_smooth = timed(lambda m=mask: clean_mask(m, CleanupParams(100, 2)))
        print(f"| {name} | {t_ref:.2f} s | {t_ours:.2f} s | {'yes' if np.array_equal(expected, ours) else 'NO'} | "
              f"{t_smooth:.2f} s |", flush=True)


def answer(masks_kind: str, boxes_n: int) -> None:
    from mobile_sam import sam_model_registry
    from model_factory import make_image

    from sam_wrapper import Segmenter

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        segmenter = Segmenter(sam_model_registry["vit_t"]().eval(), "cpu")
    image = make_image(WIDTH, HEIGHT, seed=0)
    embedding = segmenter.embed(image)
    boxes = spread_boxes(boxes_n, WIDTH, HEIGHT, 0)
    low_res, _ = segmenter.decode(embedding, boxes=boxes)
    if masks_kind == "ellipses":
        low_res = ellipse_logits(boxes, segmenter, embedding.original_size)
    del image
    print(f"\n== a {boxes_n}-mask answer at {WIDTH}x{HEIGHT} ({masks_kind} masks), read in order and RLE-encoded")
    print("| clean-up | time | extra peak RSS |")
    print("|---|---|---|")
    for label, params in (("off", CleanupParams(0, 0)), ("MASK_MIN_AREA=100", CleanupParams(100, 0)),
                          ("MASK_MIN_AREA=100, MASK_SMOOTH=2", CleanupParams(100, 2))):
        gc.collect()
        reset_peak_rss()
        before = _status_kib("VmRSS")
        masks = cleaned(segmenter.upscale(low_res[:, 0], embedding), params)
        _, seconds = timed(lambda m=masks: [mask_to_rle(mask) for mask in m])
        extra = (_status_kib("VmHWM") - before) / 1024
        print(f"| {label} | {seconds:.1f} s | {extra:.0f} MiB |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--masks", choices=("speckled", "ellipses"), default="speckled")
    parser.add_argument("--boxes", type=int, default=50)
    args = parser.parse_args()
    one_mask()
    answer(args.masks, args.boxes)


if __name__ == "__main__":
    main()
