"""Bulk pre-annotation against a real Label Studio 1.23.2 (the e2e suite's, tests/label_studio_harness.py), with
the small random-weight test models, and the driver's memory against a loopback imitation of Label Studio:

  job overhead      wall time of a background job against the sum of its tasks' pipeline times (target <= 10 %)
  the sync way      Retrieve Predictions clicked again and again (BACKGROUND_PREDICTIONS=false) until every task
                    holds a prediction: how many clicks and how long, against ONE click plus the background job,
                    both under the same PREDICT_TIME_BUDGET
  clicks            a smart click's latency while a job runs against an idle click (target <= 2x + one model pass)
  import rate       predictions per second a job imports when its model time is negligible (a stub predictor),
                    against the real Label Studio: now (imports beside the predicting, chunks growing from
                    JOB_CHUNK_SIZE to JOB_CHUNK_MAX), with chunks held at 50, and before (jobs.py of --before,
                    loaded from git: fixed chunks of 50 imported in line), in the same run
  listing memory    peak RSS of a process paging through 10,000 and 100,000 tasks (LabelStudioProject.tasks,
                    streamed), against collecting the same listing into a list first
  Ray               tasks per second of the same job in-process (one worker, two torch threads) and on a local Ray
                    cluster with two single-threaded actors, and Ray's overhead per task (against the imitation)

    .venv/bin/python benchmarks/bench_bulk.py [--tasks 200] [--budget 10] [--clicks 5] [--ray-tasks 40]
                                              [--rate-tasks 2000] [--before 25a3cc2] [--rate-only]
                                              [--skip-label-studio] [--skip-ray]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import requests  # noqa: E402
from label_studio_harness import (  # noqa: E402
    LS_TOKEN,
    MODEL_VERSION,
    StaticServer,
    start_backend,
    start_label_studio,
    stop_all,
    wait_label_studio,
    wait_models,
)
from model_factory import make_groundingdino, make_image, make_mobile_sam, make_text_encoder  # noqa: E402
from test_e2e_gunicorn import encode  # noqa: E402
from test_label_studio import SMART_CONFIG, smart_keypoint  # noqa: E402

from logs import silence_third_party_warnings  # noqa: E402

PROMPT = "round thing_cats. box_house"


def predicted(ls, tasks) -> int:
    return sum(1 for t in tasks if any(p["model_version"] == MODEL_VERSION for p in ls.predictions(t)))


def project(ls, pictures, title, count):
    pid = ls.create_project(title)
    ls.import_urls(pid, [f"{pictures.url}/bulk/{i}.png" for i in range(count)])
    return pid, [t["id"] for t in ls.tasks(pid)] if count <= 100 else all_task_ids(ls, pid)


def all_task_ids(ls, pid):
    ids, page = [], 1
    while True:
        response = ls.api("GET", "/api/tasks/", params={"project": pid, "page": page, "page_size": 100},
                          expect=(200, 404))
        tasks = response.json()["tasks"] if response.status_code == 200 else []
        ids += [t["id"] for t in tasks]
        if len(tasks) < 100:
            return ids
        page += 1


def listing_rss(count: int, collect: bool) -> float:
    """Peak RSS (MiB) of a fresh process listing `count` tasks from the imitation, streamed or collected."""
    code = f"""
import sys
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
from fake_label_studio import FakeLabelStudio
from config import Settings
from ls_client import Connection, LabelStudioClient, LabelStudioProject, Selection
def source(page, size):
    first = (page - 1) * size + 1
    return [{{"id": i, "data": {{"image": f"/data/upload/1/{{i:08d}}-picture.png", "caption": "x" * 200}},
             "annotations": [], "predictions": []}} for i in range(first, min(first + size, {count} + 1))]
with FakeLabelStudio("<View/>", task_source=source) as ls:
    project = LabelStudioProject(LabelStudioClient(Settings()).sdk(Connection(ls.url, ls.token)), 1)
    tasks = project.tasks(Selection())
    n = len(list(tasks)) if {collect} else sum(1 for _ in tasks)
    assert n == {count}, n
