"""Grounding DINO's per-image overhead, each change of issue #23 against the way before it, in the same run, on CPU.

The ways, each adding one change to the one above (the first is the code as it was at 25a3cc2):

  before                      PIL resize + ToTensor + Normalize (groundingdino's load_image), BERT for every image,
                              the library's deformable attention (a grid_sample per feature level)
  + text features once        the caption's BERT features computed once per caption (dino.TextFeatures)
  + levels batched            the deformable attention as one gather over all levels
                              (dino.levels_batched_deformable_attention)
  + resize on the device      torch resizes and normalises the uint8 image where the model runs (now)

Random weights at the published size (the packaged Swin-T config and a bert-base-size text encoder,
tests/model_factory.make_real_size_groundingdino; nothing is downloaded), or the small test models with --quick.
Each round runs GroundingDino._forward (preprocess, backbone, BERT, transformer) on --images fresh --size images of
one prompt in each way, the ways in a rotating order; it prints the medians per image, then each changed part alone
(the resize; the deformable attention over the inputs one pass hands it; a BERT call). With --compile, then
COMPILE=true's Grounding DINO part: the Swin backbone compiled for the image's input size in the background
(dino.CompiledBackbone), how long that took, and the backbone and a whole pass eager against compiled. Outputs: the text
features' ways must agree to 1e-5 and each attention call to 1e-4; how far the attention's ways end apart after a
pass's random-weight layers is printed.

    .venv/bin/python benchmarks/bench_dino.py [--rounds 3] [--images 1] [--size 1280x960] [--quick] [--compile]
"""

from __future__ import annotations

import argparse
import contextlib
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

import torch  # noqa: E402
from bench_gpu import Clock  # noqa: E402
from groundingdino.models.GroundingDINO import ms_deform_attn  # noqa: E402
from model_factory import (  # noqa: E402
    groundingdino_image_tensor,
    library_deformable_attention,
    make_groundingdino,
    make_image,
    make_real_size_groundingdino,
)

from dino import GroundingDino, levels_batched_deformable_attention  # noqa: E402

