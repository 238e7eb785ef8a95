"""Host work of an answer and of a bulk job, on CPU (issue #23).

Part 1 ("answer"): the time from model outputs to the prediction JSON for a 20-mask answer at 1280x960: the
masks (N, H, W) bool as the segmenter hands them over, cleaned (MASK_MIN_AREA=100) and turned into regions
(rectangles + brushes, the README's labeling config; then with polygons as well), the prediction dict that
Pipeline.predict_image returns. Serialising it (json.dumps, the same for both) is timed apart.
Today's code (benchmarks/host_reference.py, copied from 25a3cc2) against the product's in the same run, in
interleaved rounds (old, new, then new, old, ...), medians; each round checks that both give the same JSON (region
ids aside). Masks: smooth (seeded ellipses of 1-10 % of the image, some cut by its border), the same with a
small hole and a speck in every third (which the clean-up then removes), and ragged (random-weight MobileSAM
masks of 20 seeded boxes).

Part 2 ("bulk"): a bulk job's tasks through jobs.in_batches and Pipeline.predict_tasks with the small random-weight
test models (tests/model_factory.py: Grounding DINO, MobileSAM), images served as JPEG from a loopback server:
wall time of the job against the sum of its model passes (timed by wrapping the models' methods), host work done in
line (finish_threads=0) and overlapped with the next batch's passes (finish_threads=1), interleaved rounds.

Run: .venv/bin/python benchmarks/bench_host.py [--rounds 7] [--tasks 16] [--bulk-rounds 3] [--batch-size 4]
                                              [--skip-answer] [--skip-bulk]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]
warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

import host_reference as reference  # noqa: E402
import numpy as np  # noqa: E402
from test_labeling import GUIDE_CONFIG  # noqa: E402

from detections import Detections, LazyMasks  # noqa: E402
from labeling import parse_label_config  # noqa: E402
from masks import CleanupParams, cleaned  # noqa: E402
from pipeline import DetectionParams  # noqa: E402
from regions import build_regions, prediction  # noqa: E402

WIDTH, HEIGHT, MASKS = 1280, 960, 20
CLEANUP = CleanupParams(min_area=100, smooth=0)
POLYGON_CONFIG = GUIDE_CONFIG.replace("</View>\n</View>", "</View>").replace(
    "</BrushLabels>", "</BrushLabels>\n  <PolygonLabels name=\"label3\" toName=\"image\">\n"
    "    <Label value=\"cats\"/>\n    <Label value=\"house\"/>\n  </PolygonLabels>")


def smooth_masks(seed: int = 0, flawed: bool = False) -> np.ndarray:
    """(20, H, W) bool: ellipses of 1-10 % of the image, centres anywhere (some cut by the border); `flawed`:
    every third with a 5x5 hole and a 3x3 speck beside it (both under MASK_MIN_AREA=100, so the clean-up
    changes it)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    masks = np.zeros((MASKS, HEIGHT, WIDTH), bool)
    for i in range(MASKS):
        area = rng.uniform(0.01, 0.10) * WIDTH * HEIGHT
        aspect = rng.uniform(0.5, 2.0)
        ry = np.sqrt(area / np.pi / aspect)
        rx = ry * aspect
        cx, cy = rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT)
        masks[i] = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
        if flawed and i % 3 == 0:
            y, x = int(np.clip(cy, 10, HEIGHT - 10)), int(np.clip(cx, 10, WIDTH - 10))
            masks[i, y - 2 : y + 3, x - 2 : x + 3] = False
            sy, sx = int(np.clip(cy - ry - 6, 0, HEIGHT - 3)), int(np.clip(cx, 0, WIDTH - 3))
            masks[i, sy : sy + 3, sx : sx + 3] = True
    return masks


def ragged_masks(workdir: Path, seed: int = 0) -> np.ndarray:
    """(20, H, W) bool: random-weight MobileSAM's masks of 20 seeded boxes (speckled: many runs and islands)."""
    from bench_regions import spread_boxes
    from model_factory import make_image, make_mobile_sam

    from sam_wrapper import Segmenter

    segmenter = Segmenter.load("mobile_sam", str(make_mobile_sam(workdir / "mobile_sam.pt", seed=seed)), "cpu")
    masks, _ = segmenter.segment_boxes(make_image(WIDTH, HEIGHT, seed=seed), spread_boxes(MASKS, WIDTH, HEIGHT, seed))
    return np.asarray(masks)


