"""The prediction pipeline: an image and a query -> detections -> Label Studio regions.

    query (text phrases with thresholds, or one interactive SAM prompt)
      image  (H, W, 3) uint8 RGB, displayed orientation   <- Pipeline.load_image (task URL, cached)
      boxes  dino.GroundingDino.detect                    -> Detections (xyxy image pixels, scores, labels)
      masks  sam_wrapper.Segmenter (SAM 2.1: sam2_segmenter) -> Detections.masks (N, H, W) bool
             (or everything.segment_everything for a `*` phrase: SAM's automatic masks)
      clean  masks.clean_mask, each mask as it is read    -> holes filled, islands dropped, smoothed
      JSON   regions.build_regions                        -> RectangleLabels / BrushLabels / PolygonLabels

`Pipeline.detect` does one image (array + identity -> Detections); `Pipeline.predict_task` does one Label Studio
task (task dict + labeling config + query -> a `TaskOutcome`: the prediction, or a failure with its kind and
reason). Nothing here knows about HTTP or Flask: the service (model.py), the command line (cli.py) and the bulk
job call it alike. Errors a caller can act on are errors.py's; a task's own failures are outcomes, not errors, so
one bad task never costs the others theirs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from cache import image_digest
from config import Settings
from detections import Detections
from errors import InteractiveError, ParamsError, PromptError
from everything import EverythingParams, segment_everything
from images import ImageError, ImageLoader
from labeling import LabelingConfig
from loader import Models
from masks import CleanupParams, ConcatMasks, clean_mask, cleaned, mask_box
from prompts import EVERYTHING, Phrase
from regions import build_regions, prediction
from scheduler import UNSCHEDULED, Ticket, Unscheduled

logger = logging.getLogger(__name__)


GATES = ("box_threshold", "text_threshold", "sam3_score_threshold")  # what `label_thresholds` may override
DETECTION_KEYS = (*GATES, "max_detections", "label_thresholds")  # what detection_params reads


@dataclass(frozen=True)
class DetectionParams:
    """The detector's gates, from the environment or a project's extra params: Grounding DINO's two thresholds,
    or SAM 3's score threshold (ENGINE=sam3), and the cap on detections either keeps. label_thresholds: label ->
    {gate: value} for the labels whose detections are gated otherwise (a rare, small class wants a lower box
    threshold than a large, common one)."""

    box_threshold: float
    text_threshold: float
    max_detections: int
    sam3_score_threshold: float = 0.5
    label_thresholds: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def gate(self, name: str, label: str) -> float:
        """The gate `name` (one of GATES) for detections labeled `label`."""
        return self.label_thresholds.get(label, {}).get(name, getattr(self, name))

    def check_labels(self, labels: Sequence[str], prefix: str = "", source: str = "the labeling config") -> None:
        """ParamsError naming the labels of `label_thresholds` that are not among `labels` (`source`'s)."""
        unknown = [label for label in self.label_thresholds if label not in labels]
        if unknown:
            raise ParamsError(f"{prefix}label_thresholds names label(s) {source} lacks: "
                              f"{', '.join(map(repr, unknown))}; its labels: {', '.join(labels) or 'none'}")


def detection_values(*layers: Mapping) -> dict:
    """The DETECTION_KEYS of each mapping, each layer's over those before it (a project's extra params, then a
    request's)."""
    return {k: v for layer in layers for k, v in layer.items() if k in DETECTION_KEYS}


def detection_params(values: Mapping, settings: Settings, prefix: str = "") -> DetectionParams:
    """DetectionParams from `values` ({"box_threshold", "text_threshold", "max_detections",
    "sam3_score_threshold", "label_thresholds": {label: {gate: value}}}, each optional) over the settings'
    defaults; ParamsError names the key (after `prefix`) and the range."""

    def number(values, key, default, kind, lo, hi, prefix=prefix):
        value = values.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
            raise ParamsError(f"{prefix}{key} must be a number between {lo} and {hi}, got {value!r}")
        if kind is int and value != int(value):
            raise ParamsError(f"{prefix}{key} must be a whole number, got {value!r}")
        return kind(value)

    per_label = values.get("label_thresholds") or {}
    if not isinstance(per_label, Mapping):
        raise ParamsError(f"{prefix}label_thresholds must be an object of label -> {{gate: value}}, "
                          f"got {type(per_label).__name__}")
    label_thresholds = {}
    for label, gates in per_label.items():
        where = f"{prefix}label_thresholds.{label}."
        if not isinstance(gates, Mapping) or not gates or set(gates) - set(GATES):
            raise ParamsError(f"{where[:-1]} must be an object of one or more of {', '.join(GATES)}, got {gates!r}")
        label_thresholds[label] = {name: number(gates, name, None, float, 0.0, 1.0, where) for name in gates}
    return DetectionParams(
        box_threshold=number(values, "box_threshold", settings.box_threshold, float, 0.0, 1.0),
        text_threshold=number(values, "text_threshold", settings.text_threshold, float, 0.0, 1.0),
        max_detections=number(values, "max_detections", settings.max_detections, int, 1, 900),
        sam3_score_threshold=number(values, "sam3_score_threshold", settings.sam3_score_threshold, float, 0.0, 1.0),
        label_thresholds=label_thresholds,
    )


def cleanup_defaults(settings: Settings) -> CleanupParams:
    """The mask clean-up of the environment: MASK_MIN_AREA, MASK_SMOOTH."""
    return CleanupParams(settings.mask_min_area, settings.mask_smooth)


def everything_defaults(settings: Settings) -> EverythingParams:
    """Segment everything's parameters from the environment (EVERYTHING_*), SamAutomaticMaskGenerator's for
    the rest."""
    return EverythingParams(
        points_per_side=settings.everything_points_per_side, points_per_batch=settings.everything_points_per_batch,
        pred_iou_thresh=settings.everything_pred_iou_thresh,
        stability_score_thresh=settings.everything_stability_score_thresh,
        box_nms_thresh=settings.everything_box_nms_thresh, crop_n_layers=settings.everything_crop_n_layers)


@dataclass(frozen=True)
class TextQuery:
    """Detect each phrase; its regions carry the phrase's label. A phrase of text prompts.EVERYTHING ("*") asks
    for SAM's automatic masks: all labeled with its label, or (label "") each with the label of the detected box
    of the other phrases it overlaps most. cleanup, everything: the project's (None: the environment's)."""

    phrases: tuple[Phrase, ...]
    params: DetectionParams
    cleanup: CleanupParams | None = None
    everything: EverythingParams | None = None


@dataclass(frozen=True)
class ClickQuery:
    """One interactive SAM prompt from Label Studio's smart tools; coordinates in percent of the image."""

    points: tuple[tuple[float, float], ...]  # (x, y) of each click
    point_labels: tuple[int, ...]  # 1 = positive click, 0 = negative (Alt-click)
    box: tuple[float, float, float, float] | None  # x0, y0, x1, y1 of a smart rectangle
    label: str  # the label the mask carries: a brush or polygon label of the config
    cleanup: CleanupParams | None = None  # the project's mask clean-up (None: the environment's)


Query = TextQuery | ClickQuery


@dataclass(frozen=True)
class TaskFailure:
    """Why one task got no prediction. kind: 'no_image_url', or an ImageError kind ('unreachable', 'denied',
    'refused', 'too_large', 'undecodable', 'unsupported')."""

    kind: str
    reason: str


@dataclass(frozen=True)
class TaskOutcome:
    """What became of one task: exactly one of `prediction` ({"result", "score", "model_version"}) and `failure`."""

    task_id: object
    prediction: dict | None = None
    failure: TaskFailure | None = None
    seconds: float = 0.0


class Pipeline:
    """Runs queries on images with one set of loaded models. Cheap to build; holds no per-request state, so one
    instance may serve every thread (the models serialise themselves)."""

    def __init__(self, models: Models, settings: Settings, images: ImageLoader, model_version: str | None = None,
                 ticket: Ticket | Unscheduled = UNSCHEDULED, deadline: float | None = None):
        """ticket: the request's place in the worker's scheduler (scheduler.py): each model pass runs in
        `ticket.model_pass()`. deadline: a time.monotonic() past which segment everything starts no further batch
        of points."""
        self.models, self.settings, self.images = models, settings, images
        self.model_version = model_version or settings.model_version
        self.ticket = ticket
        self.deadline = deadline

    def load_image(self, url: str, hostname: str | None = None, access_token: str | None = None,
                   task_id: int | None = None) -> tuple[np.ndarray, str]:
        """A task image (H, W, 3) uint8 RGB and its pixel digest, downloaded and decoded once per
        IMAGE_CACHE_SECONDS (a series of clicks fetches it once), kept under its stored URI (never a presigned
        URL). hostname, access_token: what /setup sent; task_id: the task's (a cloud storage URI needs it).
        Raises ImageError."""

        def fetch():
            image = self.images.load(url, hostname=hostname, access_token=access_token, task_id=task_id)
            return image, image_digest(image)

        key = ("image", self.images.cache_key(url, hostname, access_token), hostname)
        return self.models.cache.get(key, fetch, max_age=self.settings.image_cache_seconds)

    def detect(self, image: np.ndarray, image_id: str, query: Query, wants_masks: bool = True) -> Detections:
        """One image: (H, W, 3) uint8 RGB and its identity (cache.image_digest) -> Detections in its pixels.

        A text query runs the detector: Grounding DINO, then (when `wants_masks` and a segmenter is loaded) SAM on
        every box in one decoder call; or SAM 3 (ENGINE=sam3), whose detections come with their masks, so the
        segmenter is not asked. A click query runs the segmenter alone, its box being the mask's bounding box. A
        `*` phrase adds SAM's automatic masks (TextQuery). Every mask is cleaned (masks.clean_mask) as it is
        read; without `wants_masks`, detections carry none."""
        if isinstance(query, ClickQuery):
            return self._clicked(image, image_id, query)
        p = query.params
        star = next((ph for ph in query.phrases if ph.text == EVERYTHING), None)
        phrases = tuple(ph for ph in query.phrases if ph.text != EVERYTHING)
        segmenter = self.models.segmenter if wants_masks else None
        detections = Detections.empty()
        if phrases:
            with self.ticket.model_pass("detector"):
                detections = self.find(image, image_id, phrases, p)
            if not wants_masks:
                detections = detections.with_masks(None)
        if star is None or segmenter is None:
            if len(detections) and (detections.masks is not None or segmenter is not None):
                masks = self._box_masks(image, image_id, detections, segmenter)
                detections = detections.with_masks(cleaned(masks, self._cleanup(query)))
            return detections
        found = segment_everything(segmenter, image, query.everything or everything_defaults(self.settings),
                                   image_id, lambda: self.ticket.model_pass("segmenter"), self.deadline)
        if star.label:  # `*_label`: every mask; the other phrases' boxes get their own masks as usual
            everything = Detections(found.boxes, found.predicted_iou, [star.label] * len(found.boxes), found.masks,
                                    box_from_mask=np.ones(len(found.boxes), bool))
            if len(detections):
                masks = ConcatMasks([self._box_masks(image, image_id, detections, segmenter), found.masks])
                everything = Detections(np.concatenate([detections.xyxy, found.boxes]),
                                        np.concatenate([detections.scores, found.predicted_iou]),
                                        detections.labels + everything.labels, masks,
                                        np.concatenate([detections.box_from_mask, everything.box_from_mask]))
        else:  # bare `*`: each mask takes the label of the box it overlaps most; the boxes themselves only label
            labels, keep = self._box_labels(found.boxes, detections)
            everything = Detections(found.boxes[keep], found.predicted_iou[keep], labels,
                                    found.masks.select(keep), box_from_mask=np.ones(len(keep), bool))
        return everything.with_masks(cleaned(everything.masks, self._cleanup(query)))

    def find(self, image: np.ndarray, image_id: str, phrases: tuple[Phrase, ...], p: DetectionParams) -> Detections:
        """The detector's detections of the phrases: through Grounding DINO's two thresholds, or SAM 3's one, each
        phrase's those of its label. Masks: SAM 3's, or none. With the image's outputs cached (`image_id`), new
        thresholds cost no model pass."""
        names = ("sam3_score_threshold",) if self.models.engine == "sam3" else ("box_threshold", "text_threshold")
        gates = [[p.gate(name, ph.label) for ph in phrases] for name in names]
        return self.models.detector.detect(image, phrases, *gates, p.max_detections, self.settings.nms_iou,
                                           image_id=image_id)

    def _box_masks(self, image: np.ndarray, image_id: str, detections: Detections, segmenter) -> np.ndarray:
        """The detections' masks (N, H, W) bool: the detector's own (SAM 3), else the segmenter's for their boxes."""
        if detections.masks is not None:
            return detections.masks
        with self.ticket.model_pass("segmenter"):
            masks, _ = segmenter.segment_boxes(image, detections.xyxy, image_id=image_id)
        return masks

    def _box_labels(self, boxes: np.ndarray, detections: Detections) -> tuple[list[str], np.ndarray]:
        """Each of `boxes` (N, 4) xyxy image pixels -> the label of the detection whose box it overlaps most,
        by box IoU, when that is at least EVERYTHING_MIN_OVERLAP. Returns (labels, kept indices (K,))."""
        if not len(boxes) or not len(detections):
            return [], np.zeros(0, np.int64)
        a, b = boxes[:, None, :], detections.xyxy[None, :, :]
        inter = (np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
                 * np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None))
        area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
        iou = inter / np.maximum(area(a) + area(b) - inter, 1e-9)
        best = iou.argmax(axis=1)
        keep = np.flatnonzero(iou[np.arange(len(boxes)), best] >= self.settings.everything_min_overlap)
        return [detections.labels[best[i]] for i in keep], keep

    def _cleanup(self, query: Query) -> CleanupParams:
        return query.cleanup or cleanup_defaults(self.settings)

    def _clicked(self, image: np.ndarray, image_id: str, query: ClickQuery) -> Detections:
        height, width = image.shape[:2]
        scale = np.array([width, height], np.float64) / 100.0
        points = np.array(query.points, np.float64).reshape(-1, 2) * scale
        box = None if query.box is None else np.array(query.box, np.float64) * np.tile(scale, 2)
        with self.ticket.model_pass("segmenter"):
            mask, score = self.models.segmenter.segment_prompt(image, points, np.array(query.point_labels, np.int64),
                                                               box, image_id=image_id)
        mask = clean_mask(mask, self._cleanup(query))  # the box follows the cleaned mask
        return Detections(np.array([mask_box(mask)], np.float32), [score], [query.label], mask[None])

    def regions(self, detections: Detections, config: LabelingConfig, query: Query, width: int, height: int
                ) -> list[dict]:
        """Label Studio result regions for an image of `width` x `height` pixels. A click answer is only the
        mask (brush and/or polygon): the click already is the user's region."""
        if isinstance(query, ClickQuery):
            config = replace(config, rectangles=())
        return build_regions(detections, config, width, height, self.settings.polygon_tolerance)

    def predict_image(self, image: np.ndarray, image_id: str, config: LabelingConfig, query: Query) -> dict:
        """One image -> one Label Studio prediction ({"result", "score", "model_version"})."""
        detections = self.detect(image, image_id, query, wants_masks=config.wants_masks)
        height, width = image.shape[:2]
        return prediction(self.regions(detections, config, query, width, height), self.model_version)

    def check(self, query: Query) -> None:
        """Raise InteractiveError when the loaded models can't answer `query` (clicks need a segmenter)."""
        if isinstance(query, ClickQuery) and self.models.segmenter is None:
            raise InteractiveError("clicks need a segmenter: set USE_MOBILE_SAM=true or USE_SAM=true")
        if (isinstance(query, TextQuery) and self.models.segmenter is None
                and any(p.text == EVERYTHING for p in query.phrases)):
            raise PromptError("'*' (segment everything) needs a segmenter: set USE_MOBILE_SAM=true or USE_SAM=true")

    def predict_task(self, task: dict, config: LabelingConfig, query: Query, hostname: str | None = None,
                     access_token: str | None = None) -> TaskOutcome:
        """One Label Studio task (its JSON as Label Studio sends it) -> its outcome. A task whose data has no image
        URL, or whose image can't be fetched or decoded, is a failure outcome; nothing else is caught."""
        return self.predict_tasks([task], config, query, hostname, access_token)[0]

    def predict_tasks(self, tasks: Sequence[dict], config: LabelingConfig, query: Query, hostname: str | None = None,
                      access_token: str | None = None) -> list[TaskOutcome]:
        """Several tasks -> their outcomes, in order, each what `predict_task` gives it alone: the images are
        fetched in parallel, then encoded BATCH_SIZE at a time (`encode`). A task's seconds: its share of the
        fetching and encoding, plus its own passes and host work."""
        return self.start_tasks(tasks, config, query, hostname, access_token)()

    def start_tasks(self, tasks: Sequence[dict], config: LabelingConfig, query: Query, hostname: str | None = None,
                    access_token: str | None = None) -> Callable[[], list[TaskOutcome]]:
        """`predict_tasks` in two parts: the model passes now (images fetched and encoded, each image's detections
        with their low-resolution masks), and returned, the host work left (masks upscaled as they are read,
        cleaned, turned into regions) as a function that builds the outcomes: call it once, on any thread, so that
        a bulk job builds one batch's predictions while the next batch's passes run (jobs.in_batches). It waits
        for more urgent requests (`ticket.defer`) before each task's host work."""
        started = time.perf_counter()
        self.check(query)
        if len(tasks) > 1:
            with ThreadPoolExecutor(min(len(tasks), 8), thread_name_prefix="fetch") as pool:
                loaded = list(pool.map(lambda t: self._load_task(t, config, hostname, access_token), tasks))
        else:
            loaded = [self._load_task(task, config, hostname, access_token) for task in tasks]
        self.encode([item for item in loaded if not isinstance(item, TaskFailure)], query, config.wants_masks)
        share = (time.perf_counter() - started) / max(len(tasks), 1)
        found = []  # per task: its failure, or the image's (height, width), detections and seconds so far
        for item in loaded:
            if isinstance(item, TaskFailure):
                found.append(item)
                continue
            own = time.perf_counter()
            image, image_id = item
            detections = self.detect(image, image_id, query, wants_masks=config.wants_masks)
            found.append((image.shape[:2], detections, share + time.perf_counter() - own))
        del loaded  # the images: the host work needs only their size

        def finish() -> list[TaskOutcome]:
            outcomes = []
            for task, item in zip(tasks, found, strict=True):
                task_id = task.get("id")
                if isinstance(item, TaskFailure):
                    outcomes.append(TaskOutcome(task_id, failure=item, seconds=share))
                    continue
                (height, width), detections, seconds = item
                self.ticket.defer()
                own = time.perf_counter()
                result = prediction(self.regions(detections, config, query, width, height), self.model_version)
                seconds += time.perf_counter() - own
                logger.info("task %s: %dx%d image, %d region(s) in %.2f s", task_id, width, height,
                            len(result["result"]), seconds)
                outcomes.append(TaskOutcome(task_id, prediction=result, seconds=seconds))
            return outcomes

        return finish

    def _load_task(self, task: dict, config: LabelingConfig, hostname: str | None, access_token: str | None
                   ) -> tuple[np.ndarray, str] | TaskFailure:
        url = config.image_url(task.get("data"))
        if url is None:
            return TaskFailure("no_image_url", f"task data has no image URL under {config.image_key!r}")
        task_id = task.get("id")
        try:
            return self.load_image(url, hostname, access_token, task_id if isinstance(task_id, int) else None)
        except ImageError as e:
            return TaskFailure(e.kind, str(e))

    @property
    def batch_size(self) -> int:
        """Images per encoder pass: BATCH_SIZE, or fewer when the cache can't hold that many images' state (each
        takes up to 4 entries: the image, Grounding DINO's features and outputs, the SAM embedding)."""
        return max(1, min(self.settings.batch_size, self.models.cache.max_entries // 4))

    def encode(self, images: Sequence[tuple[np.ndarray, str]], query: Query, wants_masks: bool = True) -> None:
        """Run the model passes that `detect` would run image by image, `batch_size` images at a time: Grounding
        DINO for the prompt, then SAM's image encoder on the images with a detection (all of them, for a `*`
        phrase). Their results wait in the shared cache, where `detect` finds them.

        images: (image (H, W, 3) uint8 RGB, its cache.image_digest) pairs. Click queries are left to `detect`."""
        if not isinstance(query, TextQuery) or len(images) < 2 or self.batch_size < 2:
            return
        phrases = tuple(ph for ph in query.phrases if ph.text != EVERYTHING)
        star = len(phrases) < len(query.phrases)
        segmenter = self.models.segmenter if wants_masks else None
        dino = self.models.engine == "grounded_sam"  # SAM 3 encodes image by image, with its masks
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            if phrases and dino:
                with self.ticket.model_pass("detector"):
                    self.models.detector.encode_batch([image for image, _ in chunk], [i for _, i in chunk], phrases)
            if segmenter is None:
                continue
            wanted = [(image, i) for image, i in chunk
                      if star or (dino and len(self.find(image, i, phrases, query.params)))]
            if len(wanted) > 1:
                with self.ticket.model_pass("segmenter"):
                    segmenter.embed_batch([image for image, _ in wanted], [i for _, i in wanted])
