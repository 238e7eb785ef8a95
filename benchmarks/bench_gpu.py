"""The GPU path, measured: the service's own model code (build_models, Pipeline) on random-weight checkpoints of the
published sizes, generated here (nothing is downloaded). Built to run on one lent GPU in one command of about
8 minutes; `--device cpu --quick` runs the same code on CPU with the small test models, a wide picture and the
fp32 rows only (tests/test_gpu_path.py's smoke test: bf16 on a CPU without bf16 units takes minutes).

For each precision and compile setting (PRECISION=fp32, bf16; COMPILE=false, true) it prints the median over
--iterations, after warm-up, of:

  dino          one Grounding DINO Swin-T forward pass (backbone, BERT, transformer) on a fresh image
  vit_h, vit_b, mobile_sam    one image encoder pass
  answer        the whole text -> regions answer for one fresh image (Pipeline.predict_image: boxes, masks, RLE)
                with Grounding DINO + SAM ViT-H, and + MobileSAM
  peak GB       torch.cuda.max_memory_allocated of each model set while it answered

then bulk pre-annotation with MobileSAM (Pipeline.encode + predict_image, what the bulk job runs per batch) in
images per second at BATCH_SIZE 1, 4 and 8, ENGINE=sam3's whole answer and peak memory (PRECISION=fp32; not
with --quick: its random-weight checkpoint is 3.4 GB), and Grounding DINO's parts that issue #23 changed, before
and now (PRECISION=fp32): its input tensor (PIL on the host, now torch on the device), its deformable attention
over one pass's inputs (a grid_sample per level, now levels batched) and a whole pass both ways.
The straightforward way (fp32, eager, one image at a time) is the first row and batch 1. The compiled row (bf16,
COMPILE=true) runs last: its segmenter is compiled and warmed up at load (build_models: batch sizes 1 and BATCH_SIZE,
smaller batches padded) and Grounding DINO's backbone for the image's input size before timing (it compiles in the
background after a first image of that size), so it times no compilation. Each section starts only while the run
is inside --budget-s (default 450 s: an 8-minute command with room to set up); one that would start later is
skipped with a line saying so, and --json is rewritten after each section, so a cut run still leaves what it
measured.

    .venv/bin/python benchmarks/bench_gpu.py [--device cuda] [--iterations 20] [--models DIR] [--json FILE]
                                             [--budget-s 450] [--no-compile]
    .venv/bin/python benchmarks/bench_gpu.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from model_factory import (  # noqa: E402
    groundingdino_image_tensor,
    library_deformable_attention,
    make_groundingdino,
    make_image,
    make_mobile_sam,
    make_real_size_groundingdino,
    make_real_size_sam3,
    make_sam,
    make_sam2,
)

from config import SAM3_CHECKPOINT_NAME, SEGMENTERS, Settings  # noqa: E402
from dino import levels_batched_deformable_attention  # noqa: E402
from labeling import parse_label_config  # noqa: E402
from loader import build_models  # noqa: E402
from logs import silence_third_party_warnings  # noqa: E402
from pipeline import DetectionParams, Pipeline, TextQuery  # noqa: E402
from prompts import Phrase  # noqa: E402

CONFIG = parse_label_config("""<View><Image name="image" value="$image"/>
<RectangleLabels name="box" toName="image"><Label value="cats"/><Label value="house"/></RectangleLabels>
<BrushLabels name="mask" toName="image"><Label value="cats"/><Label value="house"/></BrushLabels></View>""")
QUERY = TextQuery((Phrase("shape", "cats"), Phrase("round thing", "house")), DetectionParams(0.3, 0.25, 20))
CAPTION = "shape . round thing ."
SAM2_KINDS = ("sam2.1_hiera_t", "sam2.1_hiera_l")  # the smallest and the largest SAM 2.1


def generate(directory: Path, quick: bool) -> dict[str, str]:
    """Random-weight checkpoints in `directory` (real sizes; --quick: the test suite's small Grounding DINO, MobileSAM
    only) -> the service's environment variables for Grounding DINO and MobileSAM (segmenter_env: for SAM)."""
    directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    make = make_groundingdino if quick else make_real_size_groundingdino
    marker = directory / ("quick" if quick else "full")
    if not marker.exists():
        config, checkpoint, bert = make(directory / "groundingdino")
        make_mobile_sam(directory / SEGMENTERS["mobile_sam"].files["vit_t"])
        if not quick:
            for kind in ("vit_b", "vit_h"):
                make_sam(directory / SEGMENTERS["sam"].files[kind], kind)
            for kind in SAM2_KINDS:
                make_sam2(directory / SEGMENTERS["sam2"].files[kind], kind)
            make_real_size_sam3(directory / SAM3_CHECKPOINT_NAME)
        marker.write_text(json.dumps([str(config), str(checkpoint), str(bert)]))
        print(f"checkpoints generated in {time.perf_counter() - started:.0f} s under {directory}", flush=True)
    config, checkpoint, bert = json.loads(marker.read_text())
    return {"GROUNDINGDINO_CONFIG": config, "GROUNDINGDINO_CHECKPOINT": checkpoint, "GROUNDINGDINO_TEXT_ENCODER": bert,
            "MOBILESAM_CHECKPOINT": str(directory / SEGMENTERS["mobile_sam"].files["vit_t"]),
            "MODEL_DIR": str(directory)}


