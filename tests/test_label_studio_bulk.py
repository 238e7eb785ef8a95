"""Pre-annotating a whole project against the real Label Studio 1.23.2 of the e2e suite: one Retrieve Predictions
(the tasks past PREDICT_TIME_BUDGET go to a background job whose predictions land while it runs), `cli.py annotate
--only-missing` on the same project, a second job that skips what is there and a redo that replaces it, a CLI job
killed with SIGKILL and resumed, a broken image recorded as failed, and a click answered while a job runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from label_studio_harness import (
    LS_TOKEN,
    MODEL_VERSION,
    LabelStudio,
    StaticServer,
    labels_of,
    start_backend,
    stop_all,
    wait_models,
    write_artifact,
)
from model_factory import make_image, service_env
from test_e2e_gunicorn import encode
from test_label_studio import SMART_CONFIG, smart_keypoint

pytest_plugins = ["label_studio_harness"]
pytestmark = pytest.mark.label_studio

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "round thing_cats. box_house"
N_TASKS = 12  # the last one's image is broken
KILLED_TASKS = 6  # the project killed with SIGKILL, then done again on Ray
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def pictures():
    files = {f"/bulk/{i}.png": encode(make_image(96, 32, seed=100 + i), "PNG") for i in range(N_TASKS)}
    files[f"/bulk/{N_TASKS - 1}.png"] = b"this is not a picture"
    server = StaticServer(files)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def bulk_backend(label_studio: LabelStudio, groundingdino_files, mobile_sam_checkpoint, tmp_path_factory):
    """A backend whose budget answers a few tasks per /predict, so one Retrieve Predictions needs the job. Its chunk
    (JOB_CHUNK_SIZE, 50) is larger than the job: its predictions go out on time (JOB_IMPORT_WAIT)."""
    backend = start_backend("grounded-sam-bulk", groundingdino_files, mobile_sam_checkpoint, label_studio.url,
                            LS_TOKEN, tmp_path_factory.mktemp("bulk-backend-data"), PREDICT_TIME_BUDGET="2",
                            JOB_IMPORT_WAIT="0.5")
    try:
        wait_models(backend)
        yield backend
    finally:
        stop_all([backend.process])


def make_project(ls: LabelStudio, pictures: StaticServer, title: str, count: int = N_TASKS) -> tuple[int, list[int]]:
    pid = ls.create_project(title)
    ls.import_urls(pid, [f"{pictures.url}/bulk/{i}.png" for i in range(count)])
    return pid, [t["id"] for t in ls.tasks(pid)]


def ours(ls: LabelStudio, task: int) -> list[dict]:
    return [p for p in ls.predictions(task) if p["model_version"] == MODEL_VERSION]


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


def project_predictions(ls: LabelStudio, pid: int) -> list[dict]:
    """Our predictions in the project, in one request."""
    return [p for p in ls.json("GET", "/api/predictions/", params={"project": pid})
            if p["model_version"] == MODEL_VERSION]


@pytest.fixture(scope="module")
def retrieved(label_studio: LabelStudio, bulk_backend, pictures):
    """A project pre-annotated by ONE Retrieve Predictions; how many of the job's predictions Label Studio held
    while the job was still running (Label Studio asked first, then the job)."""
    ls = label_studio
    pid, tasks = make_project(ls, pictures, "Grounded SAM bulk")
    ml = ls.connect_backend(pid, bulk_backend.url, {"prompt": PROMPT})
    assert ml["state"] == "CO", ml
    started = time.perf_counter()
    ls.retrieve_predictions(pid)
    TIMINGS["retrieve_answer_s"] = round(time.perf_counter() - started, 2)
    answered = [t for t in tasks if ours(ls, t)]
    (job,) = requests.get(bulk_backend.url + "/jobs", timeout=5).json()["jobs"]
    landed_while_running = [0]

    def finished():
        landed = sum(1 for p in project_predictions(ls, pid) if p["task"] not in answered)
        status = requests.get(f"{bulk_backend.url}/jobs/{job['id']}", timeout=5).json()
        if status["state"] not in ("queued", "running"):
            return status
        if landed and not landed_while_running[0]:
            landed_while_running[0] = landed
            TIMINGS["first_job_predictions_s"] = round(time.perf_counter() - started, 2)
        return None

    status = wait_for(finished, 600, "the background job")
    TIMINGS["all_predicted_s"] = round(time.perf_counter() - started, 2)
    write_artifact("bulk-timings.json", TIMINGS)
    return pid, tasks, answered, status, landed_while_running[0]


def test_one_retrieve_predictions_pre_annotates_the_whole_project(label_studio: LabelStudio, retrieved):
    ls = label_studio
    pid, tasks, answered, status, landed_while_running = retrieved
    assert 0 < len(answered) < N_TASKS - 1, answered  # the budget answered a few, the job the others
    assert status["state"] == "done", status
    for task in tasks[:-1]:
        predictions = ours(ls, task)
        assert len(predictions) == 1, (task, predictions)
        assert predictions[0]["result"] and labels_of(predictions[0]["result"]) <= {"cats", "house"}
    assert status["counts"]["done"] + len(answered) == N_TASKS - 1


def test_the_jobs_first_predictions_land_while_it_runs(retrieved):
    """The job's chunk (50) is larger than the job: its predictions went out on time, not all at its end."""
    *_, status, landed_while_running = retrieved
    assert 0 < landed_while_running < status["counts"]["done"], (landed_while_running, status["counts"], TIMINGS)


