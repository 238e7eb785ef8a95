"""The command line: the service's pipeline without the service.

    python cli.py predict IMAGE_OR_URL | --project 3 --task 17 --prompt "brown cat_cats. house" [--config label.xml]
                  [--box-threshold 0.3] [--text-threshold 0.25] [--max-detections 50]
                  [--sam3-score-threshold 0.5] [--label-thresholds '{"house": {"box_threshold": 0.4}}']
                  [--out prediction.json] [--overlay overlay.png]
    python cli.py annotate --project 3 --prompt "brown cat_cats. house" [--tasks 1,5-9 | --view 12 | --all]
                  [--redo] [--box-threshold ...] [--chunk-size 50] [--url http://localhost:8080]
    python cli.py annotate --resume JOB_ID
    python cli.py evaluate --project 3 [--tasks 1,5-9 | --view 12 | --all] [--prompt ...] [--model-version V]
                  [--target-precision 0.9] [--out report.json] [--report report.html] [--apply]

`predict` loads the models the environment names (the same variables as the service, README "Environment
variables"), runs the pipeline once and prints the Label Studio prediction JSON (or writes it to --out).
IMAGE_OR_URL is a local file, an http(s) URL, or a Label Studio /data/... path (with LABEL_STUDIO_URL and
LABEL_STUDIO_API_KEY set). `--project P --task T` predicts a task of a Label Studio project instead, whatever holds
its image (an upload, a URL, cloud storage), with that project's labeling config unless --config names one.

`annotate` pre-annotates a Label Studio project (all of it, the listed tasks, or a Data Manager view) as a bulk
job: tasks are paged from Label Studio, predicted, and their predictions imported in chunks while it runs, with a
progress bar and a summary. Tasks that hold a prediction of this model version are skipped (`--redo` replaces it).
It acts with LABEL_STUDIO_API_KEY at LABEL_STUDIO_URL (or --url); the job's state is kept under DATA_DIR, so
Ctrl-C (after the task in flight and the import of what was predicted) or a killed process resumes with
`--resume JOB_ID`.

`evaluate` measures the pre-annotations on the project's annotated tasks (each one's latest annotation that was
not cancelled): it predicts them with the project's settings (its model connection's extra params under the
options), or reads the predictions of `--model-version` already stored, and prints per label COCO AP / AP50 for
boxes and masks, precision / recall / F1 at the thresholds in force, the mean IoU of matched masks and the counts.
When it predicts, every threshold pair of a grid is scored from the detector's kept outputs (no more model
passes) and each label's best pair printed; `--apply` writes them to the model connection's extra params.

Errors are one line on stderr and exit status 1 (2 for a malformed command line).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from config import ConfigError, Settings
from errors import ServiceError
from labeling import default_label_config, parse_label_config
from logs import configure_logging
from prompts import prompt_labels, require_phrases

logger = logging.getLogger("cli")


class CommandError(Exception):
    """A command that can't run; the message is printed as one line."""


def _read_image(source: str, settings: Settings, task_id: int | None = None):
    """(H, W, 3) uint8 RGB from a local file, or from a URL, a Label Studio path or (with the task's id) a cloud
    storage URI; raises CommandError."""
    from images import ImageLoader, decode_image

    url = "://" in source or source.startswith(("/data/", "data/", "/tasks/", "tasks/"))
    if task_id is None and (os.path.exists(source) or not url):
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
        return ImageLoader(settings).load(source, task_id=task_id)
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
        for ink, width in (((0, 0, 0), thickness + 2), (colour, thickness)):  # a dark edge keeps it legible
            cv2.putText(out, f"{label} {score:.2f}", (int(x0), max(int(y0) - 4, 12)), cv2.FONT_HERSHEY_SIMPLEX,
                        scale, ink, width, cv2.LINE_AA)
    return out


