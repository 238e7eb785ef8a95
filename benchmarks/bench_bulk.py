"""Bulk pre-annotation against a real Label Studio 1.23.2 (the e2e suite's, tests/label_studio_harness.py), with
the small random-weight test models, and the driver's memory against a loopback imitation of Label Studio:

  job overhead      wall time of a background job against the sum of its tasks' pipeline times (target <= 10 %)
  the sync way      Retrieve Predictions clicked again and again (BACKGROUND_PREDICTIONS=false) until every task
                    holds a prediction: how many clicks and how long, against ONE click plus the background job,
                    both under the same PREDICT_TIME_BUDGET
  clicks            a smart click's latency while a job runs against an idle click (target <= 2x + one model pass)
  listing memory    peak RSS of a process paging through 10,000 and 100,000 tasks with LabelStudioProject.tasks
                    (streamed), against collecting the same listing into a list first

    .venv/bin/python benchmarks/bench_bulk.py [--tasks 200] [--budget 10] [--clicks 5]
"""

from __future__ import annotations

import argparse
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
from jobs import LabelStudioProject, Selection
from ls_client import Connection, LabelStudioClient
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--budget", type=float, default=10.0, help="PREDICT_TIME_BUDGET of both backends")
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--skip-label-studio", action="store_true", help="only the listing memory")
    args = parser.parse_args()

    print("listing memory (peak RSS of the listing process, MiB):")
    for count in (10_000, 100_000):
        streamed, collected = listing_rss(count, False), listing_rss(count, True)
        print(f"  {count:>7,} tasks: streamed {streamed:7.1f}   collected first {collected:7.1f}")
    if args.skip_label_studio:
        return

    work = Path(tempfile.mkdtemp(prefix="bench-bulk-"))
    bert = make_text_encoder(work / "bert")
    files = make_groundingdino(work / "gd", text_encoder_dir=bert)
    mobile = make_mobile_sam(work / "mobile_sam.pt")
    pictures = StaticServer({f"/bulk/{i}.png": encode(make_image(96, 32, seed=i), "PNG") for i in range(args.tasks)})
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
        (ROOT / "artifacts").mkdir(exist_ok=True)
        (ROOT / "artifacts" / "bench-bulk.json").write_text(json.dumps({
            "tasks": args.tasks, "budget_s": args.budget, "sync_clicks": clicks, "sync_s": sync_s,
            "one_click_s": one_click_s, "job_overhead": overhead, "click_idle_s": idle_m, "click_busy_s": busy_m},
            indent=1))
    finally:
        stop_all([sync.process, click.process, ls.process])
        pictures.close()


if __name__ == "__main__":
    main()
