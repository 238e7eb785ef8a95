"""How good the pre-annotations are on a project's own annotated tasks, and each label's best thresholds.

    truth       a task's latest annotation that was not cancelled: its RectangleLabels, BrushLabels and
                PolygonLabels regions (other tools are ignored and counted).
    predicted   what the service would send Label Studio (Pipeline.predict_image, then read back as regions), or
                the predictions a model version already stored.
    figures     per label and overall, by pycocotools (COCO's matching, not ours): AP and AP50 for boxes and for
                masks; precision, recall and F1 at IoU 0.5 for the thresholds in force; the mean IoU of matched
                masks; counts.
    sweep       each task's detector outputs are kept in the pipeline's cache once, and every threshold pair of a
                grid re-filters them (no model pass): per label, the pair with the best box F1, or the best recall
                at `target_precision`.

Frames: Label Studio regions are in percent of the image; here boxes are COCO's [x, y, width, height] in image
pixels and masks pycocotools' RLE of the (H, W) image.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import html
import io
import logging
import queue
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from label_studio_sdk.converter.brush import decode_rle
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from config import Settings
from errors import NotFound, ParamsError, ServiceError
from jobs import JobService, project_id, selection_of
from labeling import LabelingConfig, parse_label_config
from ls_client import LabelStudioProject, Selection
from pipeline import Pipeline, TextQuery, detection_params, detection_values
from prompts import require_phrases
from regions import percent_to_box

logger = logging.getLogger(__name__)

MATCH_IOU = 0.5  # precision, recall, F1 and the sweep: a prediction matches an annotated region at this IoU
GROUNDING_DINO_GRID = {"box_threshold": np.round(np.arange(0.1, 0.81, 0.05), 2).tolist(),
                       "text_threshold": np.round(np.arange(0.1, 0.61, 0.05), 2).tolist()}
SAM3_GRID = {"sam3_score_threshold": np.round(np.arange(0.1, 0.91, 0.05), 2).tolist()}


@dataclass(frozen=True)
class Region:
    """One region of one image: label, box [x, y, w, h] pixels, mask (pycocotools RLE; None: a rectangle), score,
    and the tool it came from: "rectangle", "brush" or "polygon"."""

    label: str
    box: tuple[float, float, float, float]
    mask: dict | None = None
    score: float = 1.0
    tool: str = "rectangle"


@dataclass
class Sample:
    """One evaluated task: its image size, annotated and predicted regions (boxes, masks: see `split`), and for
    the sweep its detector's boxes at each threshold pair (gates tuple -> regions)."""

    task_id: int
    width: int
    height: int
    truth: list[Region]
    predicted: list[Region]
    sweep: dict[tuple[float, ...], list[Region]] = field(default_factory=dict)


def _mask_region(label: str, rle: dict, score: float, tool: str) -> Region:
    return Region(label, tuple(float(v) for v in mask_utils.toBbox(rle)), rle, score, tool)


def polygon_rle(points: Sequence[Sequence[float]], width: int, height: int) -> dict:
    """Label Studio polygon points ([[x, y], ...] in percent of the image) -> the pycocotools RLE of the (H, W)
    mask: the vertices rounded to whole pixels as Label Studio's COCO export writes them (the SDK's converter),
    rasterised as COCO rasterises a polygon segmentation, so figures here equal COCOeval's on that export."""
    flat = [round(float(v) * scale) for x, y in points for v, scale in ((x, width / 100.0), (y, height / 100.0))]
    if len(flat) < 6:
        return mask_utils.encode(np.zeros((height, width), np.uint8, order="F"))
    return mask_utils.merge(mask_utils.frPyObjects([flat], height, width))