def _task(project: int, task_id: int, settings: Settings) -> tuple[dict, str]:
    """A task of a Label Studio project, as its task API lists it, and the project's labeling config. Read from
    the task list (GET /api/tasks/{id} would make Label Studio ask its ML backend for a prediction)."""
    from ls_client import Connection, LabelStudioClient, LabelStudioProject, Selection, normalise_base

    url = normalise_base(settings.label_studio_url)
    if not url or not settings.label_studio_api_key:
        raise CommandError("--task needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY: the task and its image are read "
                           "from Label Studio with that key")
    try:
        client = LabelStudioClient(settings).sdk(Connection(url, settings.label_studio_api_key))
        labels = LabelStudioProject(client, project, retries=1)
        task = next(iter(labels.tasks(Selection(task_ids=(task_id,)))), None)
        if task is None:
            raise CommandError(f"project {project} has no task {task_id}")
        return task, labels.label_config()
    except ServiceError as e:
        raise CommandError(str(e)) from None


def predict(args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_env()
    except ConfigError as e:
        raise CommandError(str(e)) from None
    task, xml = _task(args.project, args.task, settings) if args.task is not None else (None, "")
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as f:
                xml = f.read()
        except OSError as e:
            raise CommandError(f"{args.config}: {e.strerror}") from None
    xml = xml or default_label_config(prompt_labels(args.prompt))
    params = _detection_params(args, settings)
    try:
        config = parse_label_config(xml)
        plan = require_phrases(args.prompt, config.labels, config.predicted_values)
        params.check_labels(config.labels, "--label-thresholds: ")
    except ServiceError as e:
        raise CommandError(str(e)) from None
    for phrase, reason in plan.skipped:
        logger.warning("prompt phrase %r ignored: %s", phrase, reason)
    # Cheap checks first: the image is read before the models load (seconds to minutes).
    if task is None:
        image = _read_image(args.image, settings)
    else:
        source = config.image_url(task.get("data"))
        if source is None:
            raise CommandError(f"task {args.task} has no image URL under {config.image_key!r}")
        image = _read_image(source, settings, task_id=args.task)

    from cache import image_digest
    from images import ImageLoader
    from loader import build_models
    from pipeline import Pipeline, TextQuery
    from regions import prediction

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


class _Progress:
    """done / failed / skipped, tasks per second and ETA: tqdm's bar on a terminal, a plain line every 10 s
    otherwise (a log file or CI)."""

    def __init__(self, total: int | None, already: int = 0):
        """already: tasks a resumed job had finished before (they count for the bar, not for the rate)."""
        from tqdm import tqdm

        self.total, self.started, self.last, self.already = total, time.monotonic(), 0.0, already
        self.bar = tqdm(total=total, unit="task", dynamic_ncols=True, file=sys.stderr) if sys.stderr.isatty() \
            else None

    def __call__(self, counts: dict) -> None:
        finished = counts["done"] + counts["failed"] + counts["skipped"]
        if self.bar is not None:
            self.bar.update(finished - self.bar.n)
            self.bar.set_postfix(done=counts["done"], failed=counts["failed"], skipped=counts["skipped"],
                                 refresh=False)
            return
        now = time.monotonic()
        if now - self.last < 10 and (self.total is None or finished < self.total):
            return
        self.last = now
        rate = (finished - self.already) / max(now - self.started, 1e-9)
        eta = f", ETA {(self.total - finished) / rate:.0f} s" if self.total and rate else ""
        of = f"/{self.total}" if self.total else ""
        print(f"{finished}{of} tasks: {counts['done']} done, {counts['failed']} failed, {counts['skipped']} skipped; "
              f"{rate:.2f} tasks/s{eta}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def annotate(args: argparse.Namespace) -> int:
    from jobs import BulkJob, JobParams, in_batches, job_chunking, parse_task_ranges
    from ls_client import LabelStudioClient, LabelStudioProject, Selection
    from store import JobStore

    settings, connection = _label_studio(args, "the job reads the project's tasks and imports their predictions")
    store = JobStore(settings.data_dir)
    try:
        client = LabelStudioClient(settings).sdk(connection)
        if args.resume:
            job = store.job(args.resume)
            if job is None:
                raise CommandError(f"no job {args.resume!r} in {store.path}")
            if job["state"] in ("done", "cancelled") and not args.force:
                raise CommandError(f"job {args.resume} is {job['state']} already")
            params = JobParams.from_json(job["params"])
            job_id = args.resume
        else:
            if args.project is None or args.prompt is None:
                raise CommandError("--project and --prompt are needed (or --resume JOB_ID)")
            selection = Selection(task_ids=parse_task_ranges(args.tasks)) if args.tasks else Selection(view=args.view)
            chunking = job_chunking(settings)
            if args.chunk_size:
                chunking.update(chunk_size=args.chunk_size, chunk_max=max(chunking["chunk_max"], args.chunk_size))
            params = JobParams(args.project, args.prompt, _detection_params(args, settings), selection, args.redo,
                               settings.model_version, "", **chunking)
        project = LabelStudioProject(client, params.project)
        if not params.label_config:
            params = replace(params, label_config=project.label_config())
        config, query = params.query()
        total = project.total(params.selection)
    except ServiceError as e:
        raise CommandError(str(e)) from None
    if not args.resume:
        job_id = BulkJob.create(store, params, project=project, predict=None).job_id
    print(f"job {job_id}: project {params.project}, {params.selection.describe()}"
          f"{f' ({total} tasks)' if total is not None else ''}, prompt {params.prompt!r}, model {params.model_version}",
          file=sys.stderr)

    from images import ImageLoader
    from loader import build_models
    from pipeline import Pipeline

    pipeline = None
    if not (args.ray or settings.ray_address):  # on Ray, the actors load the models
        try:
            with contextlib.redirect_stdout(sys.stderr):  # groundingdino prints while it builds its model
                pipeline = Pipeline(build_models(settings), settings, ImageLoader(settings))
        except ServiceError as e:
            raise CommandError(str(e)) from None
    stop = threading.Event()
    ray_address = args.ray or settings.ray_address
    executor = in_batches(lambda tasks: pipeline.start_tasks(tasks, config, query, connection.url, connection.key),
                          settings.batch_size, overlap=1)
    if ray_address:
        from ray_executor import RayExecutor, RayOptions

        options = RayOptions(ray_address, args.ray_actors, args.ray_threads, args.ray_batch_size, args.ray_in_flight)
        try:
            executor = RayExecutor(settings, params, connection, options)
        except Exception as e:  # ray.init's errors: no cluster at that address, ...
            raise CommandError(f"Ray at {ray_address!r}: {type(e).__name__}: {e}") from None

    def interrupted(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\nstopping after the task in flight and the import of what was predicted (Ctrl-C again to quit "
              "at once)",
              file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, interrupted)
    counts = store.counts(job_id)
    progress = _Progress(total, counts["done"] + counts["failed"] + counts["skipped"])
    try:
        job = BulkJob(job_id, params, store, project, progress=progress, stop=stop, executor=executor)
        report = job.run()
    finally:
        progress.close()
        signal.signal(signal.SIGINT, previous)
        if ray_address:
            executor.__exit__(None, None, None)
    counts = report.counts
    print(f"job {job_id} {report.state} in {report.seconds:.1f} s: {counts['done']} done, {counts['failed']} failed, "
          f"{counts['skipped']} skipped", file=sys.stderr)
    for failure in report.failures:
        print(f"  task {failure['task']} failed ({failure['kind']}): {failure['reason']}", file=sys.stderr)
    if report.state == "done":
        return 0
    print(f"{report.reason or 'stopped'}; resume with: python cli.py annotate --resume {job_id}", file=sys.stderr)
    return 130 if report.state == "stopped" else 1


def _label_studio(args: argparse.Namespace, why: str):
    """The settings, and the connection to Label Studio (--url or LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY)."""
    from ls_client import Connection, normalise_base

    try:
        settings = Settings.from_env()
    except ConfigError as e:
        raise CommandError(str(e)) from None
    url = normalise_base(args.url or settings.label_studio_url)
    if not url or not settings.label_studio_api_key:
        raise CommandError(f"set LABEL_STUDIO_URL (or --url) and LABEL_STUDIO_API_KEY: {why} with that key")
    return settings, Connection(url, settings.label_studio_api_key)


def evaluate(args: argparse.Namespace) -> int:
    import evaluate as ev
    from jobs import parse_task_ranges
    from ls_client import LabelStudioClient, LabelStudioProject, Selection

    settings, connection = _label_studio(args, "evaluate reads the project's tasks and annotations")
    given, where = _thresholds_given(args)
    try:
        selection = Selection(task_ids=parse_task_ranges(args.tasks)) if args.tasks else Selection(view=args.view)
        project = LabelStudioProject(LabelStudioClient(settings).sdk(connection), args.project)
        evaluation = ev.ProjectEvaluation.open(project, settings, args.prompt, given, where)
        total = project.total(selection)
    except ServiceError as e:
        raise CommandError(str(e)) from None
    if args.apply and (args.model_version or evaluation.ml is None):
        raise CommandError("--apply writes the chosen thresholds to the project's model connection: it needs one, "
                           "and thresholds chosen by predicting (not --model-version)")
    pipeline = None
    if not args.model_version:
        from images import ImageLoader
        from loader import build_models
        from pipeline import Pipeline

        try:
            with contextlib.redirect_stdout(sys.stderr):  # groundingdino prints while it builds its model
                pipeline = Pipeline(build_models(settings), settings, ImageLoader(settings))
        except ServiceError as e:
            raise CommandError(str(e)) from None
    print(f"project {args.project}, {selection.describe()}{f' ({total} tasks)' if total is not None else ''}: "
          + evaluation.describe(pipeline, args.model_version), file=sys.stderr)
    progress = _Progress(total)
    try:
        report = evaluation.run(selection, pipeline, args.model_version, connection.url, connection.key,
                                args.target_precision, progress)
    except ev.NothingToEvaluate as e:
        _print_failures(e.notes)
        raise CommandError(str(e)) from None
    except ServiceError as e:
        raise CommandError(str(e)) from None
    finally:
        progress.close()
    notes = report["notes"]
    _print_failures(notes)
    print(ev.table(report))
    if notes["ignored"] or notes["unknown_labels"] or notes["unannotated"]:
        print(f"not scored: {notes['unannotated']} task(s) without annotation; regions of other tools "
              f"{notes['ignored']}; labels the config lacks {notes['unknown_labels']}", file=sys.stderr)
    if "extra_params" in report:
        print(f"extra_params: {json.dumps(report['extra_params'])}")
    if args.out:
        _write(args.out, lambda path: Path(path).write_text(json.dumps(report, indent=1, default=str)))
    if args.report:
        _write(args.report, lambda path: Path(path).write_text(ev.html_report(report), encoding="utf-8"))
    if args.apply:
        try:
            evaluation.apply(report)
        except ServiceError as e:
            raise CommandError(str(e)) from None
        print(f"model connection {evaluation.ml.id}: extra params written", file=sys.stderr)
    return 0


def _print_failures(notes: dict) -> None:
    for failure in notes["failed"]:
        print(f"  task {failure['task']} not evaluated: {failure['reason']}", file=sys.stderr)


def _thresholds_given(args: argparse.Namespace) -> tuple[dict, str]:
    """The thresholds given on the command line ({DETECTION_KEYS}), and the prefix naming a bad one."""
    from pipeline import DETECTION_KEYS

    given = {k: getattr(args, k) for k in DETECTION_KEYS if getattr(args, k) is not None}
    return given, "--label-thresholds: " if "label_thresholds" in given else "extra_params."


def _detection_params(args: argparse.Namespace, settings: Settings):
    """The command line's thresholds over the environment's (the options are range-checked by argparse,
    --label-thresholds here)."""
    from pipeline import detection_params

    try:
        return detection_params(_thresholds_given(args)[0], settings, "--label-thresholds: ")
    except ServiceError as e:
        raise CommandError(str(e)) from None


def _json_object(text: str) -> dict:
    """A JSON object given inline or as the path of a file that holds one."""
    try:
        if not text.lstrip().startswith("{"):
            with open(text, encoding="utf-8") as f:
                text = f.read()
        value = json.loads(text)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{text}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {type(value).__name__}")
    return value


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


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return int(text)


def _detections(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 900:
        raise argparse.ArgumentTypeError(f"must be a whole number between 1 and 900, got {text!r}")
    return int(text)


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="cli.py", description=__doc__.split("\n\n")[0])
    commands = main.add_subparsers(dest="command", required=True)
    p = commands.add_parser("predict", help="run the pipeline on one image and print the prediction JSON",
                            description="Run the pipeline on one image and print the Label Studio prediction JSON.")
    p.add_argument("image", metavar="IMAGE_OR_URL", nargs="?",
                   help="a local image file, an http(s) URL or a /data/... path (or --project and --task)")
    p.add_argument("--task", type=_positive, help="a Label Studio task's id: its image (uploaded, by URL or in cloud "
                                                  "storage) and, unless --config, its project's labeling config")
    p.add_argument("--project", type=_positive, help="the task's project (with --task)")
    p.add_argument("--prompt", required=True, help='phrases to detect, e.g. "brown cat_cats. house"')
    p.add_argument("--config", help="a labeling config (XML file); default: the README's config with the "
                                    "prompt's labels")
    p.add_argument("--box-threshold", type=_unit_float, help="default: BOX_THRESHOLD")
    p.add_argument("--text-threshold", type=_unit_float, help="default: TEXT_THRESHOLD")
    p.add_argument("--sam3-score-threshold", type=_unit_float, help="ENGINE=sam3; default: SAM3_SCORE_THRESHOLD")
    p.add_argument("--max-detections", type=_detections, help="default: MAX_DETECTIONS")
    p.add_argument("--label-thresholds", type=_json_object, metavar="JSON_OR_FILE",
                   help='thresholds per label over the others, e.g. \'{"cats": {"box_threshold": 0.2}}\' '
                        "(default: none)")
    p.add_argument("--out", help="write the prediction JSON here instead of printing it")
    p.add_argument("--overlay", help="also write the image with the boxes, masks and labels drawn (PNG, JPEG)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    p.set_defaults(run=predict)

    a = commands.add_parser("annotate", help="pre-annotate a Label Studio project (a bulk job, resumable)",
                            description="Pre-annotate a Label Studio project: predict its tasks and import the "
                                        "predictions in chunks. Uses LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY.")
    a.add_argument("--project", type=int, help="the Label Studio project id")
    a.add_argument("--prompt", help='phrases to detect, e.g. "brown cat_cats. house"')
    which = a.add_mutually_exclusive_group()
    which.add_argument("--tasks", help="task ids, e.g. 1,5-9")
    which.add_argument("--view", type=int, help="a Data Manager view (tab) id: its filtered tasks")
    which.add_argument("--all", action="store_true", help="every task of the project (the default)")
    existing = a.add_mutually_exclusive_group()
    existing.add_argument("--only-missing", action="store_true",
                          help="skip tasks that already hold a prediction of this model version: the default, "
                               "kept for older scripts")
    existing.add_argument("--redo", action="store_true",
                          help="predict tasks that hold a prediction of this model version too, and replace it "
                               "(the new one lands first; never two)")
    a.add_argument("--box-threshold", type=_unit_float, help="default: BOX_THRESHOLD")
    a.add_argument("--text-threshold", type=_unit_float, help="default: TEXT_THRESHOLD")
    a.add_argument("--sam3-score-threshold", type=_unit_float, help="ENGINE=sam3; default: SAM3_SCORE_THRESHOLD")
    a.add_argument("--max-detections", type=_detections, help="default: MAX_DETECTIONS")
    a.add_argument("--label-thresholds", type=_json_object, metavar="JSON_OR_FILE",
                   help='thresholds per label over the others, e.g. \'{"cats": {"box_threshold": 0.2}}\' '
                        "(default: none)")
    a.add_argument("--chunk-size", type=_detections,
                   help="predictions a chunk holds before it is imported without waiting JOB_IMPORT_WAIT (default: "
                        "JOB_CHUNK_SIZE, 50)")
    a.add_argument("--url", help="Label Studio's URL (default: LABEL_STUDIO_URL)")
    a.add_argument("--ray", metavar="ADDRESS", help="predict on Ray actors: 'local' (a cluster in this process), "
                                                   "'auto' (the running cluster) or its address (default: "
                                                   "RAY_ADDRESS; unset: in this process)")
    a.add_argument("--ray-actors", type=_detections, help="actors (default: one per GPU of the cluster, else 2)")
    a.add_argument("--ray-threads", type=_detections, default=1, help="torch threads of a CPU actor (default 1)")
    a.add_argument("--ray-batch-size", type=_detections, default=4, help="tasks per actor call (default 4)")
    a.add_argument("--ray-in-flight", type=_detections, default=2, help="batches queued per actor (default 2)")
    a.add_argument("--resume", metavar="JOB_ID", help="continue a job that was stopped or killed")
    a.add_argument("--force", action="store_true", help="with --resume: run a done or cancelled job again")
    a.add_argument("-v", "--verbose", action="store_true", help="log each chunk to stderr")
    a.set_defaults(run=annotate)

    e = commands.add_parser("evaluate", help="measure the pre-annotations on a project's annotated tasks, and "
                                             "choose thresholds per label",
                            description="Score predictions against the project's annotations (COCO AP, precision, "
                                        "recall, F1 per label) and choose each label's thresholds from the data. "
                                        "Uses LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY.")
    e.add_argument("--project", type=int, required=True, help="the Label Studio project id")
    which = e.add_mutually_exclusive_group()
    which.add_argument("--tasks", help="task ids, e.g. 1,5-9")
    which.add_argument("--view", type=int, help="a Data Manager view (tab) id: its filtered tasks")
    which.add_argument("--all", action="store_true", help="every task of the project (the default)")
    e.add_argument("--prompt", help="default: the model connection's extra_params prompt, else DEFAULT_PROMPT, else "
                                    "the config's labels")
    e.add_argument("--model-version", help="score the predictions of this model version already stored, "
                                           "instead of predicting (no threshold sweep)")
    e.add_argument("--box-threshold", type=_unit_float, help="default: the project's, else BOX_THRESHOLD")
    e.add_argument("--text-threshold", type=_unit_float, help="default: the project's, else TEXT_THRESHOLD")
    e.add_argument("--sam3-score-threshold", type=_unit_float, help="ENGINE=sam3; default: the project's, else "
                                                                    "SAM3_SCORE_THRESHOLD")
    e.add_argument("--max-detections", type=_detections, help="default: the project's, else MAX_DETECTIONS")
    e.add_argument("--label-thresholds", type=_json_object, metavar="JSON_OR_FILE",
                   help="thresholds per label (default: the project's)")
    e.add_argument("--target-precision", type=_unit_float,
                   help="choose each label's thresholds for the best recall at this precision (default: best F1)")
    e.add_argument("--out", help="write the report as JSON here")
    e.add_argument("--report", help="write the report as an HTML page (tables, precision-recall points) here")
    e.add_argument("--apply", action="store_true", help="write the chosen thresholds to the project's model "
                                                        "connection (extra_params.label_thresholds)")
    e.add_argument("--url", help="Label Studio's URL (default: LABEL_STUDIO_URL)")
    e.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    e.set_defaults(run=evaluate)
    return main


def main(argv: Sequence[str] | None = None) -> int:
    command = parser()
    args = command.parse_args(argv)
    if args.command == "predict" and (args.image is None) == (args.task is None):
        command.error("predict: give IMAGE_OR_URL or --task (with --project), not both")
    if args.command == "predict" and (args.task is None) != (args.project is None):
        command.error("predict: --task and --project go together")
    configure_logging("info" if args.verbose else "warning")
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
