"""GroundedSAM: the Label Studio adapter on top of the pipeline.

It turns what Label Studio sends (a project's extra params, an interactive context, a batch of tasks) into
pipeline queries, keeps a batch inside PREDICT_TIME_BUDGET, and wraps each task's outcome in the envelope Label
Studio stores. The text -> boxes -> masks -> regions work itself is pipeline.py's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from functools import cached_property

from config import Settings
from errors import InteractiveError, LabelConfigError, ParamsError
from everything import EverythingParams, everything_params
from images import ImageLoader
from jobs import JobParams, JobRunner, job_chunking
from labeling import LabelingConfig, parse_label_config
from loader import ModelLoader
from ls_client import Selection
from masks import CleanupParams, cleanup_params
from mlbase import LabelStudioMLBase
from pipeline import ClickQuery, DetectionParams, Pipeline, Query, TextQuery, detection_params, everything_defaults
from prompts import match_label, require_phrases
from regions import prediction
from scheduler import Caller, Dropped, Scheduler
from store import JobStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProjectParams:
    """Per-project settings: the project's extra params over the environment's defaults."""

    prompt: str | None
    detection: DetectionParams
    cleanup: CleanupParams | None = None
    everything: EverythingParams | None = None


def project_params(extra: dict, settings: Settings) -> ProjectParams:
    """Validate a project's extra params ({"prompt", "box_threshold", "text_threshold", "max_detections",
    "sam3_score_threshold", "label_thresholds": {label: {gate: value}}, "mask_min_area", "mask_smooth",
    "everything": {SamAutomaticMaskGenerator arguments}})."""
    allowed = {"prompt", "box_threshold", "text_threshold", "max_detections", "sam3_score_threshold",
               "label_thresholds", "mask_min_area", "mask_smooth", "everything"}
    unknown = sorted(set(extra) - allowed)
    if unknown:
        raise ParamsError(f"extra_params: unknown key(s) {unknown}; allowed: {sorted(allowed)}")

    prompt = extra.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ParamsError(f"extra_params.prompt must be a string, got {type(prompt).__name__}")
    return ProjectParams(prompt, detection_params(extra, settings, "extra_params."),
                         cleanup_params(extra, settings.mask_min_area, settings.mask_smooth, "extra_params."),
                         everything_params(extra.get("everything"), everything_defaults(settings)))


def _context_regions(context: dict | None) -> list:
    return list((context or {}).get("result") or [])


def _region_name(region) -> str:
    """How a context region is named in messages: its id, else its control and type."""
    if not isinstance(region, dict):
        return f"{type(region).__name__} {region!r:.40}"
    return repr(region.get("id") or f"{region.get('from_name')}/{region.get('type')}")


def _percent(region, value: dict, key: str) -> float:
    """value[key] as a number within 0..100 (percent of the image), or InteractiveError naming the region."""
    try:
        number = float(value[key])
    except (KeyError, TypeError, ValueError):
        raise InteractiveError(f"context region {_region_name(region)} ({region.get('type')}) has no usable "
                               f"x/y/width/height") from None
    if not 0.0 <= number <= 100.0:
        raise InteractiveError(f"context region {_region_name(region)} ({region.get('type')}): {key}={number:g} "
                               "is outside the image (percent coordinates run from 0 to 100)")
    return number


def find_clicks(context: dict | None, config: LabelingConfig) -> ClickQuery | None:
    """The keypoints (of a KeyPointLabels) and the rectangle (of a smart RectangleLabels) in an interactive
    context, as one SAM prompt labeled with the tool's label; None when there are none (e.g. a text prompt).

    Raises InteractiveError for a keypoint or rectangle outside the image, a rectangle of no width or height, or
    one that carries no label."""
    keypoint_controls = {c.name for c in config.keypoints}
    smart_rectangles = {c.name for c in config.rectangles if c.smart}
    points, point_labels, box, label = [], [], None, None
    for region in _context_regions(context):
        if not isinstance(region, dict) or not isinstance(region.get("value"), dict):
            continue
        value, kind = region["value"], region.get("type")
        if kind == "keypointlabels" and region.get("from_name") in keypoint_controls:
            points.append((_percent(region, value, "x"), _percent(region, value, "y")))
            # Label Studio leaves is_positive out of some positive clicks.
            point_labels.append(0 if region.get("is_positive", True) in (False, 0, "false") else 1)
        elif kind == "rectanglelabels" and region.get("from_name") in smart_rectangles:
            x, y = _percent(region, value, "x"), _percent(region, value, "y")
            width, height = _percent(region, value, "width"), _percent(region, value, "height")
            if width <= 0 or height <= 0 or x + width > 100.0 + 1e-6 or y + height > 100.0 + 1e-6:
                raise InteractiveError(f"context region {_region_name(region)} (rectanglelabels): the rectangle "
                                       f"x={x:g} y={y:g} width={width:g} height={height:g} is empty or runs "
                                       "outside the image")
            box = (x, y, x + width, y + height)
        else:
            continue
        label = label or next(iter(value.get(kind) or []), None)
    if not points and box is None:
        return None
    if label is None:
        raise InteractiveError("the clicked keypoint or rectangle carries no label")
    return ClickQuery(tuple(points), tuple(point_labels), box, label)


def _text_of(region: dict) -> str | None:
    text = region["value"].get("text")
    if isinstance(text, list):
        text = "\n".join(str(t) for t in text)
    return text if isinstance(text, str) and text.strip() else None


def context_prompt(context: dict | None, config: LabelingConfig) -> str | None:
    """The text prompt an interactive context carries: the region of the config's TextArea first, then a region
    with value.text and no from_name (the "Add Text Prompt" batch action of Label Studio's dino-support branch)."""
    regions = [r for r in _context_regions(context) if isinstance(r, dict) and isinstance(r.get("value"), dict)]
    for region in regions:
        if config.prompt_name and region.get("from_name") == config.prompt_name and _text_of(region):
            return _text_of(region)
    for region in regions:
        if not region.get("from_name") and _text_of(region):
            return _text_of(region)
    return None


def find_prompt(context: dict | None, config: LabelingConfig, params: ProjectParams, settings: Settings) -> str | None:
    """Where the prompt comes from, first match wins: the context's (context_prompt); the project's
    extra_params.prompt; DEFAULT_PROMPT; the config's label names. None: no prompt (DEFAULT_PROMPT="")."""
    prompt = context_prompt(context, config)
    if prompt is not None:
        return prompt
    if params.prompt and params.prompt.strip():
        return params.prompt
    if settings.default_prompt is not None:
        return settings.default_prompt if settings.default_prompt.strip() else None
    return ". ".join(config.labels)


class GroundedSAM(LabelStudioMLBase):
    def __init__(self, project_id: str | None, label_config: str | None, *, store: JobStore,
                 loader: ModelLoader, images: ImageLoader, settings: Settings, jobs: JobRunner | None = None,
                 scheduler: Scheduler | None = None):
        """jobs: where Retrieve Predictions hands the tasks past PREDICT_TIME_BUDGET (None: they get [] as the
        only answer); scheduler: the worker's, which runs this request's model passes (scheduler.py)."""
        super().__init__(project_id, label_config, store)
        self.loader, self.images, self.settings, self.jobs = loader, images, settings, jobs
        self.scheduler = scheduler or Scheduler()
        self._started = time.perf_counter()  # one instance per request: PREDICT_TIME_BUDGET counts from here
        self.prompt: str | None = None  # the text prompt of the last query

    @property
    def model_version(self) -> str:
        return self.loader.model_version

    @cached_property
    def config(self) -> LabelingConfig:
        xml = self.label_config or self.get("label_config")
        if not xml:
            raise LabelConfigError("no labeling config: send 'label_config' or call /setup first")
        return parse_label_config(xml)

    @cached_property
    def params(self) -> ProjectParams:
        return project_params(self.extra_params, self.settings)

    def setup(self) -> None:
        config = self.config  # validates the labeling config (422 if unusable)
        self.params.detection.check_labels(config.labels, "extra_params.")  # and extra_params (400 if malformed)

    def query(self, context: dict | None) -> Query | None:
        """What to ask the pipeline: the context's smart-tool clicks and boxes (SAM alone), else a text prompt.
        None: no prompt anywhere (DEFAULT_PROMPT=""). Raises PromptError, InteractiveError."""
        config = self.config
        clicks = find_clicks(context, config)
        if clicks is not None:
            label = match_label(clicks.label, config.mask_labels)
            if label is None:
                raise InteractiveError(f"clicked label {clicks.label!r} has no BrushLabels or PolygonLabels label of "
                                       f"the same name (their labels: {', '.join(config.mask_labels) or 'none'})")
            return replace(clicks, label=label, cleanup=self.params.cleanup)
        regions = _context_regions(context)
        if regions and context_prompt(context, config) is None:
            # An interactive request with nothing usable must not silently become a text detection of the default.
            names = ", ".join(_region_name(r) for r in regions[:5])
            raise InteractiveError(
                f"the interactive context holds {len(regions)} region(s) ({names}) but none this service can use: "
                f"it expects a text prompt (a region of the TextArea {config.prompt_name!r} with value.text), or "
                "keypoints of a KeyPointLabels control and rectangles of a smart RectangleLabels control")
        prompt = self.prompt = find_prompt(context, config, self.params, self.settings)
        if prompt is None:
            return None
        plan = require_phrases(prompt, config.labels, config.predicted_values)
        for phrase, reason in plan.skipped:
            logger.warning("prompt phrase %r ignored: %s", phrase, reason)
        self.params.detection.check_labels(config.labels, "extra_params.")
        return TextQuery(plan.phrases, self.params.detection, self.params.cleanup, self.params.everything)

    def predict(self, tasks: list[dict], context: dict | None = None, caller: Caller | None = None,
                **kwargs) -> list[dict | list]:
        """One entry per task: its prediction (empty when its image can't be used), or [] (no prediction in this
        answer) for the tasks a bulk job of this project predicts, or that PREDICT_TIME_BUDGET leaves out.

        The request's model passes go through the scheduler as a click (smart tools), a prompt (a text prompt in
        the context) or a batch (no context: Retrieve Predictions, a task opened), with REQUEST_DEADLINE from when
        `caller`'s request arrived: scheduler.Busy when it can't be served by then."""
        query = self.query(context)  # bad input is refused before anything waits for the model
        if query is None:
            logger.info("no prompt and DEFAULT_PROMPT is empty: %d task(s) left without prediction", len(tasks))
            return [prediction([], self.model_version) for _ in tasks]
        kind = "click" if isinstance(query, ClickQuery) else "prompt" if context is not None else "batch"
        caller = caller or Caller(time.monotonic())
        caller.kind = kind
        deadline = caller.deadline(self.settings.request_deadline)
        with self.scheduler.ticket(kind, deadline, caller.connected, len(tasks)) as ticket:
            return self._predict(tasks, context, query, ticket)

    def _predict(self, tasks: list[dict], context: dict | None, query: Query, ticket) -> list[dict | list]:
        # Retrieve Predictions or a task opened: tasks past the budget may go to a background job.
        batch = context is None and self.jobs is not None and self.settings.background_predictions
        claimed = self.store.claimed(self.project_id, _task_ids(tasks)) if batch else set()
        if claimed:
            logger.info("%d task(s) are queued in a bulk job already: no prediction for them in this answer",
                        len(claimed))
        deadline = time.monotonic() + budget - (time.perf_counter() - self._started) if (
            budget := self.settings.predict_time_budget) else None
        pipeline = Pipeline(self.loader.get(), self.settings, self.images, self.model_version, ticket, deadline)
        pipeline.check(query)
        hostname, token = self.get("hostname"), self.get("access_token")  # /setup's, read once a request
        results: dict[int, dict | list] = {}  # by the task's index; [] for the tasks left out
        todo = [i for i, task in enumerate(tasks) if task.get("id") not in claimed]
        budget, loop_started, done = self.settings.predict_time_budget, time.perf_counter(), 0
        while done < len(todo):
            # Under a budget, the first batch is one task (to learn the time per task), and each next one is as
            # many as fit in what is left of the budget at the mean time per task so far (at most BATCH_SIZE).
            # When not even one task fits, the others get []: Label Studio stores nothing for them, rather than
            # losing every task's prediction when its ML_TIMEOUT_PREDICT cuts the answer off. A bulk job then
            # predicts and imports them. So do the tasks of a later batch dropped at its deadline (scheduler).
            now, size = time.perf_counter(), pipeline.batch_size
            if budget:
                left = budget - (now - self._started)
                size = min(size, int(left / max((now - loop_started) / done, 1e-9))) if done else 1
            chunk, outcomes = todo[done : done + size], None
            why = f"the next would end past PREDICT_TIME_BUDGET={budget:g} s"
            if size >= 1:
                try:
                    outcomes = pipeline.predict_tasks([tasks[i] for i in chunk], self.config, query, hostname, token)
                except Dropped as e:  # a later chunk: what is predicted is answered (a 503 would lose it)
                    if not done:
                        raise
                    why = str(e)
            if outcomes is None:
                rest = [tasks[i] for i in todo[done:]]
                handed = batch and self._hand_off(rest, query)
                logger.warning("%d of %d task(s) predicted in %.1f s; %s, so the other %d get no prediction in this "
                               "answer (%s)", done, len(tasks), time.perf_counter() - self._started, why, len(rest),
                               f"bulk job {handed} predicts and imports them" if handed
                               else "Retrieve Predictions again continues with them")
                break
            for i, outcome in zip(chunk, outcomes, strict=True):
                if outcome.failure is not None:
                    logger.warning("task %s: no prediction (%s): %s", outcome.task_id, outcome.failure.kind,
                                   outcome.failure.reason)
                    results[i] = prediction([], self.model_version)
                else:
                    results[i] = outcome.prediction
            done += len(chunk)
        return [results.get(i, []) for i in range(len(tasks))]

    def _hand_off(self, tasks: list[dict], query: Query) -> str | None:
        """Queue the tasks as a bulk job of this project (predicted and imported in the background); the job id,
        or None when there is no Label Studio key to import with (the reason is logged)."""
        if not isinstance(query, TextQuery) or not tasks or not self.project_id.isdigit():
            return None
        connection = self.images.label_studio.connection(self.get("hostname"), self.get("access_token"))
        if not connection.url or not connection.key:
            logger.warning("no Label Studio URL and key (LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY, or what /setup "
                           "sent): the tasks past PREDICT_TIME_BUDGET are not handed to a bulk job")
            return None
        ids = _task_ids(tasks)
        params = JobParams(int(self.project_id), self.prompt or "", query.params, Selection(task_ids=tuple(ids)),
                           model_version=self.model_version, label_config=self.label_config or self.get("label_config"),
                           cleanup=query.cleanup, everything=query.everything, **job_chunking(self.settings),
                           label_studio_url=connection.url)
        return self.jobs.submit(params, connection, queued=ids, tasks=tasks)


def _task_ids(tasks: list[dict]) -> list[int]:
    return [t["id"] for t in tasks if isinstance(t.get("id"), int) and not isinstance(t.get("id"), bool)]
