"""Benchmark: detections -> Label Studio regions, and whole /predict time, on CPU with random-weight models.

Part 1 ("regions") takes one 4032x3024 photo, its MobileSAM embedding and the low-resolution mask logits of
--boxes seeded boxes, then turns those same logits into Label Studio brush RLEs two ways:

  straight  what SamPredictor.predict_torch does by default: Sam.postprocess_masks on the whole
            (N, 1, 256, 256) batch at once, > mask_threshold, then label_studio_sdk's brush.mask2rle per mask;
  ours      Segmenter.upscale (chunked, bit-identical interpolation) then regions.mask_to_rle per mask
            (the encoder build_regions uses; called directly so both paths encode every mask, empty ones too).

Each repeat of each path runs in a fresh subprocess of this script. "extra peak" is the process's peak RSS during
the path minus its RSS just before it (peak reset through /proc/self/clear_refs after the inputs and the model are
loaded), so torch's CPU allocator and numpy both count. "upscale" / "RLE" split a path's time between the mask
upscaling (+ threshold) and the RLE encoding. The targets: ours >= 3x faster and <= 25% of the straight path's
extra peak memory; both paths must give identical bool masks and identical RLE lists.

Part 2 ("predict") times POST /predict through the real app (_wsgi.create_backend_app) at 640x480 and 4032x3024:
real-size Grounding DINO (the packaged GroundingDINO_SwinT_OGC.py, a bert-base-size text encoder) and MobileSAM,
random weights (tests/model_factory.py; Grounding DINO's output heads rescaled so scores and boxes spread out), the
images served as JPEG from a loopback server, the README's labeling config and a TextArea prompt. Random weights
make Grounding DINO pass many boxes: MAX_DETECTIONS (--max-detections, 50) caps them, so the regions are up to 50
rectangles + 50 brushes. Each timed call gets a new image (the product caches per-image model state); "again"
is the last image asked once more. The per-stage split comes from wrapping the loaded models' methods.

Run: .venv/bin/python benchmarks/bench_regions.py [--boxes 50] [--repeats 3] [--skip-predict] [--quick]
(about 10 minutes on 2 CPU cores; --quick about 4). --masks ellipses reruns part 1 with smooth masks instead of
the random model's speckled ones, which inflate every RLE (and the SDK encoder's time) far beyond real masks.
Nothing is fetched from a model hub; generated models live in a temporary directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

# Set before transformers is imported (only inside functions below): nothing may try to reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

# The models' own deprecation chatter (torch.utils.checkpoint, timm, ...) is not a benchmark figure.
warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

SPEEDUP_TARGET = 3.0  # ours at least this many times faster than the straight path
MEMORY_TARGET = 0.25  # ours' extra peak at most this fraction of the straight path's

from test_labeling import GUIDE_CONFIG  # noqa: E402  (the README's labeling config)

PROMPT = "round thing_cats. box_house"
# Label Studio's context for an interactive TextArea prompt (the shape of tests/test_api.py TEXTAREA_CONTEXT).
CONTEXT = {"result": [{"value": {"text": [PROMPT]}, "id": "VliPI9QKLV", "from_name": "prompt", "to_name": "image",
                       "type": "textarea", "origin": "manual"}]}


# --------------------------------------------------------------------------- process memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mib(kib: float) -> float:
    return kib / 1024


# --------------------------------------------------------------------------- part 1: one path, in a subprocess


def run_path(kind: str, inputs: Path, result: Path) -> None:
    """Worker: load the inputs and the model, then time and measure one path; write the figures as JSON."""
    import numpy as np
    import torch
    from label_studio_sdk.converter import brush

    from regions import mask_to_rle
    from sam_decoder import DecoderInput
    from sam_wrapper import ImageEmbedding, Segmenter

    data = torch.load(inputs)
    segmenter = Segmenter.load("mobile_sam", data["checkpoint"], "cpu")
    model = segmenter.model
    low_res = data["low_res"]
    embedding = ImageEmbedding(DecoderInput(**data["decoder_input"]), tuple(data["input_size"]),
                               tuple(data["original_size"]))
    del data
    gc.collect()
    reset = reset_peak_rss()
    before = _status_kib("VmRSS")

    t0 = time.perf_counter()
    if kind == "straight":
        with torch.no_grad():  # SamPredictor.predict_torch, return_logits=False
            masks = model.postprocess_masks(low_res, embedding.input_size, embedding.original_size)
            masks = masks > model.mask_threshold
        t1 = time.perf_counter()
        rles = [brush.mask2rle(masks[i, 0].numpy().astype(np.uint8) * 255) for i in range(len(masks))]
        masks = masks[:, 0].numpy()
    elif kind == "ours":
        masks = segmenter.upscale(low_res[:, 0], embedding)  # lazy: upscaled a chunk at a time as read
        upscale_s, rles, reading = 0.0, [], iter(masks)
        for _ in range(len(masks)):
            started = time.perf_counter()
            mask = next(reading)
            upscale_s += time.perf_counter() - started
            rles.append(mask_to_rle(mask))
        t1 = t0 + upscale_s
    else:
        raise ValueError(kind)
    t2 = time.perf_counter()
    peak = _status_kib("VmHWM")

    figures = {
        "kind": kind,
        "upscale_s": t1 - t0,
        "rle_s": t2 - t1,
        "total_s": t2 - t0,
        "before_kib": before,
        "peak_kib": peak,
        "peak_reset": reset,
        "shape": list(masks.shape),
        "mask_sha": [hashlib.sha256(np.ascontiguousarray(m).view(np.uint8)).hexdigest() for m in masks],
        "foreground": [int(m.sum()) for m in masks],
        "rle_sha": [hashlib.sha256(bytes(rle)).hexdigest() for rle in rles],
        "rle_len": [len(rle) for rle in rles],
        "rle_list_bytes": sum(sys.getsizeof(rle) for rle in rles),  # values 0..255 are shared small ints
    }
    result.write_text(json.dumps(figures))


def spawn_path(kind: str, inputs: Path, workdir: Path, index: int) -> dict:
    result = workdir / f"{kind}-{index}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--inputs", str(inputs),
               "--result", str(result)]
    subprocess.run(command, check=True, cwd=ROOT)
    return json.loads(result.read_text())


def spread_boxes(n: int, width: int, height: int, seed: int):
    """n seeded xyxy boxes over the image, 5%..40% of its width and height each."""
    import numpy as np

    rng = np.random.default_rng(seed)
    w = rng.uniform(0.05, 0.4, n) * width
    h = rng.uniform(0.05, 0.4, n) * height
    x0 = rng.uniform(0, 1, n) * (width - w)
    y0 = rng.uniform(0, 1, n) * (height - h)
    return np.stack([x0, y0, x0 + w, y0 + h], axis=1).astype(np.float32)


def ellipse_logits(boxes, segmenter, original_size):
    """(N, 1, 256, 256) smooth low-res logits: positive inside the ellipse inscribed in each box.

    Stands in for a trained model's masks (few, long runs), where random weights give speckled ones.
    """
    import numpy as np
    import torch

    low = segmenter.transform.apply_boxes(boxes, original_size) / 4  # 1024-input frame -> 256 low-res frame
    yy, xx = np.mgrid[0:256, 0:256] + 0.5
    cx, cy = (low[:, 0] + low[:, 2]) / 2, (low[:, 1] + low[:, 3]) / 2
    rx, ry = (low[:, 2] - low[:, 0]) / 2, (low[:, 3] - low[:, 1]) / 2
    d = ((xx - cx[:, None, None]) / rx[:, None, None]) ** 2 + ((yy - cy[:, None, None]) / ry[:, None, None]) ** 2
    return torch.as_tensor(np.clip(8 * (1 - d), -20, 20), dtype=torch.float32)[:, None]


def bench_regions(args, workdir: Path) -> None:
    import torch
    from model_factory import make_image, make_mobile_sam

    from sam_wrapper import Segmenter

    width, height = args.size
    print(f"== Part 1: detections -> Label Studio brush regions, {width}x{height}, {args.boxes} boxes, MobileSAM "
          f"(random weights), {args.repeats} repeat(s) per path, each in a fresh process")
    checkpoint = make_mobile_sam(workdir / "mobile_sam.pt", seed=args.seed)
    segmenter = Segmenter.load("mobile_sam", str(checkpoint), "cpu")
    image = make_image(width, height, seed=args.seed)
    t0 = time.perf_counter()
    embedding = segmenter.embed(image)
    t1 = time.perf_counter()
    boxes = spread_boxes(args.boxes, width, height, args.seed)
    low_res, _ = segmenter.decode(embedding, boxes=boxes)
    t2 = time.perf_counter()
    print(f"(shared inputs: embed {t1 - t0:.2f} s, decode {args.boxes} boxes {t2 - t1:.2f} s -> low-res logits "
          f"{tuple(low_res.shape)})")
    if args.masks == "ellipses":
        low_res = ellipse_logits(boxes, segmenter, embedding.original_size)
        print("(--masks ellipses: the decoder's logits replaced by smooth ellipses inscribed in the boxes)")
    inputs = workdir / "inputs.pt"
    torch.save({"low_res": low_res.detach().contiguous(), "decoder_input": dataclasses.asdict(embedding.decoder_input),
                "input_size": list(embedding.input_size), "original_size": list(embedding.original_size),
                "checkpoint": str(checkpoint)}, inputs)
    del segmenter, image, embedding, low_res
    gc.collect()

    runs = {kind: [spawn_path(kind, inputs, workdir, i) for i in range(args.repeats)] for kind in ("straight", "ours")}

    def median(kind, key):
        return statistics.median(r[key] for r in runs[kind])

    def extra(kind):
        return statistics.median(r["peak_kib"] - r["before_kib"] for r in runs[kind])

    print()
    print(f"{'path':<10} {'median s':>9} {'best s':>8} {'upscale s':>10} {'RLE s':>8} {'RSS before MiB':>15} "
          f"{'extra peak MiB':>15}")
    for kind in ("straight", "ours"):
        print(f"{kind:<10} {median(kind, 'total_s'):>9.2f} {min(r['total_s'] for r in runs[kind]):>8.2f} "
              f"{median(kind, 'upscale_s'):>10.2f} {median(kind, 'rle_s'):>8.2f} "
              f"{mib(median(kind, 'before_kib')):>15.0f} {mib(extra(kind)):>15.0f}")
    print("straight = Sam.postprocess_masks on the whole batch, > mask_threshold, brush.mask2rle per mask; "
          "ours = Segmenter.upscale, regions.mask_to_rle per mask")
    if not all(r["peak_reset"] for rs in runs.values() for r in rs):
        print("note: /proc/self/clear_refs refused a peak reset: peaks include model loading")

    a, b = runs["straight"][0], runs["ours"][0]
    same_masks = a["shape"] == b["shape"] and a["mask_sha"] == b["mask_sha"]
    same_rles = a["rle_sha"] == b["rle_sha"] and a["rle_len"] == b["rle_len"]
    n_diff = sum(x != y for x, y in zip(a["mask_sha"], b["mask_sha"], strict=False))
    pixels = width * height
    fill = [f / pixels for f in b["foreground"]]
    print()
    print(f"masks {tuple(b['shape'])}: foreground {min(fill):.1%}..{max(fill):.1%} of the image "
          f"(mean {statistics.mean(fill):.1%}), {sum(1 for f in fill if f == 0)} empty; "
          f"RLE {sum(b['rle_len']) / 1024:.0f} KiB in all")
    print(f"what every path must hold: the RLE lists {b['rle_list_bytes'] / 2**20:.0f} MiB as Python lists; the "
          f"(N, H, W) bool masks would be {args.boxes * pixels / 2**20:.0f} MiB (ours holds one chunk at a time)")
    print(f"identical bool masks: {'yes' if same_masks else f'NO ({n_diff} differ)'}; "
          f"identical RLE lists: {'yes' if same_rles else 'NO'}")
    speedup = median("straight", "total_s") / median("ours", "total_s")
    ratio = extra("ours") / max(extra("straight"), 1)
    print(f"speedup (straight / ours, median time): {speedup:.1f}x   target >= {SPEEDUP_TARGET:.0f}x: "
          f"{'met' if speedup >= SPEEDUP_TARGET else 'MISSED'}")
    print(f"memory (ours / straight, extra peak):   {ratio:.0%}   target <= {MEMORY_TARGET:.0%}: "
          f"{'met' if ratio <= MEMORY_TARGET else 'MISSED'}")


# --------------------------------------------------------------------------- part 2: whole /predict


class StageTimer:
    """Times the product's stages by wrapping the loaded models' methods and model.build_regions.

    Wrapped by attribute name (GroundingDino.detect, Segmenter.segment_boxes, model.build_regions); a name the
    product no longer has is left out, and its column reads n/a.
    """

    STAGES = ("detect", "segment", "regions")

    def __init__(self, models, model_module):
        self.seconds = dict.fromkeys(self.STAGES, 0.0)
        self.found = set()
        for stage, owner, name in (("detect", models.detector, "detect"),
                                   ("segment", models.segmenter, "segment_boxes"),
                                   ("regions", model_module, "build_regions")):
            if owner is not None and callable(getattr(owner, name, None)):
                setattr(owner, name, self._timed(stage, getattr(owner, name)))
                self.found.add(stage)

    def _timed(self, stage, function):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - started

        return timed

    def take(self) -> dict:
        """The seconds per stage since the last take (None for a stage not wrapped)."""
        taken = {k: (v if k in self.found else None) for k, v in self.seconds.items()}
        self.seconds = dict.fromkeys(self.STAGES, 0.0)
        return taken


def jpeg(array) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(array).save(out, "JPEG", quality=90)
    return out.getvalue()


def bench_predict(args, workdir: Path) -> None:
    from model_factory import make_image, make_mobile_sam, make_real_size_groundingdino
    from servers import ImageServer

    sizes = [(640, 480)] if args.quick else [(640, 480), (4032, 3024)]
    print(f"== Part 2: POST /predict, real-size Grounding DINO (Swin-T OGC config, bert-base text encoder) + "
          f"MobileSAM, random weights, MAX_DETECTIONS={args.max_detections}, prompt {PROMPT!r}, "
          f"{args.predict_repeats} timed call(s) per size")
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # groundingdino prints its text encoder path
        gd_config, gd_checkpoint, bert_dir = make_real_size_groundingdino(workdir / "groundingdino", args.seed)
    sam_checkpoint = make_mobile_sam(workdir / "mobile_sam.pt", seed=args.seed)
    print(f"(random-weight models written in {time.perf_counter() - t0:.0f} s; Grounding DINO checkpoint "
          f"{gd_checkpoint.stat().st_size / 2**20:.0f} MiB)")

    env = {
        "GROUNDINGDINO_CONFIG": str(gd_config),
        "GROUNDINGDINO_CHECKPOINT": str(gd_checkpoint),
        "GROUNDINGDINO_TEXT_ENCODER": str(bert_dir),
        "USE_SAM": "false",
        "USE_MOBILE_SAM": "true",
        "MOBILESAM_CHECKPOINT": str(sam_checkpoint),
        "DATA_DIR": str(workdir / "data"),
        "DEVICE": "cpu",
        "MAX_DETECTIONS": str(args.max_detections),
        "MODEL_LOAD_WAIT": "900",
        "LOG_LEVEL": "warning",
    }
    # Importing _wsgi builds a module-level app from os.environ: keep it out of the repo and quiet.
    os.environ.setdefault("DATA_DIR", env["DATA_DIR"])
    os.environ.setdefault("LOG_LEVEL", "warning")
    import model as model_module
    from _wsgi import create_backend_app

    app = create_backend_app(env)
    client = app.test_client()
    # A new picture (seed) for every timed call: the embedding cache must not serve it. The last one is then
    # asked again, which the cache serves (Label Studio re-asking for one task, e.g. with another prompt).
    seeds = [args.seed + 1 + i for i in range(args.predict_repeats)]
    files = {"/warm-up.jpg": jpeg(make_image(*sizes[0], seed=args.seed))}
    files.update({f"/bench-{w}x{h}-{seed}.jpg": jpeg(make_image(w, h, seed=seed)) for w, h in sizes for seed in seeds})

    def payload(url):
        task = {"id": 1, "data": {"image": url}, "annotations": [], "predictions": [], "drafts": []}
        return {"tasks": [task], "project": "1.1700000000", "label_config": GUIDE_CONFIG,
                "params": {"login": None, "password": None, "context": CONTEXT}}

    def predict(url):
        started = time.perf_counter()
        response = client.post("/predict", json=payload(url))
        seconds = time.perf_counter() - started
        if response.status_code != 200:
            raise RuntimeError(f"/predict answered {response.status_code}: {response.get_data(as_text=True)[:500]}")
        return seconds, response.json["results"][0]["result"], len(response.get_data())

    rows = []
    with ImageServer(files) as server:
        with contextlib.redirect_stdout(io.StringIO()):  # the loader thread's build_model prints too
            seconds, _, _ = predict(f"{server.url}/warm-up.jpg")
        print(f"(warm-up /predict, including model loading: {seconds:.1f} s)")
        timer = StageTimer(app.extensions["model_loader"].get(), model_module)
        for w, h in sizes:
            calls = []
            for seed in [*seeds, seeds[-1]]:
                timer.take()
                seconds, regions, size = predict(f"{server.url}/bench-{w}x{h}-{seed}.jpg")
                calls.append((seconds, timer.take(), regions, size))
            rows.append(((w, h), calls[:-1], calls[-1], len(files[f"/bench-{w}x{h}-{seeds[0]}.jpg"])))

    def cell(value, width):
        return f"{value:>{width}.2f}" if value is not None else f"{'n/a':>{width}}"

    print()
    print(f"{'image':>10} {'JPEG KiB':>9} {'median s':>9} {'best s':>7} {'detect s':>9} {'segment s':>10} "
          f"{'regions s':>10} {'other s':>8} {'rects':>6} {'brushes':>8} {'reply MiB':>10} {'again s':>8}")
    for (w, h), calls, again, jpeg_size in rows:
        times = [c[0] for c in calls]
        stages = {k: (statistics.median(c[1][k] for c in calls) if calls[0][1][k] is not None else None)
                  for k in StageTimer.STAGES}
        other = statistics.median(times) - sum(v for v in stages.values() if v is not None)
        regions = calls[-1][2]
        rects = sum(r["type"] == "rectanglelabels" for r in regions)
        brushes = sum(r["type"] == "brushlabels" for r in regions)
        print(f"{f'{w}x{h}':>10} {jpeg_size / 1024:>9.0f} {statistics.median(times):>9.2f} {min(times):>7.2f} "
              f"{cell(stages['detect'], 9)} {cell(stages['segment'], 10)} {cell(stages['regions'], 10)} "
              f"{other:>8.2f} {rects:>6} {brushes:>8} {calls[-1][3] / 2**20:>10.1f} {again[0]:>8.2f}")
    print("(median/best: a new image per call; detect = Grounding DINO, segment = MobileSAM embed + decode + upscale, "
          "regions = rectangles + RLE; other = image fetch and decode, HTTP layer and JSON; again: the last image "
          "asked again, served by the embedding cache)")


# --------------------------------------------------------------------------- main


def machine() -> str:
    import torch

    return (f"machine: {platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__} with "
            f"{torch.get_num_threads()} thread(s), Python {platform.python_version()}; load average now "
            f"{os.getloadavg()[0]:.1f} (other processes on the machine slow every figure above)")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--boxes", type=int, default=50, help="boxes (masks) in part 1 (default 50)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path in part 1 (default 3)")
    parser.add_argument("--size", type=int, nargs=2, default=(4032, 3024), metavar=("W", "H"),
                        help="part 1 image size (default 4032 3024)")
    parser.add_argument("--masks", choices=("sam", "ellipses"), default="sam",
                        help="part 1 masks: the random MobileSAM decoder's (speckled, default) or smooth ellipses "
                             "in the boxes (a trained model's mask shapes)")
    parser.add_argument("--predict-repeats", type=int, default=2,
                        help="timed /predict calls per image size (default 2; ~35-60 s each on 2 cores)")
    parser.add_argument("--max-detections", type=int, default=50, help="MAX_DETECTIONS in part 2 (default 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-regions", action="store_true", help="skip part 1")
    parser.add_argument("--skip-predict", action="store_true", help="skip part 2 (/predict timing)")
    parser.add_argument("--quick", action="store_true",
                        help="a smaller run: 20 boxes, 1 repeat, /predict at 640x480 only")
    parser.add_argument("--worker", choices=("straight", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.boxes, args.repeats, args.predict_repeats = min(args.boxes, 20), 1, 1
    if min(args.boxes, args.repeats, args.predict_repeats) < 1:
        parser.error("--boxes, --repeats and --predict-repeats must be at least 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_path(args.worker, args.inputs, args.result)
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_regions_") as tmp:
        if not args.skip_regions:
            bench_regions(args, Path(tmp) / "regions")
            print()
        if not args.skip_predict:
            bench_predict(args, Path(tmp) / "predict")
            print()
    print(machine())
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
