"""The bulk job against a loopback imitation of Label Studio's REST API (tests/fake_label_studio.py), with a fake
predictor: paging, chunked imports, skips, failures, resume after an interrupted import, pauses when Label Studio
is down, the jobs routes. The real Label Studio runs these paths in tests/test_label_studio.py."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fake_label_studio import FakeLabelStudio
from test_labeling import GUIDE_CONFIG

from config import Settings
from errors import LabelStudioNotFound, LabelStudioRefused, ParamsError
from jobs import BulkJob, Foreground, JobParams, in_batches, job_status, parse_task_ranges
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


def project(ls, retries=2):
    client = LabelStudioClient(Settings()).sdk(Connection(ls.url, ls.token))
    return LabelStudioProject(client, 1, retries=retries, backoff=0.01)


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
    job = BulkJob.create(store, params(), project=project(ls), predict=predict_ok)
    report = job.run()
    assert report.state == "done"
    assert report.counts == {"pending": 0, "importing": 0, "done": 249, "failed": 1, "skipped": 0}
    assert report.failures == [{"task": 7, "kind": "undecodable", "reason": "not a recognised image format"}]
    assert imported(ls) == {i: 1 for i in range(1, 251) if i != 7}
    assert all(p["model_version"] == MV and p["result"] for p in ls.predictions)
    imports = [path for method, path in ls.requests if method == "POST"]
    assert len(imports) == 7  # 249 predictions in chunks of 40
    pages = [path for method, path in ls.requests if path.startswith("/api/tasks/")]
    assert len(pages) == 3  # 100 + 100 + 50: the last page is short, nothing more is asked


def test_a_selection_and_only_missing(ls, store):
    ls.predictions.append({"task": 3, "model_version": MV, "result": [], "created_at": "2020-01-01T00:00:00Z"})
    ls.predictions.append({"task": 4, "model_version": "other", "result": [], "created_at": "2020-01-01T00:00:00Z"})
    job = BulkJob.create(store, params(selection=Selection(task_ids=parse_task_ranges("2-5")), only_missing=True),
                         project=project(ls), predict=predict_ok)
    report = job.run()
    assert report.counts["done"] == 3 and report.counts["skipped"] == 1
    assert imported(ls) == {2: 1, 3: 1, 4: 2, 5: 1}


def test_resume_after_an_interrupted_import_doubles_nothing(ls, store):
    """The process dies after chunk 2 went out but before its 'done' was written: the resumed job asks Label
    Studio, counts the chunk as landed, and predicts only what had not been predicted."""
    p = params(selection=Selection(task_ids=tuple(range(1, 101))), chunk_size=10)
    job = BulkJob.create(store, p, project=project(ls), predict=predict_ok)
    calls = []

    def dying(task):
        calls.append(task["id"])
        if len(calls) == 25:
            raise KeyboardInterrupt  # stands in for SIGKILL at a task boundary
        return predict_ok(task)

    real_record = store.record
    chunks = []

    def record(job_id, rows):
        rows = list(rows)
        if rows and rows[0][1] == "done" and rows[0][4] == 2:
            chunks.append(2)
            raise KeyboardInterrupt  # killed between the import and the bookkeeping
        real_record(job_id, rows)

    store.record = record
    with pytest.raises(KeyboardInterrupt):
        BulkJob(job.job_id, p, store, project(ls), dying).run()
    store.record = real_record
    assert chunks == [2] and len(store.tasks_in(job.job_id, "importing")) == 10
    report = BulkJob(job.job_id, p, store, project(ls), predict_ok).run()
    assert report.state == "done" and report.counts["done"] == 99 and report.counts["failed"] == 1
    assert imported(ls) == {i: 1 for i in range(1, 101) if i != 7}


def test_label_studio_down_pauses_the_job_and_resume_loses_nothing(ls, store):
    p = params(selection=Selection(task_ids=tuple(range(1, 61))), chunk_size=20)
    job = BulkJob.create(store, p, project=project(ls, retries=1), predict=predict_ok)
    done = []

    def predict_then_fail(task):
        done.append(task["id"])
        if len(done) == 30:
            ls.fail_next = 100  # Label Studio goes down: the next import fails every retry
        return predict_ok(task)

    report = BulkJob(job.job_id, p, store, project(ls, retries=1), predict_then_fail).run()
    assert report.state == "paused" and "unavailable after 2 attempts" in report.reason
    status = job_status(store, job.job_id)
    assert status["state"] == "paused" and status["counts"]["done"] == 20
    ls.fail_next = 0
    report = BulkJob(job.job_id, p, store, project(ls), predict_ok).run()
    assert report.state == "done" and imported(ls) == {i: 1 for i in range(1, 61) if i != 7}


def test_a_stop_ends_after_the_chunk_in_flight(ls, store):
    stop = threading.Event()
    p = params(selection=Selection(task_ids=tuple(range(1, 51))), chunk_size=10)

    def predict(task):
        if task["id"] == 15:
            stop.set()
        return predict_ok(task)

    report = BulkJob.create(store, p, project=project(ls), predict=predict, stop=stop).run()
    assert report.state == "stopped" and sorted(imported(ls)) == [i for i in range(1, 16) if i != 7]


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
        project(ls).__class__(project(ls).client, 99, retries=0).label_config()


def test_foreground_requests_hold_the_background_job_back():
    gate = Foreground()
    order = []
    with gate.request():
        worker = threading.Thread(target=lambda: (gate.wait_turn(), order.append("job")))
        worker.start()
        time.sleep(0.2)
        order.append("click")
    worker.join(5)
    assert order == ["click", "job"]


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
    metrics = service.get("/metrics").json
    assert metrics["jobs_submitted"] == 1 and metrics["jobs_done"] == 1 and metrics["job_tasks_done"] == 12


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
    ],
)
def test_bad_job_requests_are_4xx_naming_the_problem(service, body, headers, status, message):
    headers = {"Authorization": f"Token {service.ls.token}"} if headers is None else headers
    response = service.post("/jobs", json=body, headers=headers)
    assert response.status_code == status and message in response.json["error"], response.json
    assert service.get("/jobs").json["jobs"] == []


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
    config, query = again.query()
    assert query.cleanup == CleanupParams(40, 2) and query.everything.points_per_side == 8
    assert [ph.label for ph in query.phrases] == ["cats"]


def test_in_batches_builds_one_batch_while_the_next_batchs_passes_run():
    """Batch n's host work runs on a thread during batch n + 1's passes (the passes wait to see it start), no more
    than `overlap` batches wait for theirs when a batch's passes begin, and outcomes come in task order."""
    started = {}  # batch number -> set when its host work starts
    waiting_at_pass, building, lock = [], set(), threading.Lock()

    def predict(batch):
        number = batch[0]["id"] // 3
        with lock:
            waiting_at_pass.append(len(building))
        if number > 0:
            assert started[number - 1].wait(5), "the previous batch's host work did not start during these passes"
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

    pairs = list(in_batches(predict, 3, overlap=1)(iter([{"id": i} for i in range(11)])))
    assert [task["id"] for task, _ in pairs] == [outcome.task_id for _, outcome in pairs] == list(range(11))
    assert max(waiting_at_pass) <= 1 and not building
    in_line = in_batches(lambda batch: [TaskOutcome(t["id"]) for t in batch], 4)
    plain = list(in_line(iter([{"id": i} for i in range(5)])))
    assert [outcome.task_id for _, outcome in plain] == list(range(5))
