"""The bulk job against a loopback imitation of Label Studio's REST API (tests/fake_label_studio.py), with a fake
predictor: paging, chunked imports beside the predicting (on time, on size, growing with the rate, held back by a
slow Label Studio), skips, redo, failures, resume after an interrupted import, pauses when Label Studio is down,
the jobs routes. The real Label Studio runs these paths in tests/test_label_studio_bulk.py."""

from __future__ import annotations

import json
import threading
import time

import pytest
from conftest import metric_samples
from fake_label_studio import FakeLabelStudio
from test_labeling import GUIDE_CONFIG

from config import Settings
from errors import LabelStudioNotFound, LabelStudioRefused, ParamsError
from jobs import BulkJob, JobParams, in_batches, job_status, parse_task_ranges
from ls_client import Connection, LabelStudioClient, LabelStudioProject, Selection
from pipeline import DetectionParams, TaskFailure, TaskOutcome
from store import JobStore

MV = "groundingdino_tiny+mobile_sam"


def predict_ok(task):
    if task["data"].get("image") == "broken":
        return TaskOutcome(task["id"], failure=TaskFailure("undecodable", "not a recognised image format"),
                           seconds=0.01)
    result = [{"type": "rectanglelabels", "value": {"rectanglelabels": ["cats"]}, "score": 0.5}]
    return TaskOutcome(task["id"], prediction={"result": result, "score": 0.5, "model_version": MV}, seconds=0.01)


@pytest.fixture
def ls():
    tasks = {i: {"image": f"/data/upload/1/{i}.png"} for i in range(1, 251)}
    tasks[7] = {"image": "broken"}
    with FakeLabelStudio(GUIDE_CONFIG, tasks) as server:
        yield server


@pytest.fixture
def store(tmp_path):
    return JobStore(str(tmp_path))


class Recorded(LabelStudioProject):
    """The project's calls, each import kept (when it ended, its task ids), after `delay` s (a slow Label Studio)."""

    def __init__(self, client, delay: float = 0.0, **kwargs):
        super().__init__(client, 1, **kwargs)
        self.delay, self.imports = delay, []

    def import_predictions(self, predictions):
        time.sleep(self.delay)
        created = super().import_predictions(predictions)
        self.imports.append((time.monotonic(), [p["task"] for p in predictions]))
        return created

    def sizes(self) -> list[int]:
        return [len(tasks) for _, tasks in self.imports]


def project(ls, retries=2, delay=0.0):
    client = LabelStudioClient(Settings()).sdk(Connection(ls.url, ls.token))
    return Recorded(client, delay, retries=retries, backoff=0.01)


def params(**changes):
    base = JobParams(1, "cats", DetectionParams(0.3, 0.25, 5), model_version=MV, label_config=GUIDE_CONFIG,
                     chunk_size=40)
    return JobParams(**{**base.__dict__, **changes})


def imported(ls) -> dict[int, int]:
    counts: dict[int, int] = {}
    for p in ls.predictions:
        counts[p["task"]] = counts.get(p["task"], 0) + 1
    return counts


@pytest.mark.parametrize("text, ids", [("1,5-9", (1, 5, 6, 7, 8, 9)), ("3", (3,)), (" 2 , 2-3", (2, 3))])
def test_task_ranges(text, ids):
    assert parse_task_ranges(text) == ids


@pytest.mark.parametrize("text", ["", "a", "5-2", "0", "1,,2", "-3"])
def test_bad_task_ranges_name_the_part(text):
    with pytest.raises(ParamsError, match="task selection"):
        parse_task_ranges(text)


