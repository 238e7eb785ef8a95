"""Bulk pre-annotation: every task of a selection predicted by the pipeline and its prediction imported into Label
Studio in chunks through its bulk route (`POST /api/projects/{id}/import/predictions`), resumable at any point.

    tasks  LabelStudioProject.tasks (paged: never the whole project in memory), or the tasks of a /predict
    each   skipped (final in the job already, or Label Studio holds a prediction of this model_version, unless the
           job redoes them) or predicted (`predict(task) -> pipeline.TaskOutcome`): a failure is recorded with its
           reason, the job goes on
    chunk  the job's importer thread takes predictions from a bounded queue and sends a chunk when its oldest has
           waited `import_wait` s, or sooner once it holds `chunk_size`: as soon as its oldest has waited as long as
           the last import took, so chunks grow with the job's rate up to `chunk_max` and the import rate follows
           the prediction rate (a full queue holds the predicting back). Recorded 'importing' (with its number)
           before the import, 'done' after it; a redo deletes the task's older predictions of this model_version in
           between.

Killed at any moment, a job resumes with `BulkJob.run` again: tasks still 'importing' are looked up in Label Studio
(a prediction of the job's model_version made since the job was created means the import landed), the others are
predicted again. So every task ends with exactly one prediction of the job. Label Studio down or answering 5xx:
each call is retried with backoff, then the job pauses (state 'paused', the reason kept) and resumes without loss.

The job knows nothing of where `predict` runs: in this process (the service's worker, or `cli.py annotate`), or
on an executor of its own (Ray). State lives in store.JobStore, shared by every worker and the command line.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from errors import (
    LabelStudioUnavailable,
    NotFound,
    ParamsError,
)
from everything import EverythingParams
from labeling import LabelingConfig, parse_label_config
from ls_client import (
    PAGE_SIZE,
    Connection,
    LabelStudioClient,
    LabelStudioProject,
    Selection,
    has_prediction,
    normalise_base,
)
from masks import CleanupParams
from pipeline import DetectionParams, TaskOutcome, TextQuery, detection_params, detection_values
from prompts import require_phrases
from store import FINAL, JobStore

logger = logging.getLogger(__name__)

PROGRESS_EVERY_S = 0.5  # how often a running job writes its heartbeat and reports its progress


def parse_task_ranges(text: str) -> tuple[int, ...]:
    """'1,5-9' -> (1, 5, 6, 7, 8, 9); raises ParamsError naming the bad part."""
    ids: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        first, dash, last = part.partition("-")
        try:
            lo, hi = int(first), int(last) if dash else int(first)
        except ValueError:
            raise ParamsError(f"task selection {part!r} is not an id or a range like 5-9") from None
        if lo < 1 or hi < lo:
            raise ParamsError(f"task selection {part!r} is not an increasing range of positive ids")
        ids.extend(range(lo, hi + 1))
    return tuple(dict.fromkeys(ids))


@dataclass(frozen=True)
class JobParams:
    """What a job does; stored with it (never a key or token), so that it resumes with the same parameters."""

    project: int
    prompt: str
    detection: DetectionParams
    selection: Selection = field(default_factory=Selection)
    redo: bool = False  # predict tasks that hold a prediction of this model_version too, and replace it
    model_version: str = ""
    label_config: str = ""  # the project's, read from Label Studio when the job is created
    chunk_size: int = 50  # a chunk this full is imported at once
    cleanup: CleanupParams | None = None  # the project's mask clean-up (None: the environment's)
    everything: EverythingParams | None = None  # the project's segment-everything parameters (None: ditto)
    import_wait: float = 10.0  # seconds a prediction may wait for its chunk to fill
    chunk_max: int = 500  # the largest chunk (and the queue's bound)
    label_studio_url: str = ""  # where the job was created: a cancel's key is checked there ("": the default)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> JobParams:
        data = dict(data)
        data.pop("only_missing", None)  # jobs stored before skipping became the default
        data["detection"] = DetectionParams(**data["detection"])  # label_thresholds: a dict, as written
        selection = data.get("selection") or {}
        data["selection"] = Selection(tuple(selection.get("task_ids") or ()), selection.get("view"))
        data["cleanup"] = CleanupParams(**data["cleanup"]) if data.get("cleanup") else None
        data["everything"] = EverythingParams(**data["everything"]) if data.get("everything") else None
        return cls(**data)

    def query(self) -> tuple[LabelingConfig, TextQuery]:
        """The labeling config and the pipeline query the job predicts each task with (PromptError, LabelConfigError
        when they can't be served)."""
        config = parse_label_config(self.label_config)
        plan = require_phrases(self.prompt, config.labels, config.predicted_values)
        self.detection.check_labels(config.labels)
        return config, TextQuery(plan.phrases, self.detection, self.cleanup, self.everything)


@dataclass
class JobReport:
    job_id: str
    state: str
    counts: dict
    seconds: float
    failures: list
    reason: str | None = None


# tasks to predict -> (task, outcome) pairs, in any order; it may keep several tasks in flight.
Executor = Callable[[Iterator[dict]], Iterator[tuple[dict, TaskOutcome]]]


class BulkJob:
    """One job: runs (or resumes) it to the end, a pause or a stop. `predict(task) -> TaskOutcome`."""

    def __init__(self, job_id: str, params: JobParams, store: JobStore, project: LabelStudioProject,
                 predict: Callable[[dict], TaskOutcome] | None = None, progress: Callable[[dict], None] | None = None,
                 stop: threading.Event | None = None, executor: Executor | None = None):
        """predict: one task at a time, in this process; or executor: tasks in, (task, outcome) out in any order,
        with as many in flight as it likes (ray_executor.RayExecutor)."""
        self.job_id, self.params, self.store, self.project = job_id, params, store, project
        self.executor = executor or (lambda tasks: ((task, predict(task)) for task in tasks))
        self.progress = progress or (lambda counts: None)
        self.stop = stop or threading.Event()
        self.cancelled = False

    def cancel(self) -> None:
        """End after the task in flight and the import of what was predicted, for good (a stop, by contrast, is
        resumed)."""
        self.cancelled = True
        self.stop.set()

    @classmethod
    def create(cls, store: JobStore, params: JobParams, queued: Iterable[int] = (), **kwargs) -> BulkJob:
        """A new job in the store; `queued` task ids are recorded 'pending' at once (claimed: not queued twice)."""
        job_id = uuid.uuid4().hex[:12]
        store.create(job_id, str(params.project), params.to_json())
        store.record(job_id, ((task_id, "pending", None, None, None, None) for task_id in queued))
        return cls(job_id, params, store, **kwargs)

    def run(self, tasks: Iterable[dict] | None = None) -> JobReport:
        """Predict and import every selected task not final yet. tasks: the task dicts when the caller has them
        (a /predict's), else they are listed from Label Studio."""
        store, started = self.store, time.perf_counter()
        store.set_state(self.job_id, "running")
        importer = None
        try:
            self._reconcile()
            source = self.project.tasks(self.params.selection) if tasks is None else iter(tasks)
            importer, tick = Importer(self), 0.0
            for task, outcome in self.executor(self._to_predict(source)):
                task_id = task["id"]
                if outcome.failure is not None:
                    logger.warning("job %s: task %s failed (%s): %s", self.job_id, task_id, outcome.failure.kind,
                                   outcome.failure.reason)
                    store.record(self.job_id, [(task_id, "failed", outcome.failure.kind, outcome.failure.reason,
                                                None, outcome.seconds)])
                else:
                    importer.put(task_id, outcome)
                if time.monotonic() >= tick:  # a write and a query: per task, they would cap a fast job
                    store.beat(self.job_id)
                    self.progress(store.counts(self.job_id))
                    tick = time.monotonic() + PROGRESS_EVERY_S
            importer.close()
            importer.check()
        except LabelStudioUnavailable as e:
            if importer is not None:  # Label Studio is down: what is queued is predicted again on resume
                importer.close(flush=False)
            store.set_state(self.job_id, "paused", str(e))
            logger.error("job %s paused: %s", self.job_id, e)
            return self.report(time.perf_counter() - started)
        except BaseException as e:
            if importer is not None:  # what was predicted still goes out, unless the process is told to quit now
                importer.close(flush=isinstance(e, Exception))
            store.set_state(self.job_id, "failed" if isinstance(e, Exception) else "paused", f"{type(e).__name__}: {e}")
            raise
        # Stopped (Ctrl-C): resumable; cancelled (DELETE /jobs/{id}): final.
        state = "done" if not self.stop.is_set() else "cancelled" if self.cancelled else "stopped"
        store.set_state(self.job_id, state)
        self.progress(store.counts(self.job_id))
        return self.report(time.perf_counter() - started)

    def _to_predict(self, source: Iterable[dict]) -> Iterator[dict]:
        """The tasks still to predict, a page at a time: not final in this job, not skipped; none once stopped."""
        for page in batched(source, PAGE_SIZE):
            known = self.store.statuses(self.job_id, [t["id"] for t in page])
            todo = [t for t in page if known.get(t["id"]) not in FINAL]
            skipped = [] if self.params.redo else [t["id"] for t in todo
                                                    if has_prediction(t, self.params.model_version)]
            if skipped:  # a page's skips in one write
                reason = f"holds a prediction of {self.params.model_version}"
                self.store.record(self.job_id, [(task_id, "skipped", None, reason, None, 0.0) for task_id in skipped])
                self.progress(self.store.counts(self.job_id))
            for task in todo:
                if self.stop.is_set():
                    return
                if task["id"] not in skipped:
                    yield task

    def _import(self, buffer: list[tuple[int, TaskOutcome]]) -> None:
        """One chunk out: 'importing', the import, (a redo's clean-up), 'done'. Runs in the importer thread."""
        chunk = self.store.next_chunk(self.job_id)
        self.store.record(self.job_id, [(task_id, "importing", None, None, chunk, outcome.seconds)
                                        for task_id, outcome in buffer])
        created = self.project.import_predictions([
            {"task": task_id, "result": o.prediction["result"], "score": o.prediction["score"],
             "model_version": o.prediction["model_version"]} for task_id, o in buffer])
        if created != len(buffer):
            logger.warning("job %s: chunk %d: Label Studio created %d of %d prediction(s)", self.job_id, chunk,
                           created, len(buffer))
        if self.params.redo:
            self.project.keep_newest([task_id for task_id, _ in buffer], self.params.model_version)
        self.store.record(self.job_id, [(task_id, "done", None, None, chunk, outcome.seconds)
                                        for task_id, outcome in buffer])
        self.store.beat(self.job_id)
        logger.info("job %s: chunk %d imported (%d prediction(s))", self.job_id, chunk, len(buffer))

    def _reconcile(self) -> None:
        """Tasks left 'importing' by an earlier run: done if their import landed, else predicted again."""
        importing = self.store.tasks_in(self.job_id, "importing")
        if not importing:
            return
        created = self.store.job(self.job_id)["created"]
        landed = self.project.predicted(importing, self.params.model_version, since=created)
        if self.params.redo:  # the new prediction is in: the old one goes, if the interrupted run had not done it
            self.project.keep_newest(sorted(landed), self.params.model_version)
        self.store.record(self.job_id, [(t, "done" if t in landed else "pending", None, None, None, None)
                                        for t in importing])
        logger.info("job %s: %d of %d task(s) of the interrupted chunk had landed; the others are predicted again",
                    self.job_id, len(landed), len(importing))

    def report(self, seconds: float) -> JobReport:
        job = self.store.job(self.job_id)
        return JobReport(self.job_id, job["state"], self.store.counts(self.job_id), seconds,
                         self.store.failures(self.job_id), job["reason"])


class Importer:
    """A running job's imports, in a thread of their own beside its predicting: predictions come in through a
    bounded queue (`put` blocks while it is full) and go out in chunks (`BulkJob._import`): when `chunk_max` are
    buffered; when `chunk_size` are and the oldest has waited as long as the last import took (an import costs
    Label Studio about the same whatever its size, so a chunk gathers what the job predicts in that time: it grows
    with the job's rate); when the oldest has waited `import_wait` s; at `close`. Its first error ends its imports
    and is raised in the job's thread by `put` or `check`."""

    _END = object()

    def __init__(self, job: BulkJob):
        self.job = job
        self.queue: queue.Queue = queue.Queue(maxsize=job.params.chunk_max)
        self.error: BaseException | None = None
        self._drop = False
        self._import_s = 0.0  # how long the last import took
        self._thread = threading.Thread(target=self._work, name=f"import-{job.job_id}", daemon=True)
        self._thread.start()

    def put(self, task_id: int, outcome: TaskOutcome) -> None:
        self.check()
        self.queue.put((task_id, outcome, time.monotonic()))

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self, flush: bool = True) -> None:
        """Import what is queued (flush) or drop it, and wait for the import in flight."""
        if self._thread.is_alive():
            self._drop = not flush
            self.queue.put(self._END)
            self._thread.join()

    def _work(self) -> None:
        params, buffer, ended = self.job.params, [], False
        while not ended or buffer:
            if not ended:
                ended = self._collect(buffer)
            if buffer and (ended or time.monotonic() >= self._due(buffer)):
                chunk, buffer = buffer[:params.chunk_max], buffer[params.chunk_max:]
                if self._drop or self.error is not None:
                    continue  # dropped: predicted again on resume
                try:
                    started = time.monotonic()
                    self.job._import([(task_id, outcome) for task_id, outcome, _ in chunk])
                    self._import_s = time.monotonic() - started
                except BaseException as e:  # raised in the job's thread; the queue is still drained, so put never hangs
                    self.error = e

    def _due(self, buffer: list) -> float:
        """When the buffered predictions go out (time.monotonic)."""
        params, oldest = self.job.params, buffer[0][2]
        if len(buffer) >= params.chunk_max:
            return oldest
        if len(buffer) >= params.chunk_size:
            return oldest + min(self._import_s, params.import_wait)
        return oldest + params.import_wait

    def _collect(self, buffer: list) -> bool:
        """Wait for a prediction (no longer than the buffered ones are due), then take what else is queued, up to
        a full chunk; whether the end came."""
        wait = None if not buffer else max(self._due(buffer) - time.monotonic(), 0)
        try:
            item = self.queue.get(timeout=wait)
        except queue.Empty:
            return False
        while item is not self._END:
            buffer.append(item)
            if len(buffer) >= self.job.params.chunk_max:
                return False
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return False
        return True


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Lists of `size` items (the last may be shorter), read lazily."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def in_batches(predict: Callable[[list[dict]], list[TaskOutcome] | Callable[[], list[TaskOutcome]]], size: int,
               overlap: int = 0) -> Executor:
    """An Executor that predicts `size` tasks at a time in this process: predict(tasks) -> their outcomes, in
    order (Pipeline.predict_tasks, which encodes them in batches). With `overlap` > 0, predict(tasks) runs the
    model passes and returns the host work left as a function that builds the outcomes (Pipeline.start_tasks):
    the passes run on a thread of their own, each batch's host work on one of `overlap` threads while the next
    batch's passes run, and a batch's outcomes are handed on as soon as its host work is done (not after the next
    batch's passes), in task order. At most `overlap` batches wait for their host work, and one more is in its
    passes, so a long job holds no more batches than that at once."""

    def run(tasks: Iterator[dict]) -> Iterator[tuple[dict, TaskOutcome]]:
        if not overlap:
            for batch in batched(tasks, size):
                yield from zip(batch, predict(batch), strict=True)
            return
        with ThreadPoolExecutor(1, thread_name_prefix="passes") as passes, \
                ThreadPoolExecutor(overlap, thread_name_prefix="host-work") as host:
            waiting: deque = deque()  # (batch, future of (future of its outcomes))
            for batch in batched(tasks, size):
                waiting.append((batch, passes.submit(lambda b=batch: host.submit(predict(b)))))
                while len(waiting) > overlap:
                    done, outcomes = waiting.popleft()
                    yield from zip(done, outcomes.result().result(), strict=True)
            while waiting:
                done, outcomes = waiting.popleft()
                yield from zip(done, outcomes.result().result(), strict=True)

    return run