def test_a_broken_image_is_recorded_as_failed_and_the_others_complete(label_studio: LabelStudio, retrieved):
    pid, tasks, answered, status, _ = retrieved
    assert status["counts"]["failed"] == 1
    (failure,) = status["recent_failures"]
    assert failure["task"] == tasks[-1] and failure["kind"] == "undecodable"
    assert ours(label_studio, tasks[-1]) == []


def cli(env: dict, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "annotate", *args], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def cli_env(label_studio: LabelStudio, groundingdino_files, mobile_sam_checkpoint, tmp_path_factory):
    return {**os.environ, **service_env(groundingdino_files, mobile_sam_checkpoint), "HF_HUB_OFFLINE": "1",
            "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": LS_TOKEN,
            "DATA_DIR": str(tmp_path_factory.mktemp("cli-data"))}


def test_cli_only_missing_on_the_same_project(label_studio: LabelStudio, retrieved, cli_env):
    ls = label_studio
    pid, tasks, *_ = retrieved
    removed = ls.delete_predictions(tasks[:3])
    assert removed == 3
    proc = cli(cli_env, "--project", str(pid), "--prompt", PROMPT, "--only-missing")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert f"3 done, 1 failed, {N_TASKS - 4} skipped" in err, err
    for task in tasks[:-1]:
        assert len(ours(ls, task)) == 1, task


def test_a_second_job_skips_the_predicted_tasks_and_redo_replaces_a_prediction(label_studio: LabelStudio,
                                                                                retrieved, bulk_backend):
    ls = label_studio
    pid, tasks, *_ = retrieved
    before = {p["task"]: p["id"] for p in project_predictions(ls, pid)}
    assert len(before) == N_TASKS - 1

    def job(**body) -> dict:
        response = requests.post(bulk_backend.url + "/jobs", headers={"Authorization": f"Token {LS_TOKEN}"},
                                 json={"project": pid, "prompt": PROMPT, **body}, timeout=60)
        assert response.status_code == 201, response.text

        def ended():
            status = requests.get(f"{bulk_backend.url}/jobs/{response.json()['id']}", timeout=5).json()
            return status if status["state"] not in ("queued", "running") else None

        return wait_for(ended, 300, "a job")

    status = job(all=True)
    assert status["state"] == "done" and status["counts"]["skipped"] == N_TASKS - 1, status
    status = job(tasks=tasks[:2], redo=True)
    assert status["state"] == "done" and status["counts"]["done"] == 2, status
    after = project_predictions(ls, pid)
    assert sorted(p["task"] for p in after) == sorted(before)  # one each, never two
    replaced = {p["task"]: p["id"] for p in after}
    assert all(replaced[t] != before[t] for t in tasks[:2]) and all(replaced[t] == before[t] for t in tasks[2:-1])


