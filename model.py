"""GroundedSAM: the Label Studio backend. Text prompt -> Grounding DINO boxes -> SAM masks -> regions."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from cache import image_digest
from config import Settings
from detections import Detections
from images import ImageError, ImageLoader
from labeling import LabelConfigError, LabelingConfig, parse_label_config
from loader import ModelLoader, Models
from mlbase import LabelStudioMLBase, ProjectStore, RequestError
from prompts import PromptPlan, match_label, parse_prompt
from regions import build_regions, prediction

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProjectParams:
    """Per-project detection settings: the project's extra params over the environment's defaults."""

    prompt: str | None
    box_threshold: float
    text_threshold: float
    max_detections: int


def project_params(extra: dict, settings: Settings) -> ProjectParams:
    """Validate a project's extra params ({"prompt", "box_threshold", "text_threshold", "max_detections"})."""
    allowed = {"prompt", "box_threshold", "text_threshold", "max_detections"}
    unknown = sorted(set(extra) - allowed)
    if unknown:
        raise RequestError(f"extra_params: unknown key(s) {unknown}; allowed: {sorted(allowed)}")

    def number(key, default, kind, lo, hi):
        value = extra.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
            raise RequestError(f"extra_params.{key} must be a number between {lo} and {hi}, got {value!r}")
        if kind is int and value != int(value):
            raise RequestError(f"extra_params.{key} must be a whole number, got {value!r}")
        return kind(value)

    prompt = extra.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise RequestError(f"extra_params.prompt must be a string, got {type(prompt).__name__}")
    return ProjectParams(
        prompt=prompt,
        box_threshold=number("box_threshold", settings.box_threshold, float, 0.0, 1.0),
        text_threshold=number("text_threshold", settings.text_threshold, float, 0.0, 1.0),
        max_detections=number("max_detections", settings.max_detections, int, 1, 900),
    )


@dataclass(frozen=True)
class ClickPrompt:
    """One interactive SAM prompt from Label Studio's smart tools; coordinates in percent of the image."""

    points: tuple[tuple[float, float], ...]  # (x, y) of each click
    point_labels: tuple[int, ...]  # 1 = positive click, 0 = negative (Alt-click)
    box: tuple[float, float, float, float] | None  # x0, y0, x1, y1 of a smart rectangle
    label: str  # the label of the tool that made them


def find_clicks(context: dict | None, config: LabelingConfig) -> ClickPrompt | None:
    """The keypoints (of a KeyPointLabels) and the rectangle (of a smart RectangleLabels) in an
    interactive context, as one SAM prompt; None when there are none (e.g. a TextArea prompt)."""
    keypoint_controls = {c.name for c in config.keypoints}
    smart_rectangles = {c.name for c in config.rectangles if c.smart}
    points, point_labels, box, label = [], [], None, None
    for region in (context or {}).get("result") or []:
        if not isinstance(region, dict) or not isinstance(region.get("value"), dict):
            continue
        value, kind = region["value"], region.get("type")
        try:
            if kind == "keypointlabels" and region.get("from_name") in keypoint_controls:
                points.append((float(value["x"]), float(value["y"])))
                # Label Studio leaves is_positive out of some positive clicks.
                point_labels.append(0 if region.get("is_positive", True) in (False, 0, "false") else 1)
            elif kind == "rectanglelabels" and region.get("from_name") in smart_rectangles:
                x, y = float(value["x"]), float(value["y"])
                box = (x, y, x + float(value["width"]), y + float(value["height"]))
            else:
                continue
        except (KeyError, TypeError, ValueError):
            raise RequestError(f"context region {region.get('id')!r} ({kind}) has no usable x/y/width/height") from None
        label = label or next(iter(value.get(kind) or []), None)
    if not points and box is None:
        return None
    if label is None:
        raise RequestError("the clicked keypoint or rectangle carries no label", status=422)
    return ClickPrompt(tuple(points), tuple(point_labels), box, label)