def test_a_whole_project_paged_imported_in_chunks_with_a_failure_recorded(ls, store):
    labels = project(ls)
    job = BulkJob.create(store, params(), project=labels, predict=predict_ok)
    report = job.run()
    assert report.state == "done"
    assert report.counts == {"pending": 0, "importing": 0, "done": 249, "failed": 1, "skipped": 0}
    assert report.failures == [{"task": 7, "kind": "undecodable", "reason": "not a recognised image format"}]
    assert imported(ls) == {i: 1 for i in range(1, 251) if i != 7}
    assert all(p["model_version"] == MV and p["result"] for p in ls.predictions)
    sizes = labels.sizes()  # full chunks of 40 or more (what queued during an import), the rest at the end
    assert sum(sizes) == 249 and all(40 <= n <= 500 for n in sizes[:-1]) and len(sizes) <= 7, sizes
    assert [path for method, path in ls.requests if method == "POST"] == ["/api/projects/1/import/predictions"] * len(
        sizes)
    pages = [path for method, path in ls.requests if path.startswith("/api/tasks/")]
    assert len(pages) == 3  # 100 + 100 + 50: the last page is short, nothing more is asked


def old_prediction(task: int, prediction_id: int, model_version: str = MV) -> dict:
    return {"id": prediction_id, "task": task, "model_version": model_version, "result": [],
            "created_at": "2020-01-01T00:00:00Z"}


def ours(ls, task: int) -> list[int]:
    """The ids of the task's predictions of this model version."""
    return [p["id"] for p in ls.predictions if p["task"] == task and p["model_version"] == MV]


def test_tasks_holding_a_prediction_of_this_version_are_skipped_by_default(ls, store):
    ls.predictions += [old_prediction(3, 1), old_prediction(4, 2, "other")]
    job = BulkJob.create(store, params(selection=Selection(task_ids=parse_task_ranges("2-5"))),
                         project=project(ls), predict=predict_ok)
    report = job.run()
    assert report.counts["done"] == 3 and report.counts["skipped"] == 1
    assert imported(ls) == {2: 1, 3: 1, 4: 2, 5: 1} and ours(ls, 3) == [1]


def test_redo_replaces_the_prediction_of_this_version_and_leaves_one(ls, store):
    """Task 3 holds two predictions of this version (what a job that did not skip left), task 4 one of another
    version: after a redo each task holds exactly one of this version, the new one, and task 4 keeps the other."""
    ls.predictions += [old_prediction(3, 1), old_prediction(3, 2), old_prediction(4, 3, "other"),
                       old_prediction(5, 4)]
    job = BulkJob.create(store, params(selection=Selection(task_ids=parse_task_ranges("2-5")), redo=True),
                         project=project(ls), predict=predict_ok)
    report = job.run()
    assert report.state == "done" and report.counts["done"] == 4 and report.counts["skipped"] == 0
    assert all(len(ours(ls, t)) == 1 and ours(ls, t)[0] >= 1000 for t in (2, 3, 4, 5)), ls.predictions
    assert [p["id"] for p in ls.predictions if p["model_version"] == "other"] == [3]


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs (the importer drops what is queued)."""


@pytest.mark.parametrize("redo", [False, True])
@pytest.mark.parametrize("when", ["before the import", "after the import", "after the old ones went",
                                  "after the bookkeeping"])
def test_resume_after_an_interrupted_import_leaves_one_prediction_per_task(ls, store, redo, when):
    """The process dies at some point of chunk 2's import; the resumed job asks Label Studio whether it landed
    (and a redo deletes the old predictions it had not deleted yet): every task ends with exactly one prediction
    of this version, the job's. With redo, every task held one of an earlier run."""
    if redo:
        ls.predictions += [old_prediction(t, t) for t in range(1, 31)]
    # chunk_max too: a job faster than its importer thread would otherwise import all 30 as one chunk (no chunk 2)
    p = params(selection=Selection(task_ids=tuple(range(1, 31))), chunk_size=5, chunk_max=5, redo=redo)
    job = BulkJob.create(store, p, project=project(ls), predict=predict_ok)
    dying = project(ls)
    calls = {"import_predictions": 0, "keep_newest": 0}

    def die_at(name, before):
        real = getattr(dying, name)

        def call(*args):
            calls[name] += 1
            if calls[name] == 2 and before:
                raise Killed
            answer = real(*args)
            if calls[name] == 2:
                raise Killed
            return answer

        setattr(dying, name, call)

    if when == "before the import":
        die_at("import_predictions", before=True)
    elif when == "after the import":
        die_at("import_predictions", before=False)
    elif when == "after the old ones went":
        die_at("keep_newest" if redo else "import_predictions", before=False)
    else:
        real_record = store.record

        def record(job_id, rows):
            rows = list(rows)
            if rows and rows[0][1] == "done" and rows[0][4] == 2:
                raise Killed  # between the import and its bookkeeping
            real_record(job_id, rows)

        store.record = record
    with pytest.raises(Killed):
        BulkJob(job.job_id, p, store, dying, predict_ok).run()
    store.record = JobStore.record.__get__(store)
    interrupted = store.tasks_in(job.job_id, "importing")
    assert interrupted and len(ls.predictions) < 30 + 30 * redo  # chunk 2 was cut short, the job did not end
    report = BulkJob(job.job_id, p, store, project(ls), predict_ok).run()
    assert report.state == "done" and report.counts["done"] == 29 and report.counts["failed"] == 1
    # task 7's image is broken: it keeps the old prediction a redo found, and gets none otherwise
    assert {t: len(ours(ls, t)) for t in range(1, 31)} == {t: 1 if t != 7 or redo else 0 for t in range(1, 31)}
    assert all(ours(ls, t)[0] >= 1000 for t in range(1, 31) if t != 7), ls.predictions  # the job's, not the old


