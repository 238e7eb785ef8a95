"""Labelers of one project, all at once, against the service: the Locust users of benchmarks/bench_load.py.

Each simulated labeler, between pauses of 0.5-2 s, does what a team member does in Label Studio:

    prompt      the prompt box (Auto-Annotation) on a task it has not opened before: a fresh image
    click       a smart keypoint on the image it is working on, one of a few (SAM's decoder on a cached embedding);
                about one click in four moves to another of them: "first click" (its embedding may need computing)
    batch       Retrieve Predictions over 4 fresh tasks (no context)
    bad input   a malformed request body (answered 400)
    health      GET /health, as Label Studio and the image's HEALTHCHECK poll it

Run by bench_load.py in its own virtualenv (Locust and gevent stay out of the service's). It reads LOAD_IMAGE_URL
(a format string of a fresh image's path, e.g. "/data/upload/1/img-{}.png"), LOAD_CLICK_IMAGES (how many images
the clicks go to) and LOAD_RECORDS (a file it appends one JSON line to per request: kind, seconds, outcome), and
gives up on a request after 100 s, as Label Studio does.
"""

from __future__ import annotations

import itertools
import json
import os
import random

from locust import HttpUser, between, events, task

IMAGE_URL = os.environ.get("LOAD_IMAGE_URL", "/data/upload/1/img-{}.png")
CLICK_IMAGES = int(os.environ.get("LOAD_CLICK_IMAGES", "3"))
RECORDS = os.environ.get("LOAD_RECORDS", "load-records.jsonl")
GIVE_UP_S = 100  # Label Studio's ML_TIMEOUT_PREDICT
PROJECT = "1.1700000000"
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1" showSubmitButton="true"/>
  <RectangleLabels name="label" toName="image"><Label value="cats"/><Label value="house"/></RectangleLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="cats"/><Label value="house"/></KeyPointLabels>
  <BrushLabels name="label2" toName="image"><Label value="cats"/><Label value="house"/></BrushLabels>
</View>"""

fresh = itertools.count(CLICK_IMAGES)  # images 0 .. CLICK_IMAGES - 1 are the clicks' own
records = open(RECORDS, "a", buffering=1)  # noqa: SIM115 - one line per request, for the whole run


def body(image_numbers: list[int], context: dict | None) -> dict:
    tasks = [{"id": n + 1, "data": {"image": IMAGE_URL.format(n)}} for n in image_numbers]
    return {"tasks": tasks, "project": PROJECT, "label_config": CONFIG,
            "params": {"login": None, "password": None, "context": context}}


def text(prompt: str) -> dict:
    return {"result": [{"value": {"text": [prompt]}, "id": "p", "from_name": "prompt", "to_name": "image",
                        "type": "textarea", "origin": "manual"}]}


def keypoint(x: float, y: float) -> dict:
    return {"result": [{"value": {"x": x, "y": y, "width": 0.6, "keypointlabels": ["cats"]}, "id": "k",
                        "from_name": "kp", "to_name": "image", "type": "keypointlabels", "origin": "manual",
                        "is_positive": True}]}


@events.request.add_listener
def record(request_type, name, response_time, response_length, response=None, exception=None, **kwargs):
    """One line per request: its kind, seconds, and outcome (answered, refused: 503, gave up: no answer in 100 s,
    or the unexpected status)."""
    status = getattr(response, "status_code", None)
    if exception is not None and status in (None, 0):
        outcome = "gave up" if "timed out" in str(exception).lower() or "timeout" in str(exception).lower() \
            else f"error {type(exception).__name__}"
    elif status == 503:
        outcome = "refused"
    elif status == (400 if name == "bad input" else 200):
        outcome = "answered"
    else:
        outcome = f"status {status}"
    records.write(json.dumps({"kind": name, "seconds": response_time / 1000, "outcome": outcome}) + "\n")


class Labeler(HttpUser):
    wait_time = between(0.5, 2)

    def on_start(self):
        self.clicks = random.Random(id(self))
        self.image = None  # the one it clicks on now

    def _predict(self, name: str, payload: dict):
        with self.client.post("/predict", json=payload, name=name, timeout=GIVE_UP_S,
                              catch_response=True) as response:
            if response.status_code == 503:
                response.failure("refused (503)")
            elif response.status_code == 200:
                response.success()

    @task(6)
    def prompt(self):
        self._predict("prompt", body([next(fresh)], text("shape_cats. round thing_house")))

    @task(4)
    def click(self):
        name = "click"
        if self.image is None or self.clicks.random() < 0.25:
            others = [n for n in range(CLICK_IMAGES) if n != self.image]
            self.image, name = self.clicks.choice(others), "first click"
        self._predict(name, body([self.image], keypoint(self.clicks.uniform(10, 90), self.clicks.uniform(10, 90))))

    @task(1)
    def batch(self):
        self._predict("batch", body([next(fresh) for _ in range(4)], None))

    @task(2)
    def bad_input(self):
        with self.client.post("/predict", data=b'{"tasks": [', name="bad input", timeout=GIVE_UP_S,
                              headers={"Content-Type": "application/json"}, catch_response=True) as response:
            if response.status_code == 400:
                response.success()

    @task(2)
    def health(self):
        self.client.get("/health", name="health", timeout=GIVE_UP_S)