@pytest.fixture(scope="module")
def killed_and_resumed(label_studio: LabelStudio, pictures, cli_env):
    """A 6-task project pre-annotated by `cli.py annotate`, killed with SIGKILL after two chunks and resumed.
    One torch thread (OMP_NUM_THREADS=1) and one image per encoder pass (BATCH_SIZE=1), as each Ray actor below:
    its regions are the Ray test's reference, to the bit."""
    ls = label_studio
    env = {**cli_env, "OMP_NUM_THREADS": "1", "BATCH_SIZE": "1"}  # and one image per pass, as each actor
    pid, tasks = make_project(ls, pictures, "Grounded SAM bulk kill", count=KILLED_TASKS)
    proc = cli(env, "--project", str(pid), "--prompt", PROMPT, "--chunk-size", "2")
    wait_for(lambda: sum(len(ours(ls, t)) for t in tasks) >= 4 or proc.poll() is not None, 600, "two chunks")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    before = sum(len(ours(ls, t)) for t in tasks)
    job_id = subprocess.run([sys.executable, "-c", "import sys; from store import JobStore; "
                             f"print(JobStore({cli_env['DATA_DIR']!r}).jobs()[0])"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60).stdout.strip()
    resumed = cli(env, "--resume", job_id)
    _, err = resumed.communicate(timeout=600)
    return tasks, proc.returncode, before, resumed.returncode, err


def test_cli_job_killed_with_sigkill_resumes_without_duplicates(label_studio: LabelStudio, killed_and_resumed):
    tasks, killed_rc, before, resumed_rc, err = killed_and_resumed
    assert killed_rc == -signal.SIGKILL and 4 <= before < KILLED_TASKS  # two chunks of 2 in, the third not
    assert resumed_rc == 0, err
    assert [len(ours(label_studio, t)) for t in tasks] == [1] * KILLED_TASKS, err


def test_ray_actors_give_the_in_process_regions_and_survive_a_killed_actor(
        label_studio: LabelStudio, pictures, killed_and_resumed, groundingdino_files, mobile_sam_checkpoint,
        tmp_path):
    """The same 6 pictures on a local Ray cluster of two single-threaded actors, one of them killed once the
    first chunk is in: the regions of the in-process job above, bit for bit, and one prediction per task.
    (`cli.py annotate --ray local` itself: tests/test_ray.py.)"""
    ray = pytest.importorskip("ray")
    import threading

    from config import Settings
    from jobs import BulkJob, JobParams
    from ls_client import Connection, LabelStudioClient, LabelStudioProject, Selection
    from pipeline import DetectionParams
    from ray_executor import RayExecutor, RayOptions
    from store import JobStore

    ls = label_studio
    in_process = [regions_of(only(ours(ls, t))) for t in killed_and_resumed[0]]
    rpid, rtasks = make_project(ls, pictures, "Grounded SAM bulk on Ray", count=KILLED_TASKS)
    settings = Settings.from_env(service_env(groundingdino_files, mobile_sam_checkpoint))
    connection = Connection(ls.url, LS_TOKEN)
    client = LabelStudioClient(settings).sdk(connection)
    params = JobParams(rpid, PROMPT, DetectionParams(settings.box_threshold, settings.text_threshold,
                                                     settings.max_detections), Selection(), False,
                       settings.model_version, client.projects.get(id=rpid).label_config, chunk_size=2)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with RayExecutor(settings, params, connection, RayOptions(actors=2, threads=1, batch_size=1)) as ex:
            first = ray.get(ex.actors[0].pid.remote())
            killed = []

            def kill_one():
                while sum(len(ours(ls, t)) for t in rtasks) < 2:
                    time.sleep(0.2)
                ray.kill(ex.actors[0], no_restart=False)
                killed.append(True)

            threading.Thread(target=kill_one, daemon=True).start()
            report = BulkJob.create(JobStore(str(tmp_path)), params, project=LabelStudioProject(client, rpid),
                                    executor=ex).run()
            assert killed and ray.get(ex.actors[0].pid.remote()) != first  # restarted in a new process
    finally:
        ray.shutdown()
    assert report.state == "done" and report.counts["done"] == KILLED_TASKS, report
    assert [regions_of(only(ours(ls, t))) for t in rtasks] == in_process


def test_a_click_is_answered_while_a_job_runs(label_studio: LabelStudio, bulk_backend, pictures):
    ls = label_studio
    bulk_pid, bulk_tasks = make_project(ls, pictures, "Grounded SAM bulk while clicking")
    pid = ls.create_project("Grounded SAM click during job", SMART_CONFIG)
    ls.import_urls(pid, [f"{pictures.url}/bulk/0.png"])
    (task,) = ls.tasks(pid)
    ml = ls.connect_backend(pid, bulk_backend.url, {})
    idle_answer, idle_s = ls.interactive(ml["id"], task["id"], {"result": [smart_keypoint(30, 40, (96, 32))]})
    response = requests.post(bulk_backend.url + "/jobs", headers={"Authorization": f"Token {LS_TOKEN}"},
                             json={"project": bulk_pid, "prompt": PROMPT, "all": True}, timeout=30)
    assert response.status_code == 201, response.text
    job = response.json()
    wait_for(lambda: requests.get(f"{bulk_backend.url}/jobs/{job['id']}", timeout=5).json()["state"] == "running",
             60, "the job to start")
    answer, busy_s = ls.interactive(ml["id"], task["id"], {"result": [smart_keypoint(60, 40, (96, 32))]})
    state = requests.get(f"{bulk_backend.url}/jobs/{job['id']}", timeout=5).json()
    assert state["state"] == "running", state  # the click came while the job was working
    (region,) = answer["data"]["result"]
    assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["cats"]
    TIMINGS.update(click_idle_s=round(idle_s, 3), click_during_job_s=round(busy_s, 3))
    write_artifact("bulk-timings.json", TIMINGS)
    requests.delete(f"{bulk_backend.url}/jobs/{job['id']}", headers={"Authorization": f"Token {LS_TOKEN}"},
                    timeout=30)
    assert idle_answer["data"]["result"]


def regions_of(prediction: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "id"} for r in prediction["result"]]


def only(predictions: list[dict]) -> dict:
    assert len(predictions) == 1, predictions
    return predictions[0]