class ReferenceCleaned(LazyMasks):
    """The masks cleaned by today's clean_mask as they are read (masks.CleanedMasks with the reference)."""

    def __init__(self, masks: np.ndarray, params: CleanupParams):
        super().__init__(len(masks), masks.shape[1:])
        self.masks, self.params = masks, params

    def __iter__(self):
        for mask in self.masks:
            yield reference.clean_mask(mask, self.params)


def answer(masks: np.ndarray, config, new: bool) -> dict:
    """Model outputs -> the prediction ({"result", "score", "model_version"}), with the product's host path (new)
    or today's (old)."""
    n = len(masks)
    labels = [("cats", "house")[i % 2] for i in range(n)]
    xyxy = np.tile(np.array([[0, 0, WIDTH, HEIGHT]], np.float32), (n, 1))
    scores = np.linspace(0.3, 0.9, n, dtype=np.float32)
    if new:
        detections = Detections(xyxy, scores, labels, cleaned(masks, CLEANUP))
        regions = build_regions(detections, config, WIDTH, HEIGHT)
    else:
        detections = Detections(xyxy, scores, labels, ReferenceCleaned(masks, CLEANUP))
        regions = reference.build_regions(detections, config, WIDTH, HEIGHT)
    return prediction(regions, "bench")


def without_ids(answer: dict) -> str:
    return json.dumps([{k: v for k, v in r.items() if k != "id"} for r in answer["result"]])


def bench_answer(args, workdir: Path) -> None:
    print(f"== Part 1: model outputs -> prediction JSON, {MASKS} masks at {WIDTH}x{HEIGHT}, MASK_MIN_AREA=100, "
          f"{args.rounds} interleaved rounds, median ms per answer")
    print("| masks | config | today (25a3cc2) | new | today / new | identical | json.dumps of the answer |")
    print("|---|---|---|---|---|---|---|")
    configs = (("rectangles + brushes", parse_label_config(GUIDE_CONFIG)),
               ("+ polygons", parse_label_config(POLYGON_CONFIG)))
    kinds = (("smooth", lambda: smooth_masks(args.seed)),
             ("smooth, a third with a hole and a speck", lambda: smooth_masks(args.seed, flawed=True)),
             ("ragged", lambda: ragged_masks(workdir, args.seed)))
    for kind, make in kinds:
        masks = make()
        for name, config in configs:
            times = {False: [], True: [], "json": []}
            identical = True
            for r in range(args.rounds):
                outputs = {}
                for new in ((False, True) if r % 2 == 0 else (True, False)):
                    started = time.perf_counter()
                    outputs[new] = answer(masks, config, new)
                    times[new].append(time.perf_counter() - started)
                identical &= without_ids(outputs[False]) == without_ids(outputs[True])
                started = time.perf_counter()
                json.dumps(outputs[True])
                times["json"].append(time.perf_counter() - started)
            old, new = statistics.median(times[False]) * 1e3, statistics.median(times[True]) * 1e3
            ratios = statistics.median(a / b for a, b in zip(times[False], times[True], strict=True))
            print(f"| {kind} | {name} | {old:.1f} ms | {new:.1f} ms | {old / new:.1f}x (rounds' median "
                  f"{ratios:.1f}x) | {'yes' if identical else 'NO'} | {statistics.median(times['json']) * 1e3:.1f} "
                  "ms |", flush=True)


class PassTimer:
    """Seconds spent in the models' passes, by wrapping the loaded models' methods (detector.encode_batch and
    detect, segmenter.embed_batch, embed and decode); the bulk job's passes all run on its own thread."""

    def __init__(self, models):
        self.seconds = 0.0
        for owner, names in ((models.detector, ("encode_batch", "detect")),
                             (models.segmenter, ("embed_batch", "embed", "decode"))):
            for name in names:
                setattr(owner, name, self._timed(getattr(owner, name)))

    def _timed(self, function):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        return timed


