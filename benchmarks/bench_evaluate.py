"""`cli.py evaluate`'s threshold sweep against the straightforward way, in the same run, on CPU.

    ours             each task predicted once as the service predicts it (Grounding DINO, MobileSAM, the regions),
                     then every point of the 165-point grid re-filtered from the detector outputs that pass cached
                     (evaluate.predict_sample)
    straightforward  a detector pass per task and grid point (what running the prediction once per threshold pair
                     costs, counting the detector alone); timed on --points points of the grid, the whole grid
                     estimated from their mean

Random weights at the published size for Grounding DINO (tests/model_factory.make_real_size_groundingdino) and a
random MobileSAM, or the small test models with --quick; nothing is downloaded. Checks that both ways give the same
boxes at the timed points.

    .venv/bin/python benchmarks/bench_evaluate.py [--tasks 4] [--points 3] [--size 640x480] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

import numpy as np  # noqa: E402
from model_factory import (  # noqa: E402
    make_groundingdino,
    make_image,
    make_mobile_sam,
    make_real_size_groundingdino,
    make_text_encoder,
    service_env,
)
from servers import ImageServer  # noqa: E402
from test_e2e_gunicorn import encode  # noqa: E402
from test_labeling import GUIDE_CONFIG  # noqa: E402

import evaluate as ev  # noqa: E402
from config import Settings  # noqa: E402
from images import ImageLoader  # noqa: E402
from labeling import parse_label_config  # noqa: E402
from loader import build_models  # noqa: E402
from pipeline import DetectionParams, Pipeline, TextQuery  # noqa: E402
from prompts import parse_prompt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--points", type=int, default=3, help="grid points the straightforward way is timed on")
    parser.add_argument("--size", default="640x480")
    parser.add_argument("--quick", action="store_true", help="the small test models")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with contextlib.redirect_stdout(sys.stderr):
            dino = (make_groundingdino(tmp / "gd", text_encoder_dir=make_text_encoder(tmp / "bert")) if args.quick
                    else make_real_size_groundingdino(tmp / "gd"))
            env = service_env(dino, make_mobile_sam(tmp / "mobile_sam.pt"))
        files = {f"/data/upload/1/{i}.png": encode(make_image(width, height, seed=i), "PNG")
                 for i in range(args.tasks)}
        with ImageServer(files, token="bench") as server:
            settings = Settings.from_env({**env, "LABEL_STUDIO_URL": server.url, "LABEL_STUDIO_API_KEY": "bench"})
            with contextlib.redirect_stdout(sys.stderr):
                pipeline = Pipeline(build_models(settings), settings, ImageLoader(settings))
            run(pipeline, args)


def run(pipeline: Pipeline, args: argparse.Namespace) -> None:
    config = parse_label_config(GUIDE_CONFIG)
    query = TextQuery(parse_prompt("shape_cats. round thing_house", config.labels).phrases,
                      DetectionParams(0.3, 0.25, 50))
    grid = ev.sweep_grid(pipeline.models.engine)
    points = len(grid["box_threshold"]) * len(grid["text_threshold"])
    tasks = [{"id": i, "data": {"image": f"/data/upload/1/{i}.png"}} for i in range(args.tasks)]
    cache = pipeline.models.cache
    before = cache.computed.get("groundingdino-outputs", 0)
    started = time.perf_counter()
    samples = [ev.predict_sample(pipeline, task, [], config, query, grid) for task in tasks]
    ours = time.perf_counter() - started
    passes = cache.computed.get("groundingdino-outputs", 0) - before

    rng = np.random.default_rng(0)
    timed = [tuple(samples[0].sweep)[i] for i in rng.choice(points, args.points, replace=False)]
    images = [pipeline.load_image(t["data"]["image"]) for t in tasks]
    phrases = tuple(query.phrases)
    started, agree = time.perf_counter(), True
    for point in timed:
        params = DetectionParams(*point, query.params.max_detections)
        for sample, (image, _) in zip(samples, images, strict=True):
            found = pipeline.find(image, None, phrases, params)  # no image id: no cache, a pass each
            mine = sample.sweep[point]
            agree &= len(found) == len(mine) and all(
                r.label == label and np.allclose(r.box, (x0, y0, x1 - x0, y1 - y0), atol=1e-3)
                for r, (x0, y0, x1, y1), label in zip(mine, found.xyxy, found.labels, strict=True))
    per_point = (time.perf_counter() - started) / len(timed)
    print(f"{args.tasks} task(s) of {args.size}, {'small test models' if args.quick else 'real-size Grounding DINO'}"
          f" + MobileSAM, CPU; grid of {points} points")
    print(f"  ours             {ours:8.1f} s  {passes:5d} detector passes (predictions and regions included)")
    print(f"  straightforward  {per_point * points:8.1f} s  {args.tasks * points:5d} detector passes (estimated "
          f"from {len(timed)} points: {per_point:.2f} s per point)")
    print(f"  {per_point * points / ours:.1f}x; same boxes at the timed points: {'yes' if agree else 'NO'}")
    if not agree:
        sys.exit(1)


if __name__ == "__main__":
    main()