def segmenter_env(env: dict, kind: str) -> dict:
    """The environment with `kind` (vit_h, vit_b, mobile_sam or a SAM 2.1 type) as the segmenter; SAM's checkpoint
    is found under MODEL_DIR by its published name, as the service finds it."""
    if kind == "mobile_sam":
        return {**env, "USE_SAM": "false", "USE_MOBILE_SAM": "true"}
    return {**env, "USE_SAM": "true", "SAM_MODEL_TYPE": kind}


class Clock:
    """Wall time of a call, the device's queue drained before and after."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __call__(self, fn) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    def median_ms(self, fn, iterations: int, warmup: int) -> float:
        for _ in range(warmup):
            self(fn)
        return 1000 * statistics.median(self(fn) for _ in range(iterations))


def fresh_ids():
    """A new image identity per call: the cache never answers, every pass runs."""
    counter = iter(range(10**9))
    return lambda: f"bench-{next(counter)}"


def measure(env: dict, kinds: list[str], image: np.ndarray, args, clock: Clock) -> dict:
    """One precision/compile setting: per segmenter kind, its encoder and answer times and peak memory; the DINO
    time once."""
    row = {}
    for kind in kinds:
        row.update(measure_set(segmenter_env(env, kind), kind, image, args, clock, with_dino="dino" not in row))
        if clock.cuda:
            torch.cuda.empty_cache()
    return row


def measure_set(env: dict, kind: str, image: np.ndarray, args, clock: Clock, with_dino: bool) -> dict:
    settings = Settings.from_env(env)
    with contextlib.redirect_stdout(sys.stderr):  # groundingdino prints while it builds its model
        models = build_models(settings)
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats()
    pipeline, new_id, row = Pipeline(models, settings, None), fresh_ids(), {}
    if "groundingdino backbone" in models.runtime["compiled"]:
        models.detector._forward(image, CAPTION, None)  # queues the image's input size for the compile thread
        models.detector.model.backbone[0].wait()
    if with_dino:
        row["dino"] = clock.median_ms(lambda: models.detector._forward(image, CAPTION, None), args.iterations,
                                      args.warmup)
    row[kind] = clock.median_ms(lambda: models.segmenter.embed(image), args.iterations, args.warmup)
    row[f"answer {kind}"] = clock.median_ms(lambda: pipeline.predict_image(image, new_id(), CONFIG, QUERY),
                                            args.iterations, args.warmup)
    if clock.cuda:
        row[f"peak GB {kind}"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def bulk(env: dict, image: np.ndarray, image_count: int, batch_sizes: list[int], clock: Clock, precision: str,
         warmup: bool = True) -> dict[int, float]:
    """Images per second of the bulk job's model work with MobileSAM at each BATCH_SIZE (images already decoded),
    on images of `image`'s size."""
    height, width = image.shape[:2]
    images = [make_image(width, height, seed=s) for s in range(min(image_count, 8))]
    env = {**segmenter_env(env, "mobile_sam"), "PRECISION": precision}
    return {size: bulk_rate({**env, "BATCH_SIZE": str(size)}, images, image_count, clock, warmup)
            for size in batch_sizes}