def regions_of(results: Iterable[dict], config: LabelingConfig) -> tuple[list[Region], Counter]:
    """Label Studio result items (an annotation's or a prediction's) -> the regions of the tools we predict, and
    a count of the items left out by type ("textarea" for the prompt, "keypointlabels", ...)."""
    regions, ignored = [], Counter()
    for item in results:
        kind, value = item.get("type"), item.get("value") or {}
        width, height = item.get("original_width"), item.get("original_height")
        labels = value.get(kind) if isinstance(kind, str) else None
        if kind not in ("rectanglelabels", "brushlabels", "polygonlabels") or not labels or not width or not height:
            ignored[kind or "unknown"] += 1
            continue
        score = float(item.get("score", 1.0))
        if kind == "rectanglelabels":
            x0, y0, x1, y1 = percent_to_box(value, width, height).tolist()
            regions.append(Region(labels[0], (x0, y0, x1 - x0, y1 - y0), None, score))
        elif kind == "brushlabels":
            if value.get("format", "rle") != "rle" or not value.get("rle"):
                ignored[kind] += 1
                continue
            pixels = np.frombuffer(bytes(decode_rle(value["rle"])), np.uint8).reshape(height, width, 4)
            rle = mask_utils.encode(np.asfortranarray((pixels[..., 3] > 0).astype(np.uint8)))
            regions.append(_mask_region(labels[0], rle, score, "brush"))
        else:
            regions.append(_mask_region(labels[0], polygon_rle(value.get("points") or [], width, height), score,
                                        "polygon"))
    return regions, ignored


def latest_annotation(task: dict) -> dict | None:
    """A task's ground truth: its most recently updated annotation that was not cancelled (skipped), or None."""
    done = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    return max(done, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0),
               default=None)


def split(regions: list[Region], config: LabelingConfig, truth: bool) -> tuple[list[Region], list[Region]]:
    """(boxes, masks) to score. Boxes: the rectangles when the config has RectangleLabels, else the masks' bounding
    boxes. Masks: an annotation's brushes and polygons alike (an annotator draws each object with one tool); a
    prediction's brushes, or its polygons when the config has no BrushLabels (each detection is in both)."""
    rectangles = [r for r in regions if r.tool == "rectangle"]
    masks = [r for r in regions if r.tool != "rectangle"]
    if not truth and config.brushes and config.polygons:
        masks = [r for r in masks if r.tool == "brush"]
    boxes = rectangles if config.rectangles else [replace(r, mask=None, tool="rectangle") for r in masks]
    return boxes, masks


# ---------------------------------------------------------------------------------------------------- COCO


def _coco_eval(images: list[tuple[int, int, int]], truth: dict[int, list[Region]], found: dict[int, list[Region]],
               labels: Sequence[str], iou_type: str, iou: float | None = None):
    """pycocotools' COCOeval over the images [(id, width, height)] and their regions by image id, evaluated
    (and accumulated unless `iou` is given: then one IoU threshold, for the matches alone)."""
    def annotation(i: int, image_id: int, region: Region, score: bool) -> dict:
        entry = {"id": i, "image_id": image_id, "category_id": labels.index(region.label) + 1,
                 "bbox": list(region.box), "iscrowd": 0, "area": float(region.box[2] * region.box[3])}
        if iou_type == "segm":
            entry.update(segmentation=region.mask, area=float(mask_utils.area(region.mask)))
        if score:
            entry["score"] = region.score
        return entry

    gt = COCO()
    gt.dataset = {"images": [{"id": i, "width": w, "height": h} for i, w, h in images],
                  "categories": [{"id": k + 1, "name": label} for k, label in enumerate(labels)],
                  "annotations": [annotation(n, i, r, False) for n, (i, r) in enumerate(
                      ((i, r) for i, regions in truth.items() for r in regions if r.label in labels), 1)]}
    gt.createIndex()
    dt = COCO()
    dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"],
                  "annotations": [annotation(n, i, r, True) for n, (i, r) in enumerate(
                      ((i, r) for i, regions in found.items() for r in regions if r.label in labels), 1)]}
    dt.createIndex()
    ev = COCOeval(gt, dt, iou_type)
    ev.params.imgIds = [i for i, _, _ in images]
    if iou is not None:
        ev.params.iouThrs, ev.params.areaRng, ev.params.areaRngLbl = np.array([iou]), [[0, 1e10]], ["all"]
        ev.params.maxDets = [1000]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it works: not on our stdout
        ev.evaluate()
        if iou is None:
            ev.accumulate()
    return ev