# VmHWM, not ru_maxrss: the latter can report the parent's size at fork time.
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(int(status["VmHWM"].split()[0]) / 1024)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise SystemExit(done.stderr)
    return float(done.stdout.strip().splitlines()[-1])


def ray_figures(count: int, work: Path) -> None:
    """In-process (2 threads) against Ray (2 actors x 1 thread) on the same `count` tasks of the imitation."""
    import ray
    import torch
    from fake_label_studio import FakeLabelStudio
    from servers import ImageServer
    from test_labeling import GUIDE_CONFIG

    from config import Settings
    from images import ImageLoader
    from jobs import BulkJob, JobParams
    from labeling import parse_label_config
    from loader import build_models
    from ls_client import Connection, LabelStudioClient, LabelStudioProject, Selection
    from pipeline import DetectionParams, Pipeline, TextQuery
    from prompts import require_phrases
    from ray_executor import RayExecutor, RayOptions
    from store import JobStore

    bert = make_text_encoder(work / "ray-bert")
    config_path, checkpoint, _ = make_groundingdino(work / "ray-gd", text_encoder_dir=bert)
    env = {"GROUNDINGDINO_CONFIG": str(config_path), "GROUNDINGDINO_CHECKPOINT": str(checkpoint),
           "GROUNDINGDINO_TEXT_ENCODER": str(bert), "MOBILESAM_CHECKPOINT": str(make_mobile_sam(work / "ms.pt")),
           "MAX_DETECTIONS": "5", "DEVICE": "cpu"}
    settings = Settings.from_env(env)
    files = {f"/r/{i}.png": encode(make_image(96, 32, seed=300 + i), "PNG") for i in range(count)}
    with ImageServer(files) as images, FakeLabelStudio(GUIDE_CONFIG, {
            i + 1: {"image": f"{images.url}/r/{i}.png"} for i in range(count)}) as ls:
        connection = Connection(ls.url, ls.token)
        client = LabelStudioClient(settings).sdk(connection)
        params = JobParams(1, PROMPT, DetectionParams(0.3, 0.25, 5), Selection(), False, settings.model_version,
                           GUIDE_CONFIG)
        config = parse_label_config(GUIDE_CONFIG)
        query = TextQuery(require_phrases(PROMPT, config.labels).phrases, params.detection)
        store = JobStore(str(work / "ray-store"))
        torch.set_num_threads(2)
        pipeline = Pipeline(build_models(settings), settings, ImageLoader(settings))
        started = time.perf_counter()
        local = BulkJob.create(store, params, project=LabelStudioProject(client, 1),
                               predict=lambda t: pipeline.predict_task(t, config, query, ls.url, ls.token)).run()
        local_s = time.perf_counter() - started
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            with RayExecutor(settings, params, connection, RayOptions(actors=2, threads=1, batch_size=2)) as ex:
                ray.get([a.pid.remote() for a in ex.actors])  # models loaded: time the job alone
                started = time.perf_counter()
                job = BulkJob.create(store, params, project=LabelStudioProject(client, 1), executor=ex)
                remote = job.run()
                ray_s = time.perf_counter() - started
                pipeline_s = store.seconds(job.job_id)
        finally:
            ray.shutdown()
    assert local.counts["done"] == remote.counts["done"] == count
    overhead = (ray_s * 2 - pipeline_s) / count
    print(f"\nRay, {count} tasks of the imitation (96x32 images, tiny random models, 2 CPU cores):")
    print(f"  in-process, 2 threads:        {count / local_s:.2f} tasks/s ({local_s:.1f} s)")
    print(f"  Ray, 2 actors x 1 thread:     {count / ray_s:.2f} tasks/s ({ray_s:.1f} s)")
    print(f"  Ray overhead per task:        {overhead * 1000:.0f} ms (2 x wall - the actors' pipeline seconds, "
          f"{pipeline_s:.1f} s, per task)")