def bulk_rate(env: dict, images: list[np.ndarray], image_count: int, clock: Clock, warmup: bool) -> float:
    settings = Settings.from_env(env)
    with contextlib.redirect_stdout(sys.stderr):
        models = build_models(settings)
    pipeline, new_id, size = Pipeline(models, settings, None), fresh_ids(), settings.batch_size

    def run(count):
        pairs = [(images[i % len(images)], new_id()) for i in range(count)]
        for start in range(0, count, size):
            chunk = pairs[start : start + size]
            pipeline.encode(chunk, QUERY)
            for picture, image_id in chunk:
                pipeline.predict_image(picture, image_id, CONFIG, QUERY)

    if warmup:
        clock(lambda: run(size))
    return image_count / clock(lambda: run(image_count))


def sam3_answer(env: dict, image: np.ndarray, args, clock: Clock, precision: str = "fp32") -> dict:
    """ENGINE=sam3 under PRECISION=`precision` (fp32: as its package runs it, float32 and no TF32 matmuls;
    the default `auto` would allow TF32 on CUDA), eager: the whole answer for a fresh image, and peak memory."""
    settings = Settings.from_env({**env, "ENGINE": "sam3", "USE_MOBILE_SAM": "false", "PRECISION": precision,
                                  "SAM3_CHECKPOINT": os.path.join(env["MODEL_DIR"], SAM3_CHECKPOINT_NAME)})
    models = build_models(settings)
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats()
    pipeline, new_id = Pipeline(models, settings, None), fresh_ids()
    row = {"answer sam3": clock.median_ms(lambda: pipeline.predict_image(image, new_id(), CONFIG, QUERY),
                                          args.iterations, args.warmup)}
    if clock.cuda:
        row["peak GB sam3"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def dino_parts(env: dict, image: np.ndarray, args, clock: Clock) -> dict:
    """Grounding DINO's parts that issue #23 changed, each before and now, PRECISION=fp32: the input tensor (PIL
    resize + ToTensor + Normalize on the host, then copied to the device; now torch on the device), the deformable
    attention over the inputs one pass hands it (a grid_sample per level; now dino.levels_batched_deformable_attention)
    and a whole pass with both old parts against both new (the text features reused in both)."""
    from groundingdino.models.GroundingDINO import ms_deform_attn

    settings = Settings.from_env({**segmenter_env(env, "mobile_sam"), "PRECISION": "fp32"})
    with contextlib.redirect_stdout(sys.stderr):
        detector = build_models(settings).detector
    library, batched = library_deformable_attention(), levels_batched_deformable_attention
    device_resize = detector.preprocess

    def host_resize(picture: np.ndarray) -> torch.Tensor:
        return groundingdino_image_tensor(picture).to(detector.device)

    def pass_ms(resize, attention) -> float:
        detector.preprocess, ms_deform_attn.multi_scale_deformable_attn_pytorch = resize, attention
        try:
            return clock.median_ms(lambda: detector._forward(image, CAPTION, None), args.iterations, args.warmup)
        finally:
            detector.preprocess, ms_deform_attn.multi_scale_deformable_attn_pytorch = device_resize, batched

    calls = []
    ms_deform_attn.multi_scale_deformable_attn_pytorch = lambda *a: calls.append(a) or batched(*a)
    detector._forward(image, CAPTION, None)
    ms_deform_attn.multi_scale_deformable_attn_pytorch = batched
    row = {"input before": clock.median_ms(lambda: host_resize(image), args.iterations, args.warmup),
           "input now": clock.median_ms(lambda: device_resize(image), args.iterations, args.warmup)}
    with torch.no_grad():
        for name, attention in (("before", library), ("now", batched)):
            row[f"attention {name}"] = clock.median_ms(lambda fn=attention: [fn(*a) for a in calls],
                                                       args.iterations, args.warmup)
    row["pass before"] = pass_ms(host_resize, library)
    row["pass now"] = pass_ms(device_resize, batched)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true",
                        help="small test models, MobileSAM only, 1 iteration, eager only, bulk of 2 images in fp32, no "
                             "warm-up")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--models", type=Path, help="where the checkpoints are generated (reused if there)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the COMPILE=true row")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="start no section after this many seconds of the run (default 450)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    silence_third_party_warnings()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device visible (use --device cpu --quick on a machine without one)")
    if args.quick:
        args.iterations = 1
    args.warmup = 1 if args.quick else 3
    run_started, figures = time.perf_counter(), {}

    def within_budget(section: str) -> bool:
        """Whether `section` may start; says so when it may not."""
        spent = time.perf_counter() - run_started
        if spent < args.budget_s:
            return True
        print(f"  skipped {section}: {spent:.0f} s of the {args.budget_s:.0f} s budget spent", flush=True)
        return False

    def save(**measured) -> None:
        figures.update(measured)
        if args.json:
            args.json.write_text(json.dumps(figures, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        env = generate(args.models or Path(tmp), args.quick)
        env = {**env, "DEVICE": args.device, "MAX_DETECTIONS": "20"}
        # --quick (a smoke test of the code paths): a wide picture keeps Grounding DINO's input small on a CPU.
        image = make_image(320, 40, seed=1) if args.quick else make_image(1280, 960, seed=1)
        kinds = ["mobile_sam"] if args.quick else ["vit_h", "vit_b", "mobile_sam", *SAM2_KINDS]
        clock = Clock(args.device)
        device_name = torch.cuda.get_device_name() if clock.cuda else "CPU"
        print(f"device: {device_name}; image {image.shape[1]}x{image.shape[0]}; median of {args.iterations} after "
              f"{args.warmup} warm-up; milliseconds", flush=True)
        rows = {}
        save(device=device_name, rows=rows)

        def measure_row(precision: str, compiled: str) -> None:
            if not within_budget(f"{precision}, compile={compiled}"):
                return
            started = time.perf_counter()
            rows[f"{precision}, compile={compiled}"] = measure(
                {**env, "PRECISION": precision, "COMPILE": compiled}, kinds, image, args, clock)
            print(f"  ({precision}, compile={compiled} measured in {time.perf_counter() - started:.0f} s)",
                  flush=True)
            save(rows=rows)

        measure_row("fp32", "false")
        if not args.quick:  # the same code as the fp32 row; bf16 on a CPU without bf16 units takes minutes
            measure_row("bf16", "false")
        image_count, sizes, precisions = (2, [1, 2], ["fp32"]) if args.quick else (64, [1, 4, 8], ["fp32", "bf16"])
        rates = {p: bulk(env, image, image_count, sizes, clock, p, warmup=not args.quick) for p in precisions
                 if within_budget(f"bulk {p}")}
        save(bulk=rates)
        print(f"bulk, Grounding DINO + MobileSAM, {image_count} images, images/s: " + "; ".join(
            f"{p}: " + ", ".join(f"batch {b} {r:.2f}" for b, r in rate.items()) for p, rate in rates.items()))
        if not args.quick and within_budget("SAM 3"):
            sam3 = sam3_answer(env, image, args, clock)
            print("SAM 3 engine, PRECISION=fp32: " + ", ".join(f"{k} {v:.2f}" for k, v in sam3.items()), flush=True)
        else:
            sam3 = {}
        save(**{"sam3 fp32": sam3})
        if within_budget("Grounding DINO's parts"):
            parts = dino_parts(env, image, args, clock)
            print("Grounding DINO's parts before and now, PRECISION=fp32, ms: " + ", ".join(
                f"{k} {v:.1f}" for k, v in parts.items()))
            save(**{"dino parts fp32": parts})
        if not (args.quick or args.no_compile):
            measure_row("bf16", "true")  # last: its compiles take the longest
        columns = list(next(iter(rows.values()), {}))
        print("| setting | " + " | ".join(columns) + " |")
        print("|---" * (len(columns) + 1) + "|")
        for name, row in rows.items():
            print(f"| {name} | " + " | ".join(f"{row[c]:.1f}" if "GB" not in c else f"{row[c]:.2f}"
                                              for c in columns) + " |")


if __name__ == "__main__":
    main()