def average_precision(ev, label_index: int | None = None) -> tuple[float | None, float | None]:
    """COCO AP (IoU 0.50:0.95) and AP50, all areas, 100 detections per image, of one category (index into the
    labels) or their mean over categories; None where no annotated region exists (COCO's -1)."""
    precision = ev.eval["precision"]  # (iou, recall, category, area, max detections)
    cut = precision[:, :, :, 0, -1] if label_index is None else precision[:, :, label_index : label_index + 1, 0, -1]

    def mean(values):
        values = values[values > -1]
        return float(values.mean()) if values.size else None

    return mean(cut), mean(cut[0])


def match_counts(ev, labels: Sequence[str]) -> dict[str, dict]:
    """Per label from a single-IoU COCOeval: matched (true positives), predicted, annotated, and the matched
    pairs' (annotation id, prediction id)."""
    counts = {label: {"matched": 0, "predicted": 0, "annotated": 0, "pairs": []} for label in labels}
    for entry in ev.evalImgs:
        if entry is None:
            continue
        c = counts[labels[entry["category_id"] - 1]]
        matches = entry["dtMatches"][0]
        c["predicted"] += len(matches)
        c["matched"] += int((matches > 0).sum())
        c["annotated"] += len(entry["gtIds"])
        c["pairs"] += [(int(g), int(d)) for d, g in zip(entry["dtIds"], matches, strict=True) if g > 0]
    return counts


def prf(matched: int, predicted: int, annotated: int) -> dict:
    precision = matched / predicted if predicted else None
    recall = matched / annotated if annotated else None
    f1 = 2 * matched / (predicted + annotated) if predicted + annotated else None
    return {"precision": precision, "recall": recall, "f1": f1}


# ---------------------------------------------------------------------------------------------------- the report


def evaluate(samples: list[Sample], config: LabelingConfig, labels: Sequence[str]) -> dict:
    """The figures of the samples, per label (the config's, in its order) and overall: {"boxes": ..., "masks":
    ... (None for a config without brushes or polygons)}, each {"overall": {...}, "labels": {label: {...}}}."""
    images = [(s.task_id, s.width, s.height) for s in samples]
    report = {"tasks": len(samples), "labels": list(labels)}
    kinds = [("boxes", "bbox", 0)] + ([("masks", "segm", 1)] if config.wants_masks else [])
    for name, iou_type, part in kinds:
        truth = {s.task_id: split(s.truth, config, True)[part] for s in samples}
        found = {s.task_id: split(s.predicted, config, False)[part] for s in samples}
        ap_eval = _coco_eval(images, truth, found, labels, iou_type)
        match_eval = _coco_eval(images, truth, found, labels, iou_type, MATCH_IOU)
        counts = match_counts(match_eval, labels)
        by_label = {}
        for k, label in enumerate(labels):
            c = counts[label]
            entry = {"ap": None, "ap50": None, **prf(c["matched"], c["predicted"], c["annotated"]),
                     **{n: c[n] for n in ("annotated", "predicted", "matched")}}
            entry["ap"], entry["ap50"] = average_precision(ap_eval, k)
            if iou_type == "segm" and c["pairs"]:
                ious = [mask_utils.iou([match_eval.cocoDt.anns[d]["segmentation"]],
                                       [match_eval.cocoGt.anns[g]["segmentation"]], [0])[0][0] for g, d in c["pairs"]]
                entry["mean_iou"] = float(np.mean(ious))
            by_label[label] = entry
        total = {n: sum(counts[label][n] for label in labels) for n in ("annotated", "predicted", "matched")}
        ap, ap50 = average_precision(ap_eval)
        overall = {"ap": ap, "ap50": ap50, **prf(total["matched"], total["predicted"], total["annotated"]), **total}
        if iou_type == "segm":
            means = [(e["mean_iou"], e["matched"]) for e in by_label.values() if "mean_iou" in e]
            overall["mean_iou"] = (sum(m * n for m, n in means) / sum(n for _, n in means)) if means else None
        report[name] = {"overall": overall, "labels": by_label}
    return report