def find_prompt(context: dict | None, config: LabelingConfig, params: ProjectParams, settings: Settings) -> str | None:
    """Where the prompt comes from, first match wins: the context region of the config's TextArea;
    a context region with value.text and no from_name (dino-support batch action); the project's
    extra_params.prompt; DEFAULT_PROMPT; the config's label names. None: no prompt (DEFAULT_PROMPT="")."""
    regions = (context or {}).get("result") or []
    regions = [r for r in regions if isinstance(r, dict) and isinstance(r.get("value"), dict)]

    def text_of(region) -> str | None:
        text = region["value"].get("text")
        if isinstance(text, list):
            text = "\n".join(str(t) for t in text)
        return text if isinstance(text, str) and text.strip() else None

    for region in regions:
        if config.prompt_name and region.get("from_name") == config.prompt_name and text_of(region):
            return text_of(region)
    for region in regions:
        if not region.get("from_name") and text_of(region):
            return text_of(region)
    if params.prompt and params.prompt.strip():
        return params.prompt
    if settings.default_prompt is not None:
        return settings.default_prompt if settings.default_prompt.strip() else None
    return ". ".join(config.labels)


class GroundedSAM(LabelStudioMLBase):
    def __init__(self, project_id: str | None, label_config: str | None, *, store: ProjectStore,
                 loader: ModelLoader, images: ImageLoader, settings: Settings):
        super().__init__(project_id, label_config, store)
        self.loader, self.images, self.settings = loader, images, settings
        self._started = time.perf_counter()  # one instance per request: PREDICT_TIME_BUDGET counts from here

    @property
    def model_version(self) -> str:
        return self.loader.model_version

    @cached_property
    def config(self) -> LabelingConfig:
        xml = self.label_config or self.get("label_config")
        if not xml:
            raise RequestError("no labeling config: send 'label_config' or call /setup first", status=422)
        try:
            return parse_label_config(xml)
        except LabelConfigError as e:
            raise RequestError(str(e), status=422) from None

    @cached_property
    def params(self) -> ProjectParams:
        return project_params(self.extra_params, self.settings)

    def setup(self) -> None:
        self.config  # noqa: B018 - validates the labeling config (422 if unusable)
        self.params  # noqa: B018 - validates extra_params (400 if malformed)

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs) -> list[dict | list]:
        """Smart-tool clicks and boxes in the context go to SAM alone; anything else is a text prompt.

        One entry per task: its prediction, or [] (no prediction) for tasks left out by PREDICT_TIME_BUDGET."""
        clicks = find_clicks(context, self.config)
        if clicks is not None:
            return self._predict_clicks(tasks, clicks)
        return self._predict_text(tasks, context)

    def _predict_text(self, tasks: list[dict], context: dict | None) -> list[dict | list]:
        config, params = self.config, self.params
        prompt = find_prompt(context, config, params, self.settings)
        if prompt is None:
            logger.info("no prompt and DEFAULT_PROMPT is empty: %d task(s) left without prediction", len(tasks))
            return [self._empty() for _ in tasks]
        plan = parse_prompt(prompt, config.labels, config.predicted_values)
        for phrase, reason in plan.skipped:
            logger.warning("prompt phrase %r ignored: %s", phrase, reason)
        if not plan.phrases:
            reasons = "; ".join(f"{p!r}: {why}" for p, why in plan.skipped) or "it has no phrase"
            raise RequestError(f"prompt {prompt!r} gives nothing to detect: {reasons}", status=422)
        models = self.loader.get()
        return self._each_task(tasks, models, lambda image, image_id: self._text_regions(image, image_id, plan,
                                                                                         params, models))

    def _predict_clicks(self, tasks: list[dict], clicks: ClickPrompt) -> list[dict | list]:
        mask_labels = self.config.mask_labels
        label = match_label(clicks.label, mask_labels)
        if label is None:
            raise RequestError(f"clicked label {clicks.label!r} has no BrushLabels or PolygonLabels label of the "
                               f"same name (their labels: {', '.join(mask_labels) or 'none'})", status=422)
        models = self.loader.get()
        if models.segmenter is None:
            raise RequestError("clicks need a segmenter: set USE_MOBILE_SAM=true or USE_SAM=true", status=422)
        return self._each_task(tasks, models, lambda image, image_id: self._click_regions(image, image_id, clicks,
                                                                                          label, models))

    @cached_property
    def label_studio_access(self) -> tuple[str | None, str | None]:
        """The Label Studio host and token /setup sent (fallbacks for image downloads), read once a request."""
        return self.get("hostname"), self.get("access_token")

    def _image(self, url: str, models: Models) -> tuple[np.ndarray, str]:
        """The task image (H, W, 3) RGB and its pixel digest. Kept in the cache for IMAGE_CACHE_SECONDS so
        a series of clicks on one image downloads and decodes it once."""
        hostname, token = self.label_studio_access

        def fetch():
            image = self.images.load(url, hostname=hostname, access_token=token)
            return image, image_digest(image)

        return models.cache.get(("image", url, hostname), fetch, max_age=self.settings.image_cache_seconds)

    def _each_task(self, tasks: list[dict], models: Models,
                   regions_for: Callable[[np.ndarray, str], list[dict]]) -> list[dict | list]:
        """One prediction per task; a task whose image can't be used gets an empty one.

        Once the next task would likely end past PREDICT_TIME_BUDGET (at the mean time per task so far), the
        remaining tasks get [] instead: Label Studio stores nothing for them, rather than losing every task's
        prediction when its ML_TIMEOUT_PREDICT cuts the answer off, and asks for them again next time."""
        results: list[dict | list] = []
        budget, loop_started = self.settings.predict_time_budget, time.perf_counter()
        for done, task in enumerate(tasks):
            now = time.perf_counter()
            if budget and done and now - self._started + (now - loop_started) / done > budget:
                logger.warning("%d of %d task(s) predicted in %.1f s; the next would end past PREDICT_TIME_BUDGET="
                               "%g s, so the other %d get no prediction in this answer (Retrieve Predictions "
                               "again continues with them)", done, len(tasks), now - self._started, budget,
                               len(tasks) - done)
                results.extend([] for _ in tasks[done:])
                break
            try:
                data = task.get("data")
                url = data.get(self.config.image_key) if isinstance(data, dict) else None
                if not isinstance(url, str) or not url:
                    raise TaskError(f"task data has no image URL under {self.config.image_key!r}")
                started = time.perf_counter()
                image, image_id = self._image(url, models)
                regions = regions_for(image, image_id)
                logger.info("task %s: %dx%d image, %d region(s) in %.2f s", task.get("id"), image.shape[1],
                            image.shape[0], len(regions), time.perf_counter() - started)
                results.append(prediction(regions, self.model_version))
            except (ImageError, TaskError) as e:
                logger.warning("task %s: no prediction: %s", task.get("id"), e)
                results.append(self._empty())
        return results

    def _empty(self) -> dict:
        return prediction([], self.model_version)

    def _text_regions(self, image: np.ndarray, image_id: str, plan: PromptPlan, params: ProjectParams,
                      models: Models) -> list[dict]:
        t0 = time.perf_counter()
        detections = models.detector.detect(
            image, plan.phrases, params.box_threshold, params.text_threshold,
            params.max_detections, self.settings.nms_iou, image_id=image_id,
        )
        t1 = time.perf_counter()
        if models.segmenter is not None and self.config.wants_masks and len(detections):
            masks, _ = models.segmenter.segment_boxes(image, detections.xyxy, image_id=image_id)
            detections = detections.with_masks(masks)
        t2 = time.perf_counter()
        height, width = image.shape[:2]
        regions = build_regions(detections, self.config, width, height, self.settings.polygon_tolerance)
        logger.debug("%d detection(s); detect %.2f s, segment %.2f s, regions %.2f s",
                     len(detections), t1 - t0, t2 - t1, time.perf_counter() - t2)
        return regions

    def _click_regions(self, image: np.ndarray, image_id: str, clicks: ClickPrompt, label: str,
                       models: Models) -> list[dict]:
        height, width = image.shape[:2]
        scale = np.array([width, height], np.float64) / 100.0
        points = np.array(clicks.points, np.float64).reshape(-1, 2) * scale
        box = None if clicks.box is None else np.array(clicks.box, np.float64) * np.tile(scale, 2)
        mask, score = models.segmenter.segment_prompt(image, points, np.array(clicks.point_labels, np.int64), box,
                                                      image_id=image_id)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        xyxy = [[cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]] if len(rows) else [[0, 0, 0, 0]]
        detections = Detections(np.array(xyxy, np.float32), [score], [label], mask[None])
        # Only the mask: the click already is the user's region.
        return build_regions(detections, replace(self.config, rectangles=()), width, height,
                             self.settings.polygon_tolerance)


class TaskError(ValueError):
    """One task can't be predicted (its data is unusable); the others still are."""