def job_chunking(settings) -> dict:
    """JobParams' import settings from the service's Settings."""
    return {"chunk_size": settings.job_chunk_size, "import_wait": settings.job_import_wait,
            "chunk_max": settings.job_chunk_max}


def job_status(store: JobStore, job_id: str) -> dict | None:
    """A job as GET /jobs/{id} shows it: state, counts, rate (tasks/s), ETA, recent failures."""
    job = store.job(job_id)
    if job is None:
        return None
    counts = store.counts(job_id)
    params = job["params"]
    finished = counts["done"] + counts["failed"] + counts["skipped"]
    elapsed = max((job["updated"] if job["state"] not in ("queued", "running") else time.time()) - job["created"],
                  1e-9)
    total = len(params["selection"]["task_ids"]) or None
    rate = finished / elapsed
    eta = (total - finished) / rate if total and rate > 0 and job["state"] == "running" else None
    state = job["state"]
    if state == "running" and time.time() - job["heartbeat"] > 600:
        state = "interrupted"  # its process died: `cli.py annotate --resume <id>` continues it
    return {"id": job_id, "project": int(job["project"]), "state": state, "reason": job["reason"], "counts": counts,
            "total": total, "rate": round(rate, 3), "eta_seconds": None if eta is None else round(eta, 1),
            "prompt": params["prompt"], "selection": params["selection"], "model_version": params["model_version"],
            "pipeline_seconds": round(store.seconds(job_id), 3), "recent_failures": store.failures(job_id, 10),
            "created": job["created"], "updated": job["updated"]}