def choose_thresholds(samples: list[Sample], config: LabelingConfig, labels: Sequence[str], gates: Sequence[str],
                      target_precision: float | None = None) -> dict:
    """Per label, the grid point (one value per gate) with the best box F1 at IoU 0.5, or with `target_precision`
    the best recall among the points that reach it. {"gates", "labels": {label: {"chosen": {gate: value} | None,
    "precision", "recall", "f1", "curve": [[*values, precision, recall, f1], ...]}}}."""
    points = sorted({point for s in samples for point in s.sweep})
    images = [(s.task_id, s.width, s.height) for s in samples]
    truth = {s.task_id: split(s.truth, config, True)[0] for s in samples}
    curves: dict[str, list[list]] = {label: [] for label in labels}
    for point in points:
        found = {s.task_id: s.sweep.get(point, []) for s in samples}
        counts = match_counts(_coco_eval(images, truth, found, labels, "bbox", MATCH_IOU), labels)
        for label in labels:
            c = counts[label]
            figures = prf(c["matched"], c["predicted"], c["annotated"])
            curves[label].append([*point, figures["precision"], figures["recall"], figures["f1"]])
    chosen = {}
    for label, curve in curves.items():
        n = len(gates)
        # A point counts where it found an annotated region (F1 above 0): a label nobody annotated, or whose
        # regions no point finds, has nothing to choose from.
        usable = [p for p in curve if p[n + 2]]
        if target_precision is not None:
            usable = [p for p in usable if p[n] >= target_precision]
            best = max(usable, key=lambda p: (p[n + 1] or 0, p[n], p[:n]), default=None)
        else:
            best = max(usable, key=lambda p: (p[n + 2], p[n], p[:n]), default=None)
        chosen[label] = {"chosen": None if best is None else dict(zip(gates, best[:n], strict=True)),
                         "precision": None if best is None else best[n],
                         "recall": None if best is None else best[n + 1],
                         "f1": None if best is None else best[n + 2], "curve": curve}
    return {"gates": list(gates), "target_precision": target_precision, "labels": chosen}


def extra_params_snippet(thresholds: dict) -> dict:
    """The chosen thresholds as a project's extra params: {"label_thresholds": {label: {gate: value}}}."""
    return {"label_thresholds": {label: entry["chosen"] for label, entry in thresholds["labels"].items()
                                 if entry["chosen"]}}


# ---------------------------------------------------------------------------------------------------- collecting


def sweep_grid(engine: str) -> dict[str, list[float]]:
    return SAM3_GRID if engine == "sam3" else GROUNDING_DINO_GRID


def predict_sample(pipeline: Pipeline, task: dict, truth: list[Region], config: LabelingConfig, query: TextQuery,
                   grid: dict[str, list[float]] | None, hostname: str | None = None, key: str | None = None
                   ) -> Sample:
    """One annotated task predicted as the service predicts it (its regions read back), and, with a grid, its
    detector's boxes at every grid point re-filtered from the outputs that prediction computed (cached)."""
    task_id = task.get("id")
    url = config.image_url(task.get("data"))
    if url is None:
        raise ValueError(f"task data has no image URL under {config.image_key!r}")
    image, image_id = pipeline.load_image(url, hostname, key, task_id)
    height, width = image.shape[:2]
    predicted, _ = regions_of(pipeline.predict_image(image, image_id, config, query)["result"], config)
    sample = Sample(task_id, width, height, truth, predicted)
    if grid:
        phrases = tuple(p for p in query.phrases if p.text != "*")
        names = list(grid)
        for values in np.array(np.meshgrid(*grid.values(), indexing="ij")).reshape(len(names), -1).T.tolist():
            params = replace(query.params, label_thresholds={}, **dict(zip(names, values, strict=True)))
            found = pipeline.find(image, image_id, phrases, params)
            sample.sweep[tuple(values)] = [
                Region(label, (float(x0), float(y0), float(x1 - x0), float(y1 - y0)), None, float(score))
                for (x0, y0, x1, y1), score, label in zip(found.xyxy, found.scores, found.labels, strict=True)]
    return sample