def test_label_studio_down_pauses_the_job_and_resume_loses_nothing(ls, store):
    p = params(selection=Selection(task_ids=tuple(range(1, 61))), chunk_size=20)
    job = BulkJob.create(store, p, project=project(ls, retries=1), predict=predict_ok)
    labels, done = project(ls, retries=1), []

    def predict_then_fail(task):
        done.append(task["id"])
        if len(done) == 30:
            deadline = time.monotonic() + 10
            while not labels.imports and time.monotonic() < deadline:  # the first chunk is in
                time.sleep(0.01)
            ls.fail_next = 100  # Label Studio goes down: the next import fails every retry
        return predict_ok(task)

    report = BulkJob(job.job_id, p, store, labels, predict_then_fail).run()
    assert report.state == "paused" and "unavailable after 2 attempts" in report.reason
    status = job_status(store, job.job_id)
    assert status["state"] == "paused" and 20 <= status["counts"]["done"] < 59
    ls.fail_next = 0
    report = BulkJob(job.job_id, p, store, project(ls), predict_ok).run()
    assert report.state == "done" and imported(ls) == {i: 1 for i in range(1, 61) if i != 7}


def test_a_stop_ends_after_the_task_in_flight_and_imports_what_was_predicted(ls, store):
    stop = threading.Event()
    p = params(selection=Selection(task_ids=tuple(range(1, 51))), chunk_size=10)

    def predict(task):
        if task["id"] == 15:
            stop.set()
        return predict_ok(task)

    report = BulkJob.create(store, p, project=project(ls), predict=predict, stop=stop).run()
    assert report.state == "stopped" and sorted(imported(ls)) == [i for i in range(1, 16) if i != 7]


def test_a_chunk_goes_out_when_its_oldest_prediction_has_waited(ls, store):
    """A slow job (0.15 s a task) never fills a chunk of 50: each prediction is imported about JOB_IMPORT_WAIT
    (0.3 s) after it was made, while the job runs, not all at its end."""
    labels = project(ls)
    predicted: dict[int, float] = {}

    def slow(task):
        time.sleep(0.15)
        predicted[task["id"]] = time.monotonic()
        return predict_ok(task)

    p = params(selection=Selection(task_ids=tuple(range(1, 13))), chunk_size=50, import_wait=0.3)
    report = BulkJob.create(store, p, project=labels, predict=slow).run()
    assert report.state == "done" and imported(ls) == {i: 1 for i in range(1, 13) if i != 7}
    assert len(labels.imports) >= 3, labels.sizes()  # 1.8 s of predicting, one import every 0.3 s or so
    first_import, first_tasks = labels.imports[0]
    assert first_import < predicted[12]  # before the last task was predicted
    for ended, tasks in labels.imports[:-1]:
        waited = ended - min(predicted[t] for t in tasks)
        assert 0.25 <= waited < 0.3 + 0.15 + 0.3, (waited, tasks)  # the wait, at most one task more, the request