class JobRunner:
    """Runs bulk jobs one at a time, in order, in a background thread of this process (a service worker).

    executor_for(params, connection) -> an Executor (`in_batches`): how this process predicts a job's tasks.
    project_for(params, connection) -> LabelStudioProject."""

    def __init__(self, store: JobStore, executor_for: Callable, project_for: Callable):
        self.store, self.executor_for, self.project_for = store, executor_for, project_for
        self._lock = threading.Lock()
        self._queue: list[tuple[BulkJob, list | None]] = []
        self._current: BulkJob | None = None
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def submit(self, params: JobParams, connection, queued: Iterable[int] = (), tasks: list | None = None) -> str:
        """A new job; runs after those already queued. tasks: the task dicts when the caller has them."""
        job = BulkJob.create(self.store, params, queued, project=self.project_for(params, connection),
                             executor=self.executor_for(params, connection))
        with self._lock:
            self._queue.append((job, tasks))
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="bulk-jobs", daemon=True)
                self._thread.start()
        self._wake.set()
        return job.job_id

    def cancel(self, job_id: str) -> bool:
        """Stop a queued or running job of this process (a running one after the task in flight, once what it
        predicted is imported)."""
        with self._lock:
            for job, _ in list(self._queue):
                if job.job_id == job_id:
                    self._queue.remove((job, _))
                    self.store.set_state(job_id, "cancelled")
                    return True
            if self._current is not None and self._current.job_id == job_id:
                self._current.cancel()
                return True
        return False

    def _work(self) -> None:
        while True:
            self._wake.wait()
            with self._lock:
                if not self._queue:
                    self._wake.clear()
                    continue
                job, tasks = self._queue.pop(0)
                self._current = job
            try:
                report = job.run(tasks)
                logger.info("job %s %s: %s", job.job_id, report.state, report.counts)
            except Exception:
                logger.exception("job %s failed", job.job_id)
            finally:
                with self._lock:
                    self._current = None