def stored_sample(task: dict, truth: list[Region], config: LabelingConfig, model_version: str) -> Sample | None:
    """One annotated task with the prediction `model_version` stored for it (the newest: the highest id, as
    LabelStudioProject.keep_newest takes it), None without one. Its image size: what its regions say."""
    mine = [p for p in task.get("predictions") or [] if p.get("model_version") == model_version]
    if not mine:
        return None
    results = max(mine, key=lambda p: p.get("id") or 0).get("result") or []
    predicted, _ = regions_of(results, config)
    sized = [*results, *((latest_annotation(task) or {}).get("result") or [])]
    width, height = next(((r["original_width"], r["original_height"]) for r in sized if r.get("original_width")),
                         (1, 1))
    return Sample(task.get("id"), int(width), int(height), truth, predicted)


def collect(tasks: Iterable[dict], config: LabelingConfig, predict: Callable[[dict, list[Region]], Sample | None],
            progress: Callable[[dict], None] = lambda counts: None) -> tuple[list[Sample], dict]:
    """The samples of the tasks that hold an annotation, each predicted by `predict` (a failure is recorded with
    its reason and the rest go on). Returns (samples, {"unannotated", "failed": [{task, reason}],
    "ignored": {type: count}, "unknown_labels": {label: count}, "no_prediction"})."""
    samples, notes = [], {"unannotated": 0, "failed": [], "ignored": Counter(), "unknown_labels": Counter(),
                          "no_prediction": 0}
    counts = {"done": 0, "failed": 0, "skipped": 0}
    known = set(config.labels)
    for task in tasks:
        annotation = latest_annotation(task)
        if annotation is None:
            notes["unannotated"] += 1
            counts["skipped"] += 1
            progress(counts)
            continue
        truth, ignored = regions_of(annotation.get("result") or [], config)
        notes["ignored"].update(ignored)
        notes["unknown_labels"].update(r.label for r in truth if r.label not in known)
        truth = [r for r in truth if r.label in known]
        try:
            sample = predict(task, truth)
        except (ServiceError, OSError, ValueError) as e:  # its image, say: that task reported, the rest evaluated
            notes["failed"].append({"task": task.get("id"), "reason": f"{type(e).__name__}: {e}"})
            counts["failed"] += 1
            progress(counts)
            continue
        if sample is None:
            notes["no_prediction"] += 1
            counts["skipped"] += 1
        else:
            samples.append(sample)
            counts["done"] += 1
        progress(counts)
    notes["ignored"], notes["unknown_labels"] = dict(notes["ignored"]), dict(notes["unknown_labels"])
    return samples, notes


# ---------------------------------------------------------------------------------------------------- a project


class NothingToEvaluate(ServiceError):
    """No task of the selection could be scored; `notes` as collect() counted them."""

    def __init__(self, message: str, notes: dict):
        super().__init__(message)
        self.notes = notes


