"""Per-image CPU cost of the two engines: SAM 3 (ENGINE=sam3) against Grounding DINO + MobileSAM and Grounding
DINO + SAM ViT-B, on the same image and prompt.

Every model at its published size with random weights (nothing is downloaded), loaded by loader.build_models from
the settings as the service loads them; each image goes through Pipeline.predict_image with a config of
RectangleLabels and BrushLabels (detection, masks, clean-up, RLE regions: the /predict work without HTTP). For each
engine, on --repeats fresh 1024x768 images, it prints the medians of:

  first       a two-phrase prompt on an image not seen before (every model encodes the image)
  repeat      the same prompt again (Grounding DINO: cached outputs and SAM embedding; SAM 3: cached image
              features and query outputs: only thresholds, clean-up and regions run)
  other       another prompt (one phrase) on the same image (cached image features / embeddings)

the size of the loaded weights, and the process's resident memory after the engine's runs (cumulative: the
engines run one after another in one process). Thresholds 0 and MAX_DETECTIONS 10, so every
engine returns 10 masks (random weights score arbitrarily). About 15 minutes on 2 cores; --quick: one image;
--only sam3 (or mobile_sam, sam_vit_b): one engine.

    .venv/bin/python benchmarks/bench_sam3.py [--repeats 2] [--quick] [--only sam3]
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import psutil  # noqa: E402
import torch  # noqa: E402
from model_factory import (  # noqa: E402
    make_image,
    make_mobile_sam,
    make_real_size_groundingdino,
    make_real_size_sam3,
    make_sam,
)

from cache import image_digest  # noqa: E402
from config import Settings  # noqa: E402
from images import ImageLoader  # noqa: E402
from labeling import parse_label_config  # noqa: E402
from loader import build_models  # noqa: E402
from pipeline import DetectionParams, Pipeline, TextQuery  # noqa: E402
from prompts import parse_prompt  # noqa: E402

CONFIG = parse_label_config("""<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image"><Label value="cats"/><Label value="house"/></RectangleLabels>
  <BrushLabels name="label2" toName="image"><Label value="cats"/><Label value="house"/></BrushLabels>
</View>""")
WIDTH, HEIGHT = 1024, 768
PROMPT, OTHER = "cat_cats. house", "round thing_cats"
PARAMS = DetectionParams(0.0, 0.0, 10, 0.0)


def query(prompt: str) -> TextQuery:
    return TextQuery(parse_prompt(prompt, CONFIG.labels).phrases, PARAMS)


def weights_gib(models) -> float:
    """GiB of parameters and buffers of the loaded models (what each worker holds before any image)."""
    modules = [models.detector.model] + ([models.segmenter.model] if models.segmenter else [])
    return sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers())) / 2**30


def run(name: str, env: dict, repeats: int) -> dict:
    started = time.perf_counter()
    settings = Settings.from_env(env)
    models = build_models(settings)
    load = time.perf_counter() - started
    pipeline = Pipeline(models, settings, ImageLoader(settings))
    times = {"first": [], "repeat": [], "other": []}
    for seed in range(repeats):
        image = make_image(WIDTH, HEIGHT, seed=100 + seed)
        image_id = image_digest(image)
        for kind, prompt in (("first", PROMPT), ("repeat", PROMPT), ("other", OTHER)):
            t = time.perf_counter()
            regions = pipeline.predict_image(image, image_id, CONFIG, query(prompt))["result"]
            times[kind].append(time.perf_counter() - t)
            if sum(r["type"] == "brushlabels" for r in regions) != PARAMS.max_detections:
                raise SystemExit(f"{name}: expected {PARAMS.max_detections} masks, got {len(regions)} regions")
        print(f"  {name} image {seed + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()),
              flush=True)
    result = {"name": name, "load": load, "weights": weights_gib(models),
              "rss": psutil.Process().memory_info().rss / 2**30, **{k: statistics.median(v) for k, v in times.items()}}
    del pipeline, models
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one image per engine")
    parser.add_argument("--only", choices=("mobile_sam", "sam_vit_b", "sam3"), help="one engine only")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {WIDTH}x{HEIGHT}, prompt {PROMPT!r}, "
          f"{repeats} image(s) per engine", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        config, checkpoint, bert = (make_real_size_groundingdino(tmp / "gdino") if args.only != "sam3"
                                    else ("", "", ""))
        common = {"GROUNDINGDINO_CONFIG": str(config), "GROUNDINGDINO_CHECKPOINT": str(checkpoint),
                  "GROUNDINGDINO_TEXT_ENCODER": str(bert), "DEVICE": "cpu", "MASK_MIN_AREA": "100"}
        engines = []
        if args.only in (None, "mobile_sam"):
            engines.append(("Grounding DINO + MobileSAM",
                            {**common, "MOBILESAM_CHECKPOINT": str(make_mobile_sam(tmp / "m.pt"))}))
        if args.only in (None, "sam_vit_b"):
            engines.append(("Grounding DINO + SAM ViT-B", {**common, "USE_SAM": "true", "SAM_MODEL_TYPE": "vit_b",
                                                           "SAM_CHECKPOINT": str(make_sam(tmp / "b.pth", "vit_b"))}))
        if args.only in (None, "sam3"):
            sam3_checkpoint = str(make_real_size_sam3(tmp / "sam3.pt"))
            engines.append(("SAM 3", {"ENGINE": "sam3", "USE_MOBILE_SAM": "false", "DEVICE": "cpu",
                                      "MASK_MIN_AREA": "100", "SAM3_CHECKPOINT": sam3_checkpoint}))
        print(f"random-weight checkpoints written in {time.perf_counter() - t:.0f} s", flush=True)
        results = [run(name, env, repeats) for name, env in engines]
    print()
    print("| engine | load | first prompt, new image | same prompt again | other prompt, same image | weights | RSS |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['load']:.0f} s | {r['first']:.1f} s | {r['repeat']:.1f} s "
              f"({100 * r['repeat'] / r['first']:.0f} %) | {r['other']:.1f} s ({100 * r['other'] / r['first']:.0f} %) "
              f"| {r['weights']:.2f} GiB | {r['rss']:.1f} GiB |")


if __name__ == "__main__":
    main()