def project_id(body: dict) -> int:
    project = body.get("project")
    if isinstance(project, bool) or not isinstance(project, int) or project < 1:
        raise ParamsError(f"'project' must be a Label Studio project id (a positive integer), got {project!r}")
    return project


def selection_of(body: dict) -> Selection:
    """Which tasks a request body names: exactly one of "tasks" (ids, or a string like "1,5-9"), "view" or "all"."""
    given = [k for k in ("tasks", "view", "all") if body.get(k) not in (None, False)]
    if len(given) != 1:
        raise ParamsError("say which tasks: exactly one of 'tasks' (ids, or a string like \"1,5-9\"), 'view' "
                          f"(a Data Manager view id) or 'all': true; got {given or 'none'}")
    tasks, view = body.get("tasks"), body.get("view")
    if given == ["tasks"]:
        if isinstance(tasks, str):
            ids = parse_task_ranges(tasks)
        elif isinstance(tasks, list) and all(isinstance(t, int) and not isinstance(t, bool) and t > 0
                                             for t in tasks):
            ids = tuple(dict.fromkeys(tasks))
        else:
            raise ParamsError("'tasks' must be a list of task ids or a string like \"1,5-9\"")
        if not ids:
            raise ParamsError("'tasks' is empty: nothing to pre-annotate")
        return Selection(task_ids=ids)
    if given == ["view"]:
        if isinstance(view, bool) or not isinstance(view, int) or view < 1:
            raise ParamsError(f"'view' must be a Data Manager view id, got {view!r}")
        return Selection(view=view)
    if body.get("all") is not True:
        raise ParamsError(f"'all' must be true, got {body.get('all')!r}")
    return Selection()