@dataclass
class ProjectEvaluation:
    """A Label Studio project set up for evaluation: its labeling config, its model connection (Settings -> Model,
    or None) and the connection's extra params, and the query its pre-annotations are made with."""

    project: LabelStudioProject
    config: LabelingConfig
    ml: Any
    extra: dict
    prompt: str
    query: TextQuery

    @classmethod
    def open(cls, project: LabelStudioProject, settings: Settings, prompt: str | None = None,
             given: Mapping | None = None, where: str = "extra_params.") -> ProjectEvaluation:
        """The project's thresholds: `given` ({DETECTION_KEYS}) over its extra params over the environment's;
        `where` prefixes a bad threshold's name in the error. Raises ServiceError (a bad key, config or prompt)."""
        from api import parse_extra_params

        config = parse_label_config(project.label_config())
        ml = project.ml_connection()
        extra = parse_extra_params(ml.extra_params) if ml else {}
        params = detection_params(detection_values(extra, given or {}), settings, where)
        prompt = prompt or extra.get("prompt") or settings.default_prompt or ". ".join(config.labels)
        plan = require_phrases(prompt, config.labels, config.predicted_values)
        params.check_labels(config.labels)
        return cls(project, config, ml, extra, prompt, TextQuery(plan.phrases, params))

    def run(self, selection: Selection, pipeline: Pipeline | None = None, model_version: str | None = None,
            hostname: str | None = None, key: str | None = None, target_precision: float | None = None,
            progress: Callable[[dict], None] = lambda counts: None) -> dict:
        """The report: the selection's annotated tasks predicted by `pipeline` (and the thresholds swept), or with
        `model_version` their stored predictions read; {"project", "predictions", evaluate()'s figures, "notes",
        and when predicted "thresholds", "extra_params"}. Raises NothingToEvaluate."""
        if model_version:
            grid = None

            def predict(task, truth):
                return stored_sample(task, truth, self.config, model_version)
        else:
            grid = sweep_grid(pipeline.models.engine)

            def predict(task, truth):
                return predict_sample(pipeline, task, truth, self.config, self.query, grid, hostname, key)

        samples, notes = collect(self.project.tasks(selection), self.config, predict, progress)
        if not samples:
            raise NothingToEvaluate(
                f"project {self.project.project}: no annotated task to evaluate in {selection.describe()} "
                f"({notes['unannotated']} without annotation, {len(notes['failed'])} failed, "
                f"{notes['no_prediction']} without a prediction of that model version)", notes)
        report = {"project": self.project.project, "predictions": self.describe(pipeline, model_version),
                  **evaluate(samples, self.config, self.config.labels), "notes": notes}
        if grid:
            # The prompt's labels (two phrases may share one), each swept once.
            labels = list(dict.fromkeys(p.label for p in self.query.phrases if p.text != "*"))
            report["thresholds"] = choose_thresholds(samples, self.config, labels, list(grid), target_precision)
            report["extra_params"] = extra_params_snippet(report["thresholds"])
        return report

    def describe(self, pipeline: Pipeline | None, model_version: str | None) -> str:
        """Where run()'s predictions come from, in words."""
        if model_version:
            return f"stored, model version {model_version}"
        return f"predicted now, model {pipeline.model_version}, prompt {self.prompt!r}"

    def apply(self, report: dict) -> dict:
        """Write the report's chosen thresholds into the model connection's extra params (over the labels it
        already names); the extra params written."""
        if self.ml is None or "extra_params" not in report:
            raise ParamsError("applying writes the chosen thresholds to the project's model connection: it needs "
                              "one, and thresholds chosen by predicting (not from a stored model version)")
        merged = {**self.extra, "label_thresholds": {**self.query.params.label_thresholds,
                                                     **report["extra_params"]["label_thresholds"]}}
        self.project.set_extra_params(self.ml, merged)
        return merged


# ---------------------------------------------------------------------------------------------------- in the service


