"""The command line: the service's pipeline without the service.

    python cli.py predict IMAGE_OR_URL --prompt "brown cat_cats. house" [--config label.xml]
                  [--box-threshold 0.3] [--text-threshold 0.25] [--max-detections 50]
                  [--out prediction.json] [--overlay overlay.png]

`predict` loads the models the environment names (the same variables as the service, README "Environment
variables"), runs the pipeline once and prints the Label Studio prediction JSON (or writes it to --out).
IMAGE_OR_URL is a local file, an http(s) URL, or a Label Studio /data/... path (with LABEL_STUDIO_URL and
LABEL_STUDIO_API_KEY set). Errors are one line on stderr and exit status 1 (2 for a malformed command line).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from config import ConfigError, Settings
from errors import ServiceError
from labeling import default_label_config, parse_label_config
from prompts import prompt_labels, require_phrases

logger = logging.getLogger("cli")


class CommandError(Exception):
    """A command that can't run; the message is printed as one line."""


def _read_image(source: str, settings: Settings):
    """(H, W, 3) uint8 RGB from a local file or a URL / Label Studio path; raises CommandError."""
    from images import ImageLoader, decode_image

    if os.path.exists(source) or not source.startswith(("http://", "https://", "/data/", "data/")):
        try:
            with open(source, "rb") as f:
                data = f.read()
        except OSError as e:
            raise CommandError(f"{source}: {e.strerror}") from None
        try:
            return decode_image(data, settings.image_max_pixels)
        except ServiceError as e:
            raise CommandError(f"{source}: {e}") from None
    try:
        return ImageLoader(settings).load(source)
    except ServiceError as e:
        raise CommandError(str(e)) from None


# Overlay colours (RGB), one per label in the order labels first appear.
_PALETTE = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                     (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)], np.uint8)


def draw_overlay(image: np.ndarray, detections) -> np.ndarray:
    """The image (H, W, 3) uint8 RGB with each detection's mask tinted, its box outlined and its label and score
    written above it, one colour per label. Returns a new array."""
    import cv2

    out = image.copy()
    colours = {label: _PALETTE[i % len(_PALETTE)] for i, label in enumerate(dict.fromkeys(detections.labels))}
    if detections.masks is not None:
        for mask, label in zip(detections.masks, detections.labels, strict=True):
            out[mask] = (out[mask] * 0.5 + colours[label] * 0.5).astype(np.uint8)
    thickness = max(1, round(max(image.shape[:2]) / 400))
    scale = max(0.4, max(image.shape[:2]) / 1200)
    for (x0, y0, x1, y1), label, score in zip(detections.xyxy, detections.labels, detections.scores, strict=True):
        colour = tuple(int(c) for c in colours[label])
        cv2.rectangle(out, (int(x0), int(y0)), (int(x1), int(y1)), colour, thickness)
        cv2.putText(out, f"{label} {score:.2f}", (int(x0), max(int(y0) - 4, 12)), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    colour, thickness, cv2.LINE_AA)
    return out


def predict(args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_env()
    except ConfigError as e:
        raise CommandError(str(e)) from None
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as f:
                xml = f.read()
        except OSError as e:
            raise CommandError(f"{args.config}: {e.strerror}") from None
    else:
        xml = default_label_config(prompt_labels(args.prompt))
    try:
        config = parse_label_config(xml)
        plan = require_phrases(args.prompt, config.labels, config.predicted_values)
    except ServiceError as e:
        raise CommandError(str(e)) from None
    for phrase, reason in plan.skipped:
        logger.warning("prompt phrase %r ignored: %s", phrase, reason)
    # Cheap checks first: the image is read before the models load (seconds to minutes).
    image = _read_image(args.image, settings)

    from cache import image_digest
    from images import ImageLoader
    from loader import build_models
    from pipeline import DetectionParams, Pipeline, TextQuery
    from regions import prediction

    params = DetectionParams(
        box_threshold=settings.box_threshold if args.box_threshold is None else args.box_threshold,
        text_threshold=settings.text_threshold if args.text_threshold is None else args.text_threshold,
        max_detections=settings.max_detections if args.max_detections is None else args.max_detections,
    )
    query = TextQuery(plan.phrases, params)
    try:
        # groundingdino prints while it builds its model: stdout is for the prediction alone.
        with contextlib.redirect_stdout(sys.stderr):
            pipeline = Pipeline(build_models(settings), settings, ImageLoader(settings))
    except ServiceError as e:
        raise CommandError(str(e)) from None
    detections = pipeline.detect(image, image_digest(image), query, wants_masks=config.wants_masks)
    height, width = image.shape[:2]
    result = prediction(pipeline.regions(detections, config, query, width, height), pipeline.model_version)
    text = json.dumps(result)
    if args.out:
        _write(args.out, lambda path: Path(path).write_text(text + "\n", encoding="utf-8"))
    else:
        print(text)
    if args.overlay:
        from PIL import Image

        _write(args.overlay, Image.fromarray(draw_overlay(image, detections)).save)
    logger.info("%d detection(s), %d region(s)", len(detections), len(result["result"]))
    return 0


def _write(path: str, write) -> None:
    try:
        write(path)
    except (OSError, ValueError) as e:  # PIL: ValueError for an unknown image extension
        raise CommandError(f"{path}: could not write it: {getattr(e, 'strerror', None) or e}") from None


def _unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1, got {text!r}")
    return value


def _detections(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 900:
        raise argparse.ArgumentTypeError(f"must be a whole number between 1 and 900, got {text!r}")
    return int(text)


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="cli.py", description=__doc__.split("\n\n")[0])
    commands = main.add_subparsers(dest="command", required=True)
    p = commands.add_parser("predict", help="run the pipeline on one image and print the prediction JSON",
                            description="Run the pipeline on one image and print the Label Studio prediction JSON.")
    p.add_argument("image", metavar="IMAGE_OR_URL", help="a local image file, an http(s) URL or a /data/... path")
    p.add_argument("--prompt", required=True, help='phrases to detect, e.g. "brown cat_cats. house"')
    p.add_argument("--config", help="a labeling config (XML file); default: the README's config with the "
                                    "prompt's labels")
    p.add_argument("--box-threshold", type=_unit_float, help="default: BOX_THRESHOLD")
    p.add_argument("--text-threshold", type=_unit_float, help="default: TEXT_THRESHOLD")
    p.add_argument("--max-detections", type=_detections, help="default: MAX_DETECTIONS")
    p.add_argument("--out", help="write the prediction JSON here instead of printing it")
    p.add_argument("--overlay", help="also write the image with the boxes, masks and labels drawn (PNG, JPEG)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    p.set_defaults(run=predict)
    return main


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except CommandError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
