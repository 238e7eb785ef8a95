"""Choosing a segmenter: SAM 2.1 Hiera-T/S/B+/L against SAM ViT-B/ViT-H and MobileSAM, on this machine's CPU.

Every model at its published size with random weights (nothing is downloaded), written as its authors' checkpoint
file and loaded by the service's own loading code (sam_wrapper.Segmenter.load, sam2_segmenter.Sam2Segmenter.load).
On --repeats fresh 1280x960 images each, the medians of:

  encoder   the image encoder pass (what a new image costs, once; the cache serves every later prompt on it)
  answer    a prompt-box answer's segmenter work on a new image: the encoder, then 20 boxes in one decoder call
            and their 20 full-size masks read out (as the region builder reads them)
  boxes     the same 20 boxes on the cached embedding (a second prompt on the image)
  click     one click on the cached embedding (three masks, the best one read: a smart-tool click)

and each model's parameter count and checkpoint size. Random weights make masks arbitrary but not their cost.
About 10 minutes on 2 cores (ViT-H is most of it); --quick: Hiera-T, ViT-B and MobileSAM, one image.

    .venv/bin/python benchmarks/bench_segmenters.py [--repeats 2] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from model_factory import make_image, make_mobile_sam, make_sam, make_sam2  # noqa: E402

from logs import silence_third_party_warnings  # noqa: E402
from sam2_segmenter import Sam2Segmenter  # noqa: E402
from sam_wrapper import Segmenter  # noqa: E402

SIZE = (1280, 960)
N_BOXES = 20
MODELS = {  # name -> (how the checkpoint is made, how the service loads it)
    "MobileSAM": (make_mobile_sam, lambda path: Segmenter.load("mobile_sam", path, "cpu")),
    "SAM ViT-B": (lambda path: make_sam(path, "vit_b"), lambda path: Segmenter.load("sam", path, "cpu", "vit_b")),
    "SAM ViT-H": (lambda path: make_sam(path, "vit_h"), lambda path: Segmenter.load("sam", path, "cpu", "vit_h")),
    **{f"SAM 2.1 Hiera-{label}": (lambda path, t=model_type: make_sam2(path, t),
                                  lambda path, t=model_type: Sam2Segmenter.load(path, "cpu", t))
       for label, model_type in [("T", "sam2.1_hiera_t"), ("S", "sam2.1_hiera_s"), ("B+", "sam2.1_hiera_b+"),
                                 ("L", "sam2.1_hiera_l")]},
}
QUICK = ("MobileSAM", "SAM ViT-B", "SAM 2.1 Hiera-T")


def boxes_for(seed: int) -> np.ndarray:
    """N_BOXES boxes (xyxy pixels) inside a SIZE image, 60 to 600 pixels a side."""
    rng = np.random.default_rng(seed)
    x0, y0 = rng.uniform(0, SIZE[0] - 600, N_BOXES), rng.uniform(0, SIZE[1] - 600, N_BOXES)
    w, h = rng.uniform(60, 600, N_BOXES), rng.uniform(60, 600, N_BOXES)
    return np.stack([x0, y0, x0 + w, y0 + h], axis=1).astype(np.float32)


def timed(fn, *args) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def segment_boxes(segmenter, embedding, boxes: np.ndarray) -> None:
    """The boxes in one decoder call, every full-size mask read out."""
    low_res, _ = segmenter.decode(embedding, boxes=boxes)
    np.asarray(segmenter.upscale(low_res[:, 0], embedding))


def answer(segmenter, image: np.ndarray, boxes: np.ndarray) -> None:
    segment_boxes(segmenter, segmenter.embed(image), boxes)


def click(segmenter, embedding) -> None:
    low_res, iou = segmenter.decode(embedding, points=np.array([[[400.0, 300.0]]]), point_labels=np.array([[1]]),
                                    multimask=True)
    best = int(iou[0].argmax())
    segmenter.upscale(low_res[0, best : best + 1], embedding)[0]


def measure(segmenter, repeats: int) -> dict[str, float]:
    rows: dict[str, list[float]] = {"encoder": [], "answer": [], "boxes": [], "click": []}
    boxes = boxes_for(0)
    for n in range(repeats):
        image = make_image(*SIZE, seed=100 + n)
        rows["encoder"].append(timed(segmenter.embed, image))
        rows["answer"].append(timed(answer, segmenter, image, boxes))
        embedding = segmenter.embed(image)
        rows["boxes"].append(timed(segment_boxes, segmenter, embedding, boxes))
        rows["click"].append(timed(click, segmenter, embedding))
    return {key: statistics.median(values) for key, values in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    silence_third_party_warnings()
    repeats = 1 if args.quick else args.repeats
    names = QUICK if args.quick else tuple(MODELS)
    print(f"# {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {SIZE[0]}x{SIZE[1]} images, {N_BOXES} boxes; median of {repeats}")
    print(f"{'segmenter':18} {'params':>7} {'file':>8} {'encoder':>8} {'answer':>8} {'boxes':>7} {'click':>7}")
    with tempfile.TemporaryDirectory() as directory:
        for name in names:
            make, load = MODELS[name]
            path = Path(directory) / "checkpoint.pt"
            make(path)
            segmenter = load(str(path))
            size = path.stat().st_size
            path.unlink()
            params = sum(p.numel() for p in segmenter.model.parameters())
            with torch.inference_mode():
                segmenter.embed(make_image(*SIZE, seed=1))  # warm-up: first-call allocations
                row = measure(segmenter, repeats)
            print(f"{name:18} {params / 1e6:6.0f}M {size / 2**20:6.0f}MiB {row['encoder']:7.2f}s "
                  f"{row['answer']:7.2f}s {row['boxes']:6.3f}s {row['click']:6.3f}s", flush=True)
            del segmenter
            gc.collect()


if __name__ == "__main__":
    main()