def test_a_slow_label_studio_holds_the_predicting_back_through_the_bounded_queue(ls, store):
    """Imports of 0.2 s each and predictions in no time: the predicting runs at most a queue (chunk_max) and a
    chunk ahead of the imports, and no chunk is larger than chunk_max."""
    labels = project(ls, delay=0.2)
    ahead = []

    def fast(task):
        ahead.append(len(ahead) + 1 - sum(labels.sizes()))  # predicted, not imported yet
        return predict_ok(task)

    p = params(selection=Selection(task_ids=tuple(range(1, 81))), chunk_size=5, chunk_max=10)
    report = BulkJob.create(store, p, project=labels, predict=fast).run()
    assert report.state == "done" and imported(ls) == {i: 1 for i in range(1, 81) if i != 7}
    assert max(labels.sizes()) == 10 and max(ahead) <= 10 + 10 + 2, (labels.sizes(), max(ahead))


def test_chunks_grow_with_the_jobs_rate_up_to_the_bound(ls, store):
    """Each import costs 0.5 s whatever its size (as Label Studio's ~0.6 s) and the predictions come in no time:
    the chunks grow from 5 to the bound (100) and 240 tasks need a few imports, not 48 (240 / 5), so the job ends
    in a fraction of what fixed chunks of 5 would take (48 x 0.5 s = 24 s)."""
    labels = project(ls, delay=0.5)
    p = params(selection=Selection(task_ids=tuple(range(1, 241))), chunk_size=5, chunk_max=100)
    started = time.monotonic()
    report = BulkJob.create(store, p, project=labels, predict=predict_ok).run()
    seconds = time.monotonic() - started
    assert report.state == "done" and imported(ls) == {i: 1 for i in range(1, 241) if i != 7}
    sizes = labels.sizes()
    assert sizes[0] >= 5 and max(sizes) == 100 and len(sizes) <= 8, sizes
    assert seconds < 8, (seconds, sizes)


def test_pending_tasks_are_claimed_and_a_prediction_already_there_is_skipped(ls, store):
    p = params(selection=Selection(task_ids=(1, 2, 3)))
    ls.predictions.append({"task": 2, "model_version": MV, "result": [], "created_at": "2020-01-01T00:00:00Z"})
    job = BulkJob.create(store, p, queued=[1, 2, 3], project=project(ls), predict=predict_ok)
    assert store.claimed("1", [1, 2, 3, 4]) == {1, 2, 3}
    job.run()
    assert store.claimed("1", [1, 2, 3]) == set()
    assert store.counts(job.job_id)["skipped"] == 1 and imported(ls) == {1: 1, 2: 1, 3: 1}


def test_label_studio_errors_name_the_problem(ls):
    with pytest.raises(LabelStudioRefused, match="refused the key"):
        LabelStudioProject(LabelStudioClient(Settings()).sdk(Connection(ls.url, "wrong")), 1, retries=0
                           ).label_config()
    with pytest.raises(LabelStudioNotFound, match="404"):
        LabelStudioProject(project(ls).client, 99, retries=0).label_config()


# --------------------------------------------------------------------------- the service: /jobs and one click

