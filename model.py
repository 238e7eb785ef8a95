"""GroundedSAM: the Label Studio backend. Text prompt -> Grounding DINO boxes -> SAM masks -> regions."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import cached_property

from config import Settings
from images import ImageError, ImageLoader
from labeling import LabelConfigError, LabelingConfig, parse_label_config
from loader import ModelLoader, Models
from mlbase import LabelStudioMLBase, ProjectStore, RequestError
from prompts import PromptPlan, parse_prompt
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
        self.set("label_config", self.label_config)

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs) -> list[dict]:
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
        results = []
        for task in tasks:
            try:
                results.append(self._predict_task(task, plan, params, models, config))
            except (ImageError, TaskError) as e:
                logger.warning("task %s: no prediction: %s", task.get("id"), e)
                results.append(self._empty())
        return results

    def _empty(self) -> dict:
        return prediction([], self.model_version)

    def _predict_task(self, task: dict, plan: PromptPlan, params: ProjectParams, models: Models,
                      config: LabelingConfig) -> dict:
        data = task.get("data")
        url = data.get(config.image_key) if isinstance(data, dict) else None
        if not isinstance(url, str) or not url:
            raise TaskError(f"task data has no image URL under {config.image_key!r}")
        t0 = time.perf_counter()
        image = self.images.load(url, hostname=self.get("hostname"), access_token=self.get("access_token"))
        t1 = time.perf_counter()
        detections = models.detector.detect(
            image, plan.phrases, params.box_threshold, params.text_threshold,
            params.max_detections, self.settings.nms_iou,
        )
        t2 = time.perf_counter()
        if models.segmenter is not None and config.brushes and len(detections):
            masks, _ = models.segmenter.segment_boxes(image, detections.xyxy)
            detections = detections.with_masks(masks)
        t3 = time.perf_counter()
        height, width = image.shape[:2]
        regions = build_regions(detections, config, width, height)
        t4 = time.perf_counter()
        logger.info("task %s: %dx%d, %d detection(s), %d region(s); image %.2f s, detect %.2f s, "
                    "segment %.2f s, regions %.2f s", task.get("id"), width, height, len(detections),
                    len(regions), t1 - t0, t2 - t1, t3 - t2, t4 - t3)
        return prediction(regions, self.model_version)


class TaskError(ValueError):
    """One task can't be predicted (its data is unusable); the others still are."""