BEFORE = "25a3cc2"  # main before bulk jobs imported beside their predicting (issue #22)


def jobs_at(commit: str):
    """jobs.py as it was at `commit`, as a module of its own (the rest of the code is today's)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:jobs.py"], capture_output=True, text=True,
                            check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="bench-bulk-before-")) / "jobs_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("jobs_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["jobs_before"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def import_rates(ls, pictures, count: int, before: str) -> dict:
    """Predictions/s imported into the real Label Studio by a job whose predictor takes no time, each way on a
    fresh project of `count` tasks; the imports' sizes."""
    from test_labeling import GUIDE_CONFIG

    import jobs
    from config import Settings
    from ls_client import Connection, LabelStudioClient, LabelStudioProject, Selection
    from pipeline import DetectionParams, TaskOutcome
    from store import JobStore

    class Counted(LabelStudioProject):
        """Each import's size, and the seconds spent in Label Studio's task listing and its imports."""

        def __init__(self, *args):
            super().__init__(*args)
            self.sizes, self.seconds = [], {"listing": 0.0, "import": 0.0}

        def import_predictions(self, predictions):
            self.sizes.append(len(predictions))
            return super().import_predictions(predictions)

        def _call(self, what, call):
            started = time.perf_counter()
            try:
                return super()._call(what, call)
            finally:
                kind = "listing" if "tasks page" in what else "import" if "import of" in what else None
                if kind:
                    self.seconds[kind] += time.perf_counter() - started

    result = [{"from_name": "label", "to_name": "image", "type": "rectanglelabels", "original_width": 96,
               "original_height": 32, "value": {"x": 10, "y": 10, "width": 30, "height": 40, "rotation": 0,
                                                "rectanglelabels": ["cats"]}, "score": 0.9}]

    def stub(task):
        return TaskOutcome(task["id"], prediction={"result": result, "score": 0.9, "model_version": "bench-stub"},
                           seconds=0.0)

    client = LabelStudioClient(Settings()).sdk(Connection(ls.url, LS_TOKEN))
    store = JobStore(tempfile.mkdtemp(prefix="bench-rate-"))
    ways = {"now": (jobs, {"chunk_size": 50, "chunk_max": 500}),
            "now, chunks held at 50": (jobs, {"chunk_size": 50, "chunk_max": 50}),
            f"before ({before})": (jobs_at(before), {"chunk_size": 50})}
    # Label Studio's own ceiling: the same predictions in chunks of 500, back to back, no listing, no job.
    pid, ids = project(ls, pictures, "bench import rate: ceiling", count)
    labels = Counted(client, pid)
    started = time.perf_counter()
    for start in range(0, count, 500):
        labels.import_predictions([{"task": t, **stub({"id": t}).prediction} for t in ids[start:start + 500]])
    import_s = time.perf_counter() - started
    rates = {"Label Studio alone, chunks of 500": count / import_s}
    print(f"  {'Label Studio alone, chunks of 500:':<36}{count / import_s:7.1f} predictions/s "
          f"({len(labels.sizes)} imports back to back, no listing, no job)")
    # A job lists its tasks too (pages of 100 with their predictions): the ceiling of a job is both, one after the
    # other, when Label Studio serves one request at a time.
    started = time.perf_counter()
    assert sum(1 for _ in labels.tasks(Selection())) == count
    listing_s = time.perf_counter() - started
    rates["Label Studio alone, listing and importing"] = count / (listing_s + import_s)
    print(f"  {'... and listing the tasks:':<36}{count / (listing_s + import_s):7.1f} predictions/s (listing "
          f"{listing_s:.1f} s + importing {import_s:.1f} s)")
    for way, (module, chunking) in ways.items():
        pid, _ = project(ls, pictures, f"bench import rate: {way}", count)
        labels = Counted(client, pid)
        params = module.JobParams(pid, PROMPT, DetectionParams(0.3, 0.25, 5), model_version="bench-stub",
                                  label_config=GUIDE_CONFIG, **chunking)
        started = time.perf_counter()
        report = module.BulkJob.create(store, params, project=labels, predict=stub).run()
        seconds = time.perf_counter() - started
        assert report.state == "done" and report.counts["done"] == count, report
        rates[way] = count / seconds
        print(f"  {way + ':':<36}{rates[way]:7.1f} predictions/s ({seconds:.1f} s; {len(labels.sizes)} imports, "
              f"largest {max(labels.sizes)}; in Label Studio's listing {labels.seconds['listing']:.1f} s, in its "
              f"imports {labels.seconds['import']:.1f} s, waits for each other included)")
    return rates