@pytest.fixture
def service(tmp_path):
    """The service's app (fake models) and a 30-task project in the Label Studio imitation."""
    from fakes import FakeLoader
    from servers import ImageServer
    from test_api import png

    from _wsgi import create_backend_app

    with ImageServer({"/plain/a.png": png(64, 48)}) as images:
        tasks = {i: {"image": f"{images.url}/plain/a.png"} for i in range(1, 31)}
        with FakeLabelStudio(GUIDE_CONFIG, tasks) as ls:
            loader = FakeLoader()
            app = create_backend_app({"DATA_DIR": str(tmp_path / "data"), "LABEL_STUDIO_URL": ls.url,
                                      "LABEL_STUDIO_API_KEY": ls.token, "JOB_CHUNK_SIZE": "7",
                                      "PREDICT_TIME_BUDGET": "0.3"}, loader=loader)
            client = app.test_client()
            client.ls, client.loader = ls, loader
            yield client


def wait_job(client, job_id, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/jobs/{job_id}").json
        if status["state"] not in ("queued", "running"):
            return status
        time.sleep(0.05)
    pytest.fail(f"job {job_id} did not end: {status}")


def test_post_jobs_runs_a_job_with_the_callers_key(service):
    auth = {"Authorization": f"Token {service.ls.token}"}
    response = service.post("/jobs", json={"project": 1, "prompt": "cats", "tasks": "1-12"}, headers=auth)
    assert response.status_code == 201, response.json
    job = response.json
    assert job["state"] in ("queued", "running") and job["total"] == 12 and job["prompt"] == "cats"
    status = wait_job(service, job["id"])
    assert status["state"] == "done" and status["counts"]["done"] == 12 and status["rate"] > 0
    assert imported(service.ls) == {i: 1 for i in range(1, 13)}
    assert all(p["model_version"] == "fake-dino+fake-sam" for p in service.ls.predictions)
    assert [j["id"] for j in service.get("/jobs").json["jobs"]] == [job["id"]]
    metrics = metric_samples(service.get("/metrics").get_data(as_text=True))
    assert metrics["grounded_sam_jobs_submitted_total"] == 1 and metrics["grounded_sam_jobs{state=done}"] == 1
    assert metrics["grounded_sam_job_tasks{status=done}"] == 12


def test_a_job_gates_as_the_projects_extra_params_say_and_the_body_overrides_them(service):
    from test_api import setup_payload

    auth = {"Authorization": f"Token {service.ls.token}"}
    extra = {"box_threshold": 0.4, "label_thresholds": {"cats": {"box_threshold": 0.6}}}
    service.post("/setup", json=setup_payload(extra))
    calls = service.loader.models.detector.calls
    for body, gates in [({}, [0.6]), ({"box_threshold": 0.2}, [0.6]),
                        ({"label_thresholds": {"cats": {"box_threshold": 0.3}}}, [0.3])]:
        job = service.post("/jobs", json={"project": 1, "prompt": "cats", "tasks": "1", "redo": True, **body},
                           headers=auth).json
        assert wait_job(service, job["id"])["state"] == "done" and calls[-1] == (["cats"], gates), body


@pytest.mark.parametrize(
    "body, headers, status, message",
    [
        ({"project": 1, "prompt": "cats", "all": True}, {}, 401, "send 'Authorization: Token <key>'"),
        ({"project": 1, "prompt": "cats", "all": True}, {"Authorization": "Token wrong"}, 403, "refused the key"),
        ({"project": 9, "prompt": "cats", "all": True}, None, 404, "404"),
        ({"project": "x", "prompt": "cats", "all": True}, None, 400, "'project' must be"),
        ({"project": 1, "prompt": "cats", "tasks": []}, None, 400, "'tasks' is empty: nothing to pre-annotate"),
        ({"project": 1, "prompt": "cats"}, None, 400, "say which tasks"),
        ({"project": 1, "prompt": "cats", "tasks": "4-2"}, None, 400, "task selection '4-2'"),
        ({"project": 1, "prompt": "cats", "all": True, "view": 3}, None, 400, "exactly one of"),
        ({"project": 1, "prompt": "cats", "all": True, "box_threshold": 3}, None, 400,
         "box_threshold must be a number between 0.0 and 1.0"),
        ({"project": 1, "prompt": "tree", "all": True}, None, 422, "gives nothing to detect"),
        ({"project": 1, "prompt": "cats", "all": True, "label_thresholds": {"cats": {"box": 0.5}}}, None, 400,
         "label_thresholds.cats"),
        ({"project": 1, "prompt": "cats", "all": True, "label_thresholds": {"dogs": {"box_threshold": 0.5}}}, None,
         400, "dogs"),
        ({"project": 1, "prompt": "cats", "all": True, "redo": "yes"}, None, 400, "'redo' must be true or false"),
        ({"project": 1, "prompt": "cats", "all": True, "only_missing": 1}, None, 400,
         "'only_missing' must be true or false"),
        ({"project": 1, "prompt": "cats", "all": True, "redo": True, "only_missing": True}, None, 400,
         "'redo' and 'only_missing' contradict each other"),
    ],
)
def test_bad_job_requests_are_4xx_naming_the_problem(service, body, headers, status, message):
    headers = {"Authorization": f"Token {service.ls.token}"} if headers is None else headers
    response = service.post("/jobs", json=body, headers=headers)
    assert response.status_code == status and message in response.json["error"], response.json
    assert service.get("/jobs").json["jobs"] == []


def test_a_second_job_skips_what_the_first_imported_and_redo_replaces_it(service):
    """A job over tasks 1-12, then one over the whole project: the first 12 are skipped (before skipping became
    the default this left two identical predictions on each), and only_missing is the same job. Then a redo of
    1-3: each of them holds one prediction, a new one."""
    auth = {"Authorization": f"Token {service.ls.token}"}

    def job(**body):
        response = service.post("/jobs", json={"project": 1, "prompt": "cats", **body}, headers=auth)
        assert response.status_code == 201, response.json
        status = wait_job(service, response.json["id"])
        assert status["state"] == "done", status
        return status["counts"]

    assert job(tasks="1-12")["done"] == 12
    assert job(all=True) == {"pending": 0, "importing": 0, "done": 18, "failed": 0, "skipped": 12}
    assert job(all=True, only_missing=True)["skipped"] == 30
    first = {p["task"]: p["id"] for p in service.ls.predictions}
    assert imported(service.ls) == {i: 1 for i in range(1, 31)}
    assert job(tasks="1-3", redo=True)["done"] == 3
    assert imported(service.ls) == {i: 1 for i in range(1, 31)}
    again = {p["task"]: p["id"] for p in service.ls.predictions}
    assert all(again[t] > first[t] for t in (1, 2, 3)) and all(again[t] == first[t] for t in range(4, 31))


def test_jobs_never_act_with_the_setup_token(service):
    """A /setup stored Label Studio's token for the project; a caller without a key of their own gets nothing."""
    from test_api import setup_payload

    payload = {**setup_payload(), "project": "1.1700000000", "hostname": service.ls.url,
               "access_token": service.ls.token}
    assert service.post("/setup", json=payload).status_code == 200
    assert service.post("/jobs", json={"project": 1, "prompt": "cats", "all": True}).status_code == 401
    assert service.delete("/jobs/abc").status_code in (401, 404)


def slow_down(service, seconds: float) -> None:
    """Each detector call of the service's fake models takes `seconds`."""
    from cache import EmbeddingCache
    from loader import Models

    class SlowDetector(type(service.loader.models.detector)):
        def detect(self, *args, **kwargs):
            time.sleep(seconds)
            return super().detect(*args, **kwargs)

    service.loader.models = Models(SlowDetector(), service.loader.models.segmenter, EmbeddingCache(4, 2**20))


def test_cancel_and_unknown_jobs(service):
    slow_down(service, 0.2)  # 30 tasks: 6 s, time enough to cancel
    auth = {"Authorization": f"Token {service.ls.token}"}
    assert service.get("/jobs/nope").status_code == 404
    job = service.post("/jobs", json={"project": 1, "prompt": "cats", "all": True}, headers=auth).json
    cancelled = service.delete(f"/jobs/{job['id']}", headers=auth)
    assert cancelled.status_code == 200
    assert wait_job(service, job["id"])["state"] == "cancelled"
    assert len(service.ls.predictions) < 30


def test_a_job_on_another_label_studio_is_cancelled_with_the_key_checked_there(tmp_path):
    """A job created with 'label_studio_url' (LABEL_STUDIO_URL names another host, with no such project): its cancel
    checks the caller's key at the job's Label Studio, not at LABEL_STUDIO_URL (which answered 404 before)."""
    from fakes import FakeLoader
    from servers import ImageServer
    from test_api import png

    from _wsgi import create_backend_app

    with ImageServer({"/plain/a.png": png(64, 48)}) as elsewhere:
        tasks = {i: {"image": f"{elsewhere.url}/plain/a.png"} for i in range(1, 31)}
        with FakeLabelStudio(GUIDE_CONFIG, tasks) as ls:
            loader = FakeLoader()
            client = create_backend_app({"DATA_DIR": str(tmp_path), "LABEL_STUDIO_URL": elsewhere.url},
                                        loader=loader).test_client()
            client.loader = loader
            slow_down(client, 0.2)
            auth = {"Authorization": f"Token {ls.token}"}
            job = client.post("/jobs", json={"project": 1, "prompt": "cats", "all": True, "label_studio_url": ls.url},
                              headers=auth).json
            cancelled = client.delete(f"/jobs/{job['id']}", headers=auth)
            assert cancelled.status_code == 200, cancelled.json
            assert wait_job(client, job["id"])["state"] == "cancelled" and len(ls.predictions) < 30
            assert not [path for path, _ in elsewhere.requests if path.startswith("/api/")]


def test_one_retrieve_predictions_hands_the_rest_to_a_background_job(service):
    """Label Studio sends 30 tasks in one /predict and the budget allows a few: those are answered, the others are
    predicted and imported by a job. Sent again (the user clicks twice), none is queued or predicted twice."""
    from test_api import predict_payload

    slow_down(service, 0.1)
    tasks = [{"id": i, "data": {"image": service.ls.tasks[i]["image"]}, "predictions": []} for i in range(1, 31)]
    results = service.post("/predict", json=predict_payload(tasks, None)).json["results"]
    answered = {i for i, r in enumerate(results, 1) if r}
    assert answered and len(answered) < 30 and all(results[i - 1]["result"] for i in answered)
    again = service.post("/predict", json=predict_payload([t for t in tasks if t["id"] not in answered], None))
    assert all(r == [] for r in again.json["results"])  # queued in the job: not predicted here, not queued twice
    (job,) = service.get("/jobs").json["jobs"]
    status = wait_job(service, job["id"])
    assert status["state"] == "done" and status["counts"]["done"] == 30 - len(answered)
    assert imported(service.ls) == {i: 1 for i in range(1, 31) if i not in answered}


def test_without_a_key_retrieve_predictions_behaves_as_before(tmp_path, caplog):
    from fakes import FakeLoader
    from servers import ImageServer
    from test_api import png, predict_payload

    from _wsgi import create_backend_app

    with ImageServer({"/plain/a.png": png(8, 8)}) as images:
        app = create_backend_app({"DATA_DIR": str(tmp_path), "PREDICT_TIME_BUDGET": "0.0001"}, loader=FakeLoader())
        tasks = [{"id": i, "data": {"image": f"{images.url}/plain/a.png"}} for i in (1, 2, 3)]
        results = app.test_client().post("/predict", json=predict_payload(tasks, None)).json["results"]
    assert results[0]["result"] and results[1:] == [[], []]
    assert "no Label Studio URL and key" in caplog.text
    assert app.test_client().get("/jobs").json["jobs"] == []


def test_with_basic_auth_jobs_need_it_and_the_key_comes_in_its_own_header(tmp_path):
    import base64

    from fakes import FakeLoader

    from _wsgi import create_backend_app

    with FakeLabelStudio(GUIDE_CONFIG, {1: {"image": "x"}}) as ls:
        app = create_backend_app({"DATA_DIR": str(tmp_path), "LABEL_STUDIO_URL": ls.url, "BASIC_AUTH_USER": "ml",
                                  "BASIC_AUTH_PASS": "secret"}, loader=FakeLoader())
        client = app.test_client()
        body = {"project": 1, "prompt": "cats", "all": True}
        basic = {"Authorization": "Basic " + base64.b64encode(b"ml:secret").decode()}
        assert client.post("/jobs", json=body, headers={"Authorization": f"Token {ls.token}"}).status_code == 401
        assert client.get("/jobs").status_code == 401
        no_key = client.post("/jobs", json=body, headers=basic)
        assert no_key.status_code == 401 and "X-Label-Studio-Key" in no_key.json["error"]
        ok = client.post("/jobs", json=body, headers={**basic, "X-Label-Studio-Key": ls.token})
        assert ok.status_code == 201, ok.json
        assert client.delete(f"/jobs/{ok.json['id']}", headers={**basic, "X-Label-Studio-Key": ls.token}
                             ).status_code == 200


def test_job_params_keep_the_projects_cleanup_and_everything_across_a_resume():
    from everything import EverythingParams
    from masks import CleanupParams

    p = params(cleanup=CleanupParams(min_area=40, smooth=2), everything=EverythingParams(points_per_side=8),
               prompt="*_cats")
    again = JobParams.from_json(json.loads(json.dumps(p.to_json())))
    assert again == p
    older = {**p.to_json(), "only_missing": True}  # stored before skipping became the default
    del older["redo"], older["import_wait"], older["chunk_max"]
    assert JobParams.from_json(older) == p
    config, query = again.query()
    assert query.cleanup == CleanupParams(40, 2) and query.everything.points_per_side == 8
    assert [ph.label for ph in query.phrases] == ["cats"]


def test_in_batches_builds_one_batch_while_the_next_batchs_passes_run():
    """Batch n's host work runs on a thread during batch n + 1's passes (the passes wait to see it start), its
    outcomes are handed on before those passes end (the first batch's import need not wait for the second's
    passes), no more than `overlap` batches wait for theirs when a batch's passes begin, and outcomes come in task
    order."""
    started = {}  # batch number -> set when its host work starts
    waiting_at_pass, building, lock = [], set(), threading.Lock()
    first_handed_on = threading.Event()

    def predict(batch):
        number = batch[0]["id"] // 3
        with lock:
            waiting_at_pass.append(len(building))
        if number > 0:
            assert started[number - 1].wait(5), "the previous batch's host work did not start during these passes"
        if number == 1:
            assert first_handed_on.wait(5), "the first batch's outcomes waited for the second batch's passes"
        started[number] = threading.Event()
        with lock:
            building.add(number)

        def finish():
            started[number].set()
            time.sleep(0.02)
            with lock:
                building.discard(number)
            return [TaskOutcome(task["id"], prediction={"result": [], "score": 0.0, "model_version": "v"})
                    for task in batch]

        return finish

    pairs = []
    for task, outcome in in_batches(predict, 3, overlap=1)(iter([{"id": i} for i in range(11)])):
        pairs.append((task, outcome))
        if task["id"] == 2:
            first_handed_on.set()
    assert [task["id"] for task, _ in pairs] == [outcome.task_id for _, outcome in pairs] == list(range(11))
    assert max(waiting_at_pass) <= 1 and not building
    in_line = in_batches(lambda batch: [TaskOutcome(t["id"]) for t in batch], 4)
    plain = list(in_line(iter([{"id": i} for i in range(5)])))
    assert [outcome.task_id for _, outcome in plain] == list(range(5))
