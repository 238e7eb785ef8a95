"""The bulk job on a local Ray cluster (two CPU actors, the generated test models) against the loopback imitation of
Label Studio: the same regions as the in-process job, and an actor killed mid-job loses and doubles nothing. The
same against the real Label Studio is in tests/test_label_studio_bulk.py."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from fake_label_studio import FakeLabelStudio
from model_factory import make_image, service_env
from servers import ImageServer
from test_e2e_gunicorn import encode
from test_labeling import GUIDE_CONFIG

from config import Settings
from images import ImageLoader
from jobs import BulkJob, JobParams, LabelStudioProject, Selection
from labeling import parse_label_config
from loader import build_models
from ls_client import Connection, LabelStudioClient
from pipeline import DetectionParams, Pipeline, TextQuery
from prompts import require_phrases
from store import JobStore

ray = pytest.importorskip("ray")  # requirements-ray.txt: make install installs it
PROMPT = "round thing_cats. box_house"


@pytest.fixture(scope="module")
def project():
    files = {f"/r/{i}.png": encode(make_image(64, 48, seed=200 + i), "PNG") for i in range(10)}
    with ImageServer(files) as images:
        tasks = {i + 1: {"image": f"{images.url}/r/{i}.png"} for i in range(10)}
        with FakeLabelStudio(GUIDE_CONFIG, tasks) as ls:
            yield ls


@pytest.fixture(scope="module")
def settings(groundingdino_files, mobile_sam_checkpoint):
    return Settings.from_env(service_env(groundingdino_files, mobile_sam_checkpoint))


def params(settings):
    return JobParams(1, PROMPT, DetectionParams(0.3, 0.25, 5), Selection(), False, settings.model_version,
                     GUIDE_CONFIG, chunk_size=3)


def regions_by_task(ls) -> dict[int, list]:
    return {p["task"]: [{k: v for k, v in r.items() if k != "id"} for r in p["result"]] for p in ls.predictions}


def test_ray_actors_give_the_in_process_regions_and_survive_a_killed_actor(project, settings, tmp_path):
    from ray_executor import RayExecutor, RayOptions

    ls = project
    connection = Connection(ls.url, ls.token)
    client = LabelStudioClient(settings).sdk(connection)
    p = params(settings)
    config = parse_label_config(GUIDE_CONFIG)
    query = TextQuery(require_phrases(PROMPT, config.labels).phrases, p.detection)
    pipeline = Pipeline(build_models(settings), settings, ImageLoader(settings))
    store = JobStore(str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each actor (threads=1): the same float reduction order, the same bits
    try:
        local = BulkJob.create(store, p, project=LabelStudioProject(client, 1),
                               predict=lambda t: pipeline.predict_task(t, config, query, ls.url, ls.token)).run()
    finally:
        torch.set_num_threads(threads)
    assert local.state == "done" and local.counts["done"] == 10
    in_process = regions_by_task(ls)
    ls.predictions.clear()

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with RayExecutor(settings, p, connection, RayOptions(actors=2, threads=1, batch_size=1, in_flight=2)) as ex:
            pids = ray.get([a.pid.remote() for a in ex.actors])
            killed = []

            def kill_one():  # once the first chunk is in, kill an actor (Ray restarts it and retries its calls)
                while len(ls.predictions) < 3:
                    time.sleep(0.05)
                ray.kill(ex.actors[0], no_restart=False)
                killed.append(time.monotonic())

            killer = threading.Thread(target=kill_one, daemon=True)
            killer.start()
            report = BulkJob.create(store, p, project=LabelStudioProject(client, 1), executor=ex).run()
            killer.join(60)
            assert killed, "the actor was not killed"
            assert ray.get(ex.actors[0].pid.remote()) not in pids  # a new process took its place
    finally:
        ray.shutdown()
    assert report.state == "done" and report.counts["done"] == 10, report
    counts = {}
    for prediction in ls.predictions:
        counts[prediction["task"]] = counts.get(prediction["task"], 0) + 1
    assert counts == {i: 1 for i in range(1, 11)}
    assert regions_by_task(ls) == in_process
