"""Latency of repeated prompts on one image: what the shared embedding cache buys.

Runs POST /predict through the real app (_wsgi.create_backend_app) on random-weight models at their
published sizes (Grounding DINO Swin-T with a bert-base text encoder; MobileSAM, then SAM ViT-B), on a
1024x768 photo served from a loopback server, and prints per segmenter:

  first click      a smart-keypoint click on an image not seen before (SAM encodes the image)
  repeated click   another click on the same image (the embedding comes from the cache)
  first text       a text prompt on an image not seen before (Grounding DINO + SAM encoder + decoder)
  repeated text    the same prompt again (cached detector outputs and SAM embedding)
  other text       a different prompt on the same image (cached backbone features and SAM embedding;
                   the detector's text-conditioned encoder and decoder run again)

Targets (issue #4, this CPU): repeated click <= 5 % of the first; repeated text <= 50 % of the first with
MobileSAM and <= 15 % with SAM ViT-B. Medians over --repeats fresh images. Nothing is downloaded.

    .venv/bin/python benchmarks/bench_interactive.py [--repeats 2] [--quick]
"""

from __future__ import annotations

import argparse
import io
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

import torch  # noqa: E402
from model_factory import make_image, make_mobile_sam, make_real_size_groundingdino, make_sam  # noqa: E402
from PIL import Image  # noqa: E402
from servers import ImageServer  # noqa: E402

from _wsgi import create_backend_app  # noqa: E402

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1" showSubmitButton="true"/>
  <RectangleLabels name="label" toName="image"><Label value="cats"/><Label value="house"/></RectangleLabels>
  <KeyPointLabels name="click" toName="image" smart="true"><Label value="cats"/></KeyPointLabels>
  <BrushLabels name="label2" toName="image"><Label value="cats"/><Label value="house"/></BrushLabels>
</View>"""
WIDTH, HEIGHT = 1024, 768
TARGETS = {"mobile_sam": (0.05, 0.50), "sam_vit_b": (0.05, 0.15)}


def png(seed: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(make_image(WIDTH, HEIGHT, seed=seed)).save(out, "PNG")
    return out.getvalue()


def click_context(*points):
    return {"result": [{"original_width": WIDTH, "original_height": HEIGHT, "image_rotation": 0,
                        "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": ["cats"]}, "is_positive": True,
                        "id": f"k{i}", "from_name": "click", "to_name": "image", "type": "keypointlabels"}
                       for i, (x, y) in enumerate(points)]}


def text_context(prompt: str):
    return {"result": [{"value": {"text": [prompt]}, "id": "t", "from_name": "prompt", "to_name": "image",
                        "type": "textarea", "origin": "manual"}]}


def timed_predict(client, image_path: str, context) -> float:
    body = {"tasks": [{"id": 1, "data": {"image": image_path}}], "project": "1.1", "label_config": CONFIG,
            "params": {"context": context}}
    started = time.perf_counter()
    response = client.post("/predict", json=body)
    elapsed = time.perf_counter() - started
    result = response.json["results"][0]["result"] if response.status_code == 200 else None
    if not result:
        raise SystemExit(f"/predict gave no regions ({response.status_code}): {response.json}")
    return elapsed


def bench(name: str, env: dict, server: ImageServer, seeds: list[int]) -> dict:
    app = create_backend_app(env)
    client = app.test_client()
    loader = app.extensions["model_loader"]
    started = time.perf_counter()
    loader.get(timeout=900)
    print(f"{name}: models loaded in {time.perf_counter() - started:.1f} s", flush=True)
    times: dict[str, list[float]] = {k: [] for k in ("first click", "repeated click", "first text",
                                                        "repeated text", "other text")}
    for seed in seeds:
        click_image, text_image = f"/data/upload/1/click{seed}.png", f"/data/upload/1/text{seed}.png"
        times["first click"].append(timed_predict(client, click_image, click_context((30, 40))))
        times["repeated click"].append(statistics.median(
            timed_predict(client, click_image, click_context((30, 40), (60 + i, 55))) for i in range(3)))
        times["first text"].append(timed_predict(client, text_image, text_context("round thing_cats. box_house")))
        times["repeated text"].append(timed_predict(client, text_image, text_context("round thing_cats. box_house")))
        times["other text"].append(timed_predict(client, text_image, text_context("brown cat_cats")))
    print(f"{name}: cache {client.get('/health').json['embedding_cache']}", flush=True)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="fresh images per measurement (median)")
    parser.add_argument("--quick", action="store_true", help="MobileSAM only")
    args = parser.parse_args(argv)
    seeds = list(range(args.repeats))
    with tempfile.TemporaryDirectory(prefix="bench_interactive_") as tmp:
        tmp = Path(tmp)
        print("building random-weight models (real sizes)...", flush=True)
        gd_config, gd_checkpoint, bert = make_real_size_groundingdino(tmp / "gd")
        segmenters = {"mobile_sam": {"USE_MOBILE_SAM": "true",
                                     "MOBILESAM_CHECKPOINT": str(make_mobile_sam(tmp / "mobile_sam.pt"))}}
        if not args.quick:
            segmenters["sam_vit_b"] = {"USE_SAM": "true", "SAM_MODEL_TYPE": "vit_b",
                                       "SAM_CHECKPOINT": str(make_sam(tmp / "sam_vit_b_01ec64.pth", "vit_b"))}
        files = {f"/data/upload/1/{kind}{seed}.png": png(1000 * (kind == "text") + seed)
                 for kind in ("click", "text") for seed in seeds}
        rows = {}
        with ImageServer(files, token="bench") as server:
            for name, extra in segmenters.items():
                env = {"GROUNDINGDINO_CONFIG": str(gd_config), "GROUNDINGDINO_CHECKPOINT": str(gd_checkpoint),
                       "GROUNDINGDINO_TEXT_ENCODER": str(bert), "DEVICE": "cpu", "MAX_DETECTIONS": "10",
                       "USE_MOBILE_SAM": "false", "DATA_DIR": str(tmp / "data"), "LABEL_STUDIO_URL": server.url,
                       "LABEL_STUDIO_API_KEY": "bench", "LOG_LEVEL": "warning", **extra}
                rows[name] = bench(name, env, server, seeds)

    print(f"\nPOST /predict seconds, {WIDTH}x{HEIGHT} image, median of {args.repeats} fresh image(s); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    header = f"{'segmenter':<11} {'first click':>11} {'repeat click':>12} {'ratio':>7} {'target':>6}   " \
             f"{'first text':>10} {'repeat text':>11} {'ratio':>7} {'target':>6}   {'other text':>10} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for name, t in rows.items():
        click_target, text_target = TARGETS[name]
        click_ratio = t["repeated click"] / t["first click"]
        text_ratio = t["repeated text"] / t["first text"]
        other_ratio = t["other text"] / t["first text"]
        print(f"{name:<11} {t['first click']:>11.3f} {t['repeated click']:>12.3f} {click_ratio:>7.1%} "
              f"{click_target:>6.0%}   {t['first text']:>10.2f} {t['repeated text']:>11.3f} {text_ratio:>7.1%} "
              f"{text_target:>6.0%}   {t['other text']:>10.2f} {other_ratio:>7.1%}")
    for name, t in rows.items():
        click_target, text_target = TARGETS[name]
        ok_click = t["repeated click"] / t["first click"] <= click_target
        ok_text = t["repeated text"] / t["first text"] <= text_target
        verdict = {True: "met", False: "MISSED"}
        print(f"{name}: repeated click {verdict[ok_click]}, repeated text {verdict[ok_text]}")


if __name__ == "__main__":
    main()
