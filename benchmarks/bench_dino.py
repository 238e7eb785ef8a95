"""Grounding DINO's per-image cost with the caption's text features computed once per caption (dino.TextFeatures)
against the previous way (BERT run for every image), in the same run, on CPU (issue #23).

Random weights at the published size (the packaged Swin-T config and a bert-base-size text encoder,
tests/model_factory.make_real_size_groundingdino; nothing is downloaded), or the small test models with --quick.
Each round runs GroundingDino._forward (preprocess, backbone, BERT, transformer) on --images fresh images of one
prompt, once with the text features reused and once with BERT unwrapped (the model as groundingdino builds it), in
alternating order; it prints the medians per image, the text encoder's own time per call, and checks that both ways
give the same outputs.

    .venv/bin/python benchmarks/bench_dino.py [--rounds 3] [--images 4] [--quick]
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
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

import torch  # noqa: E402
from model_factory import make_groundingdino, make_image, make_real_size_groundingdino  # noqa: E402

from dino import GroundingDino  # noqa: E402

CAPTION = "shape . round thing ."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=4, help="fresh images per round and way")
    parser.add_argument("--quick", action="store_true", help="the small test models")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        make = make_groundingdino if args.quick else make_real_size_groundingdino
        config, checkpoint, text_encoder = make(Path(tmp))
        detector = GroundingDino.load(str(config), str(checkpoint), str(text_encoder), "cpu")
    memo = detector.model.bert
    images = [make_image(160, 24, seed=seed) for seed in range(args.images)]  # wide: 1333x200, the cheapest input

    def per_image(reuse: bool) -> tuple[float, list]:
        detector.model.bert = memo if reuse else memo.encoder  # the encoder as groundingdino built it
        memo._outputs.clear()  # each round pays for its first image's text features
        started, outputs = time.perf_counter(), [detector._forward(image, CAPTION, None) for image in images]
        return (time.perf_counter() - started) / len(images), outputs

    times = {True: [], False: []}
    for round_ in range(args.rounds):
        for reuse in (True, False) if round_ % 2 else (False, True):
            seconds, outputs = per_image(reuse)
            times[reuse].append(seconds)
            if reuse:
                reused = outputs
            else:
                every = outputs
        for (a, b), (c, d) in zip(reused, every, strict=True):
            assert torch.allclose(a, c, atol=1e-5) and torch.allclose(b, d, atol=1e-5), "outputs differ"
    detector.model.bert = memo
    tokens = detector.model.tokenizer([CAPTION], return_tensors="pt")
    with torch.no_grad():
        memo.encoder(**tokens)
        started = time.perf_counter()
        for _ in range(5):
            memo.encoder(**tokens)
        bert_ms = (time.perf_counter() - started) / 5 * 1000
    before, after = statistics.median(times[False]) * 1000, statistics.median(times[True]) * 1000
    size = "test-size models" if args.quick else "published size (Swin-T, bert-base), random weights"
    print(f"Grounding DINO, {size}, CPU, {args.images} images of one prompt per round, {args.rounds} rounds, "
          "median ms per image (preprocess + forward)")
    print("| | ms per image |\n|---|---|")
    print(f"| BERT every image (before) | {before:.1f} |")
    print(f"| text features once per caption (now) | {after:.1f} |")
    print(f"| saved per image | {before - after:.1f} ({100 * (before - after) / before:.1f} %) |")
    print(f"the text encoder alone: {bert_ms:.1f} ms a call; outputs the same both ways (atol 1e-5)")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__} with "
          f"{torch.get_num_threads()} thread(s); load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