CAPTION = "shape . round thing ."
WAYS = ["before", "+ text features once", "+ levels batched", "+ resize on the device"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=1, help="fresh images per round and way")
    parser.add_argument("--size", default="1280x960", help="the images' WIDTHxHEIGHT (default 1280x960)")
    parser.add_argument("--quick", action="store_true", help="the small test models")
    parser.add_argument("--compile", action="store_true", help="also time the compiled backbone (COMPILE=true)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        make = make_groundingdino if args.quick else make_real_size_groundingdino
        config, checkpoint, text_encoder = make(Path(tmp))
        detector = GroundingDino.load(str(config), str(checkpoint), str(text_encoder), "cpu")
    memo, device_resize, library = detector.model.bert, detector.preprocess, library_deformable_attention()
    images = [make_image(width, height, seed=seed) for seed in range(args.images)]

    def use(way: int) -> None:
        """The code of WAYS[way]."""
        detector.model.bert = memo if way >= 1 else memo.encoder  # the encoder as groundingdino built it
        attention = levels_batched_deformable_attention if way >= 2 else library
        ms_deform_attn.multi_scale_deformable_attn_pytorch = attention
        detector.preprocess = device_resize if way >= 3 else groundingdino_image_tensor

    def per_image(way: int) -> tuple[float, list]:
        use(way)
        memo._outputs.clear()  # each round pays for its first image's text features
        started, outputs = time.perf_counter(), [detector._forward(image, CAPTION, None) for image in images]
        return (time.perf_counter() - started) / len(images), outputs

    times: dict[int, list[float]] = {way: [] for way in range(len(WAYS))}
    apart = []  # the attention's two ways: the largest difference of a pass's scores or boxes
    for round_ in range(args.rounds):
        outputs = {}
        for way in [(round_ + i) % len(WAYS) for i in range(len(WAYS))]:
            seconds, outputs[way] = per_image(way)
            times[way].append(seconds)
        for (logits_a, boxes_a), (logits_b, boxes_b) in zip(outputs[0], outputs[1], strict=True):
            assert torch.allclose(logits_a, logits_b, atol=1e-5) and torch.allclose(boxes_a, boxes_b, atol=1e-5)
        for (logits_a, boxes_a), (logits_b, boxes_b) in zip(outputs[1], outputs[2], strict=True):
            apart.append(max((logits_a - logits_b).abs().max().item(), (boxes_a - boxes_b).abs().max().item()))

    # Each changed part alone.
    image = images[0]
    clock = Clock("cpu")
    resize = {"PIL (before)": clock.median_ms(lambda: groundingdino_image_tensor(image), 5, 1),
              "torch (now)": clock.median_ms(lambda: device_resize(image), 5, 1)}
    calls = []
    ms_deform_attn.multi_scale_deformable_attn_pytorch = lambda *a: calls.append(a) or library(*a)
    detector._forward(image, CAPTION, None)
    with torch.no_grad():
        call_apart = max((library(*a) - levels_batched_deformable_attention(*a)).abs().max().item() for a in calls)
        assert call_apart < 1e-4, call_apart
        attention = {name: clock.median_ms(lambda fn=fn: [fn(*a) for a in calls], 3, 1) for name, fn in
                     (("grid_sample per level (before)", library), ("levels batched (now)",
                                                                     levels_batched_deformable_attention))}
        tokens = detector.model.tokenizer([CAPTION], return_tensors="pt")
        bert_ms = clock.median_ms(lambda: memo.encoder(**tokens), 5, 1)

    medians = [statistics.median(times[way]) * 1000 for way in range(len(WAYS))]
    size = "test-size models" if args.quick else "published size (Swin-T, bert-base), random weights"
    print(f"Grounding DINO, {size}, CPU, {args.images} {width}x{height} images of one prompt per round and way, "
          f"{args.rounds} rounds, median ms per image (preprocess + forward pass)")
    print("| way | ms per image | against the row above |\n|---|---|---|")
    for way, ms in enumerate(medians):
        change = f"{ms - medians[way - 1]:+.1f}" if way else ""
        print(f"| {WAYS[way]} | {ms:.1f} | {change} |")
    print(f"now against before: {medians[0] / medians[-1]:.2f}x")
    print("parts alone, median ms: input tensor " + ", ".join(f"{k} {v:.1f}" for k, v in resize.items())
          + f"; deformable attention, one pass's {len(calls)} calls: "
          + ", ".join(f"{k} {v:.1f}" for k, v in attention.items()) + f"; the text encoder, one call: {bert_ms:.1f}")
    print(f"outputs: the text features' ways equal (atol 1e-5); the attention's ways {call_apart:.1e} apart at most "
          f"per call, {max(apart):.1e} in a pass's scores and boxes (float rounding, through the random-weight "
          "layers); the resize changes the input by at most one level (tests/test_dino.py)")
    if args.compile:
        use(len(WAYS) - 1)  # the code as it is now (the parts above left the library's attention, recording, in)
        compiled(detector, image, clock)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__} with "
          f"{torch.get_num_threads()} thread(s); load average now {os.getloadavg()[0]:.1f}")


def compiled(detector: GroundingDino, image, clock: Clock) -> None:
    """COMPILE=true: the backbone compiled for the image's input size (what a first image of that size queues),
    then the backbone alone and a whole pass, eager against compiled."""
    backbone = detector.compile((1,))
    started = time.perf_counter()
    detector._forward(image, CAPTION, None)  # eager; queues the size
    backbone.wait()
    compile_s = time.perf_counter() - started
    tensor = detector.preprocess(image)[None]
    with torch.no_grad():
        apart = max((a - b).abs().max().item() for a, b in
                    zip(backbone.swin.forward_raw(tensor), backbone._compiled(tensor), strict=True))
        swin = {name: clock.median_ms(lambda fn=fn: fn(tensor), 5, 1) for name, fn in
                (("eager", backbone.swin.forward_raw), ("compiled", backbone._compiled))}
    ready, backbone.ready = backbone.ready, set()  # the same module, run eager
    passes = {"eager": clock.median_ms(lambda: detector._forward(image, CAPTION, None), 5, 1)}
    backbone.ready = ready
    passes["compiled"] = clock.median_ms(lambda: detector._forward(image, CAPTION, None), 5, 1)
    (height, width), = ready
    print(f"compiled backbone (COMPILE=true): input {width}x{height} compiled and warmed up at batch 1 in "
          f"{compile_s:.1f} s (from the first image of that size); median ms, Swin alone: "
          + ", ".join(f"{k} {v:.1f}" for k, v in swin.items()) + "; a whole pass: "
          + ", ".join(f"{k} {v:.1f}" for k, v in passes.items()) + f"; features {apart:.1e} apart at most")


if __name__ == "__main__":
    main()
