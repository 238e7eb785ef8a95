"""Images in cloud storage, end to end: the e2e suite's real Label Studio 1.23.2 with S3 import storages on moto's
S3-compatible server (Label Studio's S3_ENDPOINT points at a proxy in front of it that records what the storage
host receives), synced into projects with presigned URLs on and off. The prompt box, a smart click, Retrieve
Predictions and a CLI job predict `s3://` tasks; a missing key is that task's failure; the storage never sees
Label Studio's key."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from label_studio_harness import (
    LS_TOKEN,
    MODEL_VERSION,
    LabelStudio,
    Stack,
    labels_of,
    region_problems,
    textarea_context,
)
from model_factory import make_image, service_env
from test_e2e_gunicorn import encode
from test_label_studio import SMART_CONFIG, smart_keypoint

pytest_plugins = ["label_studio_harness"]
pytestmark = pytest.mark.label_studio

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "grounded-sam-e2e"
PROMPT = "round thing_cats. box_house"
# object name -> (bytes, displayed (width, height)); the JPEG is stored 40x120 with EXIF orientation 6.
OBJECTS = {
    "wide.png": (encode(make_image(160, 40, seed=41), "PNG"), (160, 40)),
    "turned.jpg": (encode(make_image(40, 120, seed=42), "JPEG", orientation=6), (120, 40)),
}


@dataclass
class StorageProject:
    id: int
    ml_backend: int
    presign: bool
    sizes: dict[int, tuple[int, int]]  # synced task id -> its image's displayed size
    missing: int  # a task whose s3:// key does not exist


def sync_project(ls: LabelStudio, stack: Stack, presign: bool) -> StorageProject:
    """A project whose tasks are synced from an S3 import storage (every object a source file), plus one imported
    task naming a key that does not exist."""
    prefix = "presigned" if presign else "proxied"
    for name, (data, _) in OBJECTS.items():
        stack.s3.put(f"/{BUCKET}/{prefix}/{name}", data)
    pid = ls.create_project(f"Grounded SAM S3 {prefix}", SMART_CONFIG)
    storage = ls.json("POST", "/api/storages/s3/", json={
        "project": pid, "title": f"moto {prefix}", "bucket": BUCKET, "prefix": prefix, "regex_filter": ".*",
        "use_blob_urls": True, "presign": presign, "presign_ttl": 1, "region_name": "us-east-1",
        "aws_access_key_id": "moto-key-id", "aws_secret_access_key": "moto-secret"})
    ls.api("POST", f"/api/storages/s3/{storage['id']}/sync")
    deadline = time.monotonic() + 120
    while len(tasks := ls.tasks(pid)) < len(OBJECTS):
        assert time.monotonic() < deadline, f"storage sync gave {len(tasks)} task(s)"
        time.sleep(0.5)
    ls.api("POST", f"/api/projects/{pid}/import", json=[{"image": f"s3://{BUCKET}/{prefix}/missing.png"}])
    tasks = ls.tasks(pid)
    sizes = {}
    for task in tasks[:-1]:
        (uri,) = task["data"].values()  # the task API's form: /tasks/<id>/resolve/?fileuri=...
        assert f"/tasks/{task['id']}/resolve/?fileuri=" in uri, task["data"]
        sizes[task["id"]] = next(size for name, (_, size) in OBJECTS.items() if _fileuri_names(uri, name))
    ml = ls.connect_backend(pid, stack.backend.url, {"prompt": PROMPT})
    assert ml["state"] == "CO", ml
    return StorageProject(pid, ml["id"], presign, sizes, tasks[-1]["id"])


def _fileuri_names(uri: str, name: str) -> bool:
    import base64
    from urllib.parse import parse_qs, urlsplit

    fileuri = parse_qs(urlsplit(uri).query)["fileuri"][0]
    return base64.urlsafe_b64decode(fileuri).decode().endswith("/" + name)


@pytest.fixture(scope="module")
def projects(label_studio: LabelStudio, e2e_stack: Stack) -> dict[bool, StorageProject]:
    e2e_stack.s3.put(f"/{BUCKET}")
    return {presign: sync_project(label_studio, e2e_stack, presign) for presign in (True, False)}


def ours(ls: LabelStudio, task: int) -> list[dict]:
    return [p for p in ls.predictions(task) if p["model_version"] == MODEL_VERSION]


def check_regions(regions: list[dict], size: tuple[int, int]) -> None:
    assert regions, "no region"
    assert region_problems(regions, size) == []
    assert labels_of(regions) <= {"cats", "house"}


def test_retrieve_predictions_on_presigned_s3_tasks(label_studio: LabelStudio, projects, e2e_stack: Stack):
    ls, project = label_studio, projects[True]
    ls.retrieve_predictions(project.id)
    for task, size in project.sizes.items():
        (prediction,) = ours(ls, task)
        check_regions(prediction["result"], size)
    # The missing key: that task's failure (an empty prediction), the others complete. The storage refuses the
    # presigned URL of a key that does not exist (moto answers 403, as S3 does without ListBucket rights): its own
    # reason is named, and the URL was resolved afresh once in case it had expired.
    assert [p["result"] for p in ours(ls, project.missing)] == [[]]
    log = e2e_stack.backend.process.log_text()
    failure = re.search(rf"task {project.missing}: no prediction \((denied|unreachable)\): (.*)", log)
    assert failure and "the storage URL Label Studio redirected to" in failure[2], log[-3000:]
    assert re.search(r"HTTP 40[34]: \w", failure[2]), failure[2]
    assert log.count(f"/tasks/{project.missing}/resolve/: the storage refused its presigned URL") == 1


@pytest.mark.parametrize("presign", [True, False])
def test_the_prompt_box_on_s3_tasks(label_studio: LabelStudio, projects, presign):
    project = projects[presign]
    for task, size in project.sizes.items():
        answer, _ = label_studio.interactive(project.ml_backend, task, textarea_context("round thing_cats"))
        check_regions(answer["data"]["result"], size)
        assert labels_of(answer["data"]["result"]) == {"cats"}


def test_a_smart_click_on_an_s3_task(label_studio: LabelStudio, projects):
    project = projects[True]
    task, size = next(iter(project.sizes.items()))
    answer, _ = label_studio.interactive(project.ml_backend, task, {"result": [smart_keypoint(30, 40, size)]})
    (region,) = answer["data"]["result"]
    assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["cats"]
    assert region_problems([region], size) == []


def test_a_cli_job_and_a_cli_prediction_on_proxied_s3_tasks(label_studio: LabelStudio, projects, groundingdino_files,
                                       mobile_sam_checkpoint, tmp_path):
    ls, project = label_studio, projects[False]
    env = {**os.environ, **service_env(groundingdino_files, mobile_sam_checkpoint), "HF_HUB_OFFLINE": "1",
           "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": LS_TOKEN, "DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), "annotate", "--project", str(project.id),
                           "--prompt", PROMPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"{len(project.sizes)} done, 1 failed" in done.stderr, done.stderr
    assert f"task {project.missing} failed (unreachable)" in done.stderr and "HTTP 424" in done.stderr
    for task, size in project.sizes.items():
        (prediction,) = ours(ls, task)
        check_regions(prediction["result"], size)
    assert ours(ls, project.missing) == []
    # One task from the shell: `cli.py predict --project --task` reads it, and its image, from Label Studio.
    task, size = next(iter(project.sizes.items()))
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), "predict", "--project", str(project.id), "--task",
                           str(task), "--prompt", PROMPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    check_regions(json.loads(done.stdout)["result"], size)


def test_the_storage_host_never_sees_label_studios_key(projects, e2e_stack: Stack, label_studio: LabelStudio):
    """Runs after the others (file order): every request the storage host got, Label Studio's own (boto3, signed
    with the storage's credentials) and ours (presigned URLs), carries no Label Studio key."""
    seen = e2e_stack.s3.proxy.requests
    backend = [(path, headers) for _, path, headers in seen
               if headers.get("User-Agent", "").startswith("python-requests")]
    assert backend, "the backend fetched no presigned URL"
    assert all("X-Amz-Signature=" in path and "Authorization" not in headers for path, headers in backend), backend
    assert all("/presigned/" in path for path, _ in backend)  # presign off: the bytes came through Label Studio
    for _, _, headers in seen:
        assert not any(LS_TOKEN in value for value in headers.values())