class Evaluations:
    """POST /evaluations: a project evaluated in the background through the worker's models, one evaluation at a
    time (the others queued) and each model pass after every labeler's (the scheduler's least urgent kind). The
    latest KEEP are kept in memory (a restart forgets them: the CLI's --out keeps a report); each is read and
    applied only with the Label Studio key that started it, which is held (in memory) only until its run ends."""

    KEEP = 10

    def __init__(self, settings: Settings, jobs: JobService, pipeline_for: Callable[[], Pipeline]):
        self.settings, self.jobs, self.pipeline_for = settings, jobs, pipeline_for
        self._runs: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        # A daemon: a worker shutting down does not wait for an evaluation.
        threading.Thread(target=self._work, name="evaluations", daemon=True).start()

    def start(self, body: dict, key: str) -> dict:
        """body: {"project", "tasks" | "view" | "all", "prompt", "model_version" (read its stored predictions
        instead of predicting), "target_precision", "label_studio_url"}. The project, the key and the prompt are
        checked with Label Studio before anything is queued."""
        selection = selection_of(body)
        prompt, version, target = body.get("prompt"), body.get("model_version"), body.get("target_precision")
        for name, value in (("prompt", prompt), ("model_version", version)):
            if value is not None and not isinstance(value, str):
                raise ParamsError(f"'{name}' must be a string, got {type(value).__name__}")
        if target is not None and (isinstance(target, bool) or not isinstance(target, int | float)
                                   or not 0 < target <= 1):
            raise ParamsError(f"'target_precision' must be a number in (0, 1], got {target!r}")
        connection, project = self.jobs.open_project(project_id(body), key, body.get("label_studio_url"))
        evaluation = ProjectEvaluation.open(project, self.settings, prompt or None)
        run = {"id": uuid.uuid4().hex[:12], "project": project.project, "state": "queued",
               "selection": selection.describe(), "prompt": None if version else evaluation.prompt,
               "model_version": version or None, "total": None, "done": 0, "failed": 0, "skipped": 0,
               "error": None, "report": None, "_key": _digest(key), "_url": connection.url}
        with self._lock:
            self._runs[run["id"]] = run
            for old in list(self._runs)[:-self.KEEP]:
                if self._runs[old]["state"] in ("done", "failed"):
                    del self._runs[old]
        self._queue.put((run, evaluation, selection, connection, version or None, target))
        return self.status(run["id"], key)

    def _work(self) -> None:
        while True:
            self._run(*self._queue.get())

    def _run(self, run: dict, evaluation: ProjectEvaluation, selection: Selection, connection, version, target):
        run["state"] = "running"
        try:
            run["total"] = evaluation.project.total(selection)
            pipeline = None if version else self.pipeline_for()
            run["report"] = evaluation.run(selection, pipeline, version, connection.url, connection.key, target,
                                           progress=run.update)
            run["state"] = "done"
        except ServiceError as e:
            run.update(state="failed", error=str(e))
        except Exception as e:  # never lose the worker thread; the message for the page, the trace for the log
            logger.exception("evaluation %s failed", run["id"])
            run.update(state="failed", error=f"{type(e).__name__}: {e}")

    def _get(self, evaluation_id: str, key: str) -> dict:
        run = self._runs.get(evaluation_id)
        if run is None or not hmac.compare_digest(run["_key"], _digest(key)):
            raise NotFound(f"no evaluation {evaluation_id!r} started with this key")
        return run

    def status(self, evaluation_id: str, key: str) -> dict:
        """{"id", "project", "state": queued | running | done | failed, "selection", "prompt", "model_version",
        "total", "done", "failed", "skipped", "error", "report" (when done)}."""
        return {k: v for k, v in self._get(evaluation_id, key).items() if not k.startswith("_")}

    def html(self, evaluation_id: str, key: str) -> str:
        run = self._get(evaluation_id, key)
        if run["report"] is None:
            raise NotFound(f"evaluation {evaluation_id} has no report: it is {run['state']}")
        return html_report(run["report"])

    def apply(self, evaluation_id: str, key: str) -> dict:
        """The chosen thresholds written to the project's model connection; {"extra_params": what was written}."""
        run = self._get(evaluation_id, key)
        if run["report"] is None:
            raise ParamsError(f"evaluation {evaluation_id} has no thresholds to apply: it is {run['state']}")
        # The project opened again with the key presented (none is kept once a run ends): its extra params as they
        # are now, not as they were when the evaluation started.
        _, project = self.jobs.open_project(run["project"], key, run["_url"])
        return {"extra_params": ProjectEvaluation.open(project, self.settings, run["prompt"]).apply(run["report"])}


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