def bench_bulk(args, workdir: Path) -> None:
    from model_factory import make_groundingdino, make_image, make_mobile_sam, make_text_encoder, service_env
    from PIL import Image
    from servers import ImageServer

    from config import Settings
    from images import ImageLoader
    from jobs import in_batches
    from loader import build_models
    from pipeline import Pipeline, TextQuery
    from prompts import parse_prompt

    config = parse_label_config(GUIDE_CONFIG)
    files, base = {}, make_image(WIDTH, HEIGHT, seed=args.seed)

    def tasks_for(run: str) -> list[dict]:
        """args.tasks tasks of new pictures (one pixel block differs): no cache serves them."""
        tasks = []
        for i in range(args.tasks):
            picture = base.copy()
            picture[:8, :8] = (len(files) * 7) % 256, len(files) % 251, 17
            out = io.BytesIO()
            Image.fromarray(picture).save(out, "JPEG", quality=90)
            files[f"/data/upload/1/{run}-{i}.jpg"] = out.getvalue()
            tasks.append({"id": i, "data": {"image": f"/data/upload/1/{run}-{i}.jpg"}})
        return tasks

    with contextlib.redirect_stdout(io.StringIO()):  # groundingdino prints its text encoder path
        groundingdino = make_groundingdino(workdir / "groundingdino", seed=args.seed,
                                           text_encoder_dir=make_text_encoder(workdir / "bert", seed=args.seed))
        sam = make_mobile_sam(workdir / "mobile_sam.pt", seed=args.seed)
    with ImageServer(files) as server:  # Label Studio's uploads, with its key
        settings = Settings.from_env(service_env(groundingdino, sam, MAX_DETECTIONS=str(MASKS),
                                                 BATCH_SIZE=str(args.batch_size), LABEL_STUDIO_URL=server.url,
                                                 LABEL_STUDIO_API_KEY=server.token))
        with contextlib.redirect_stdout(io.StringIO()):
            models = build_models(settings)
        pipeline = Pipeline(models, settings, ImageLoader(settings))
        query = TextQuery(parse_prompt("shape_cats. round thing_house", config.labels).phrases,
                          DetectionParams(0.05, 0.05, MASKS))
        timer = PassTimer(models)
        modes = {"in line": lambda: in_batches(lambda batch: pipeline.predict_tasks(batch, config, query),
                                               args.batch_size),
                 "overlapped": lambda: in_batches(lambda batch: pipeline.start_tasks(batch, config, query),
                                                  args.batch_size, overlap=1)}
        list(modes["in line"]()(iter(tasks_for("warm-up")[: args.batch_size])))
        print(f"\n== Part 2: a bulk job of {args.tasks} tasks ({WIDTH}x{HEIGHT} JPEG, loopback), BATCH_SIZE="
              f"{args.batch_size}, small random-weight Grounding DINO + MobileSAM (tests/model_factory.py), "
              f"MAX_DETECTIONS={MASKS}, MASK_MIN_AREA=100, {args.bulk_rounds} interleaved rounds, medians")
        figures = {mode: {"wall": [], "passes": [], "regions": []} for mode in modes}
        for r in range(args.bulk_rounds):
            for mode in (list(modes) if r % 2 == 0 else list(modes)[::-1]):
                tasks = tasks_for(f"{mode.replace(' ', '-')}-{r}")
                timer.seconds = 0.0
                started = time.perf_counter()
                pairs = list(modes[mode]()(iter(tasks)))
                figures[mode]["wall"].append(time.perf_counter() - started)
                figures[mode]["passes"].append(timer.seconds)
                failed = [o.failure for _, o in pairs if o.failure]
                if failed:
                    raise RuntimeError(f"{len(failed)} task(s) failed: {failed[0]}")
                figures[mode]["regions"].append(sum(len(o.prediction["result"]) for _, o in pairs))
    print("| host work | job wall time | model passes | wall - passes | wall / passes | regions |")
    print("|---|---|---|---|---|---|")
    for mode, f in figures.items():
        wall, passes = statistics.median(f["wall"]), statistics.median(f["passes"])
        ratio = statistics.median(w / p for w, p in zip(f["wall"], f["passes"], strict=True))
        print(f"| {mode} | {wall:.2f} s | {passes:.2f} s | {wall - passes:.2f} s | {ratio:.2f} | "
              f"{statistics.median(f['regions']):.0f} |", flush=True)


def machine() -> str:
    import torch

    return (f"machine: {platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__} with "
            f"{torch.get_num_threads()} thread(s), Python {platform.python_version()}; load average now "
            f"{os.getloadavg()[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tasks", type=int, default=16, help="tasks of the bulk job (part 2)")
    parser.add_argument("--bulk-rounds", type=int, default=3, help="rounds of part 2")
    parser.add_argument("--batch-size", type=int, default=4, help="BATCH_SIZE of the bulk job (part 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-answer", action="store_true")
    parser.add_argument("--skip-bulk", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_host_") as tmp:
        if not args.skip_answer:
            bench_answer(args, Path(tmp))
        if not args.skip_bulk:
            bench_bulk(args, Path(tmp))
    print(machine())


if __name__ == "__main__":
    main()