class JobService:
    """The jobs route's logic: a job from a request body and the caller's Label Studio key; status; cancel."""

    def __init__(self, runner: JobRunner, settings, label_studio: LabelStudioClient, model_version: str):
        self.runner, self.settings, self.store = runner, settings, runner.store
        self.label_studio, self.model_version = label_studio, model_version

    def _project(self, url: str, key: str, project: int) -> tuple[Connection, LabelStudioProject]:
        """The caller's connection and the project's calls on it (one attempt: a bad key or id answers at once)."""
        connection = Connection(normalise_base(url), key)
        return connection, LabelStudioProject(self.label_studio.sdk(connection), project, retries=1)

    def open_project(self, project: int, key: str, url: str | None = None) -> tuple[Connection, LabelStudioProject]:
        """The caller's connection to the Label Studio at `url` (else LABEL_STUDIO_URL, else the host /setup named
        for the project), and the project's calls on it."""
        url = url or self.settings.label_studio_url or self.store.get(str(project), "hostname")
        if not isinstance(url, str) or not url:
            raise ParamsError("the Label Studio URL is unknown: send 'label_studio_url' or set LABEL_STUDIO_URL")
        return self._project(url, key, project)

    def create(self, body: dict, key: str) -> dict:
        """body: {"project", "prompt", "tasks" (ids or "1,5-9") | "view" | "all", "redo", "only_missing" (the
        default: accepted, changes nothing), "box_threshold", "text_threshold", "max_detections",
        "sam3_score_threshold", "label_thresholds" (each over the project's extra params, then the environment's),
        "label_studio_url"}. Checks the project and the key with Label Studio before
        anything is queued."""
        project = project_id(body)
        selection = selection_of(body)
        # The project's extra params (as /setup last sent them) under the body's: a job predicts as Retrieve
        # Predictions would.
        extra = self.store.get(str(project), "extra_params") or {}
        detection = detection_params(detection_values(extra, body), self.settings)
        flags = {name: body.get(name, False) for name in ("redo", "only_missing")}
        for name, value in flags.items():
            if not isinstance(value, bool):
                raise ParamsError(f"'{name}' must be true or false, got {value!r}")
        if flags["redo"] and flags["only_missing"]:
            raise ParamsError("'redo' and 'only_missing' contradict each other: 'redo' replaces the predictions "
                              "'only_missing' keeps (skipping them is the default)")
        connection, label_project = self.open_project(project, key, body.get("label_studio_url"))
        label_config = label_project.label_config()
        config = parse_label_config(label_config)
        prompt = body.get("prompt")
        if prompt is None:
            prompt = extra.get("prompt") or self.settings.default_prompt or ". ".join(config.labels)
        if not isinstance(prompt, str):
            raise ParamsError(f"'prompt' must be a string, got {type(prompt).__name__}")
        require_phrases(prompt, config.labels, config.predicted_values)
        detection.check_labels(config.labels)
        if selection.view is not None and next(iter(label_project.tasks(selection)), None) is None:
            raise ParamsError(f"view {selection.view} of project {project} holds no task")
        params = JobParams(project, prompt, detection, selection, flags["redo"], self.model_version, label_config,
                           **job_chunking(self.settings), label_studio_url=connection.url)
        job_id = self.runner.submit(params, connection)
        return job_status(self.store, job_id)

    def status(self, job_id: str) -> dict:
        status = job_status(self.store, job_id)
        if status is None:
            raise NotFound(f"no job {job_id!r}")
        return status

    def list(self) -> list[dict]:
        return [job_status(self.store, job_id) for job_id in self.store.jobs()[:100]]

    def cancel(self, job_id: str, key: str) -> dict:
        """Cancel after the task in flight and the import of what was predicted; the key must be one Label Studio
        accepts for the job's project."""
        status = self.status(job_id)
        url = self.store.job(job_id)["params"].get("label_studio_url") or None  # jobs stored before: the default
        self.open_project(status["project"], key, url)[1].label_config()
        if not self.runner.cancel(job_id) and status["state"] in ("queued", "running", "paused", "interrupted"):
            self.store.set_state(job_id, "cancelled")
        return self.status(job_id)

    def metrics(self) -> dict:
        return self.store.totals()