# ---------------------------------------------------------------------------------------------------- output


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(report: dict) -> str:
    """The report as a plain-text table: one row per label and one overall, for boxes and masks."""
    lines = []
    for name in ("boxes", "masks"):
        part = report.get(name)
        if not part:
            continue
        lines.append(f"{name}: AP, AP50 (COCO); precision, recall, F1 at IoU {MATCH_IOU} and the thresholds in force")
        head = f"  {'label':<20} {'AP':>6} {'AP50':>6} {'P':>6} {'R':>6} {'F1':>6} {'annot':>6} {'pred':>6} " \
               f"{'match':>6}" + (f" {'mIoU':>6}" if name == "masks" else "")
        lines.append(head)
        for label, e in [*part["labels"].items(), ("(all)", part["overall"])]:
            lines.append(f"  {label[:20]:<20} {_fmt(e['ap']):>6} {_fmt(e['ap50']):>6} {_fmt(e['precision']):>6} "
                         f"{_fmt(e['recall']):>6} {_fmt(e['f1']):>6} {e['annotated']:>6} {e['predicted']:>6} "
                         f"{e['matched']:>6}" + (f" {_fmt(e.get('mean_iou')):>6}" if name == "masks" else ""))
    sweep = report.get("thresholds")
    if sweep:
        goal = f"precision >= {sweep['target_precision']}" if sweep["target_precision"] is not None else "best F1"
        lines.append(f"thresholds chosen per label ({goal}, boxes at IoU {MATCH_IOU}):")
        for label, e in sweep["labels"].items():
            chosen = ", ".join(f"{k} {v}" for k, v in e["chosen"].items()) if e["chosen"] else "none finds it"
            lines.append(f"  {label[:20]:<20} {chosen:<40} P {_fmt(e['precision'])}  R {_fmt(e['recall'])}  "
                         f"F1 {_fmt(e['f1'])}")
    return "\n".join(lines)


def html_report(report: dict) -> str:
    """A self-contained HTML page: the tables, and per label the precision-recall points of the sweep with the
    chosen point marked (inline SVG)."""
    style = ("body{font:14px system-ui,sans-serif;margin:2em}pre{background:#f6f6f6;padding:1em}"
             "figure{display:inline-block;margin:0 1em 1em 0}figcaption{text-align:center}")
    parts = [f"<!doctype html><meta charset=utf-8><title>Pre-annotation quality</title><style>{style}</style>",
             "<h1>Pre-annotation quality</h1>",
             f"<p>{report['tasks']} annotated task(s) of project {html.escape(str(report.get('project', '')))}; "
             f"predictions: {html.escape(str(report.get('predictions', '')))}.</p>",
             f"<pre>{html.escape(table(report))}</pre>"]
    sweep = report.get("thresholds")
    if sweep:
        n = len(sweep["gates"])
        for label, e in sweep["labels"].items():
            size, pad = 240, 30
            points = [(p[n + 1], p[n]) for p in e["curve"] if p[n] is not None and p[n + 1] is not None]
            dots = "".join(f'<circle cx="{pad + r * (size - 2 * pad):.1f}" cy="{size - pad - p * (size - 2 * pad):.1f}"'
                           f' r="2.5" fill="#7aa6d6"/>' for r, p in points)
            mark = ""
            if e["chosen"]:
                mark = (f'<circle cx="{pad + e["recall"] * (size - 2 * pad):.1f}" '
                        f'cy="{size - pad - e["precision"] * (size - 2 * pad):.1f}" r="6" fill="none" '
                        f'stroke="#d0342c" stroke-width="2"/>')
            axes = (f'<rect x="{pad}" y="{pad}" width="{size - 2 * pad}" height="{size - 2 * pad}" fill="none" '
                    f'stroke="#999"/><text x="{size / 2}" y="{size - 6}" text-anchor="middle">recall</text>'
                    f'<text x="10" y="{size / 2}" transform="rotate(-90 10 {size / 2})" text-anchor="middle">'
                    f'precision</text>')
            chosen = ", ".join(f"{k} {v}" for k, v in e["chosen"].items()) if e["chosen"] else "none"
            parts.append(f'<figure><svg width="{size}" height="{size}" xmlns="http://www.w3.org/2000/svg">{axes}'
                         f'{dots}{mark}</svg><figcaption>{html.escape(label)}: {html.escape(chosen)}</figcaption>'
                         f"</figure>")
    return "\n".join(parts)