def rate_only(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-bulk-"))
    pictures = StaticServer({f"/bulk/{i}.png": encode(make_image(96, 32, seed=i), "PNG")
                             for i in range(args.rate_tasks)})
    (work / "ls").mkdir()
    ls = start_label_studio(work / "ls")
    try:
        wait_label_studio(ls)
        print(f"import rate: {args.rate_tasks} tasks, a stub predictor (no model time), the real Label Studio")
        import_rates(ls, pictures, args.rate_tasks, args.before)
    finally:
        stop_all([ls.process])
        pictures.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--budget", type=float, default=10.0, help="PREDICT_TIME_BUDGET of both backends")
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--ray-tasks", type=int, default=40)
    parser.add_argument("--rate-tasks", type=int, default=2000, help="tasks of each import-rate job (0: none)")
    parser.add_argument("--before", default=BEFORE, help="the commit whose jobs.py is the import rate's 'before'")
    parser.add_argument("--skip-label-studio", action="store_true", help="no Label Studio part")
    parser.add_argument("--skip-ray", action="store_true", help="no Ray part")
    parser.add_argument("--rate-only", action="store_true", help="only the import rate (Label Studio, no backend)")
    args = parser.parse_args()
    silence_third_party_warnings()
    if args.rate_only:
        return rate_only(args)
    print("listing memory (peak RSS of the listing process, MiB):")
    for count in (10_000, 100_000):
        streamed, collected = listing_rss(count, False), listing_rss(count, True)
        print(f"  {count:>7,} tasks: streamed {streamed:7.1f}   collected first {collected:7.1f}")
    work = Path(tempfile.mkdtemp(prefix="bench-bulk-"))
    if not args.skip_ray:
        ray_figures(args.ray_tasks, work)
    if args.skip_label_studio:
        return

    bert = make_text_encoder(work / "bert")
    files = make_groundingdino(work / "gd", text_encoder_dir=bert)
    mobile = make_mobile_sam(work / "mobile_sam.pt")
    pictures = StaticServer({f"/bulk/{i}.png": encode(make_image(96, 32, seed=i), "PNG")
                             for i in range(max(args.tasks, args.rate_tasks))})
    (work / "ls").mkdir()
    ls = start_label_studio(work / "ls")
    budget = {"PREDICT_TIME_BUDGET": str(args.budget)}
    sync = start_backend("bench-sync", files, mobile, ls.url, LS_TOKEN, work / "sync", BACKGROUND_PREDICTIONS="false",
                         **budget)
    click = start_backend("bench-one-click", files, mobile, ls.url, LS_TOKEN, work / "one-click", **budget)
    try:
        wait_label_studio(ls)
        wait_models(sync)
        wait_models(click)
        print(f"\n{args.tasks} tasks (96x32 URL images), PREDICT_TIME_BUDGET={args.budget:g} s, tiny random models")

        pid, tasks = project(ls, pictures, "bench sync", args.tasks)
        ls.connect_backend(pid, sync.url, {"prompt": PROMPT})
        started, clicks = time.perf_counter(), 0
        while predicted(ls, tasks) < len(tasks):
            ls.retrieve_predictions(pid)
            clicks += 1
        sync_s = time.perf_counter() - started

        pid, tasks = project(ls, pictures, "bench one click", args.tasks)
        ls.connect_backend(pid, click.url, {"prompt": PROMPT})
        started = time.perf_counter()
        ls.retrieve_predictions(pid)
        answer_s = time.perf_counter() - started
        (job,) = requests.get(click.url + "/jobs", timeout=10).json()["jobs"]
        while (status := requests.get(f"{click.url}/jobs/{job['id']}", timeout=10).json())["state"] == "running":
            time.sleep(0.5)
        one_click_s = time.perf_counter() - started
        assert predicted(ls, tasks) == len(tasks), "the job left tasks without a prediction"
        wall = status["updated"] - status["created"]
        overhead = (wall - status["pipeline_seconds"]) / wall
        per_task = status["pipeline_seconds"] / max(status["counts"]["done"], 1)
        print(f"  the sync way:   {clicks} Retrieve Predictions clicks, {sync_s:.1f} s until every task is predicted")
        print(f"  one click:      1 click (answered in {answer_s:.1f} s), {one_click_s:.1f} s until every task is "
              f"predicted; the job did {status['counts']['done']} tasks")
        print(f"  job overhead:   wall {wall:.1f} s, pipeline {status['pipeline_seconds']:.1f} s -> "
              f"{overhead * 100:.1f} % (target <= 10 %); {per_task:.3f} s per task")

        spid = ls.create_project("bench clicks", SMART_CONFIG)
        ls.import_urls(spid, [f"{pictures.url}/bulk/{i}.png" for i in range(args.clicks * 2)])
        stasks = [t["id"] for t in ls.tasks(spid)]
        ml = ls.connect_backend(spid, click.url, {})

        def click_once(task, x) -> float:
            answer, seconds = ls.interactive(ml["id"], task, {"result": [smart_keypoint(x, 40, (96, 32))]})
            assert answer["data"]["result"], answer
            return seconds

        idle = [click_once(t, 30) for t in stasks[:args.clicks]]
        bpid, _ = project(ls, pictures, "bench clicks background", args.tasks)
        headers = {"Authorization": f"Token {LS_TOKEN}"}
        job = requests.post(click.url + "/jobs", headers=headers, json={"project": bpid, "prompt": PROMPT,
                                                                          "all": True}, timeout=60).json()
        while requests.get(f"{click.url}/jobs/{job['id']}", timeout=10).json()["counts"]["done"] < 1:
            time.sleep(0.2)
        busy = [click_once(t, 30) for t in stasks[args.clicks:]]
        still = requests.get(f"{click.url}/jobs/{job['id']}", timeout=10).json()["state"]
        requests.delete(f"{click.url}/jobs/{job['id']}", headers=headers, timeout=60)
        idle_m, busy_m = statistics.median(idle), statistics.median(busy)
        print(f"  clicks:         idle {idle_m:.3f} s, during a job {busy_m:.3f} s (job {still}); target <= "
              f"2 x idle + one model pass = {2 * idle_m + per_task:.3f} s (medians of {args.clicks})")
        rates = {}
        if args.rate_tasks:
            print(f"\nimport rate: {args.rate_tasks} tasks, a stub predictor (no model time), the real Label Studio")
            rates = import_rates(ls, pictures, args.rate_tasks, args.before)
        (ROOT / "artifacts").mkdir(exist_ok=True)
        (ROOT / "artifacts" / "bench-bulk.json").write_text(json.dumps({
            "tasks": args.tasks, "budget_s": args.budget, "sync_clicks": clicks, "sync_s": sync_s,
            "one_click_s": one_click_s, "job_overhead": overhead, "click_idle_s": idle_m, "click_busy_s": busy_m,
            "import_rate_tasks": args.rate_tasks, "imported_per_s": rates}, indent=1))
    finally:
        stop_all([sync.process, click.process, ls.process])
        pictures.close()


if __name__ == "__main__":
    main()
