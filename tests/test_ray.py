"""`cli.py annotate --ray local` (a local Ray cluster of two single-threaded CPU actors, the generated test models)
against the loopback imitation of Label Studio: the same regions as the in-process job, one prediction per task;
per-label thresholds honoured by the actors; the same with SAM 2.1 as the segmenter.
A killed actor, against the real Label Studio: tests/test_label_studio_bulk.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_label_studio import FakeLabelStudio
from model_factory import make_image, make_sam2, service_env
from servers import ImageServer
from test_e2e_gunicorn import encode
from test_labeling import GUIDE_CONFIG

pytest.importorskip("ray")  # requirements-ray.txt: make install installs it
ROOT = Path(__file__).resolve().parent.parent
PROMPT = "round thing_cats. box_house"
TASKS = 6  # three per actor, in chunks of 3


@pytest.fixture(scope="module")
def project():
    # Wide pictures keep Grounding DINO's input small (1333x167): each actor runs it on one thread.
    files = {f"/r/{i}.png": encode(make_image(160, 20, seed=200 + i), "PNG") for i in range(TASKS)}
    with ImageServer(files) as images:
        tasks = {i + 1: {"image": f"{images.url}/r/{i}.png"} for i in range(TASKS)}
        with FakeLabelStudio(GUIDE_CONFIG, tasks) as ls:
            yield ls


def regions_by_task(ls) -> dict[int, list]:
    return {p["task"]: [{k: v for k, v in r.items() if k != "id"} for r in p["result"]] for p in ls.predictions}


@pytest.mark.parametrize("segmenter", ["mobile_sam", "sam2.1_hiera_t"])
def test_cli_on_ray_gives_the_in_process_regions(project, groundingdino_files, mobile_sam_checkpoint, tmp_path,
                                                 segmenter):
    ls = project
    sam2 = {} if segmenter == "mobile_sam" else {
        "USE_SAM": "true", "SAM_MODEL_TYPE": segmenter,
        "SAM_CHECKPOINT": str(make_sam2(tmp_path / "sam2.1_hiera_tiny.pt", segmenter))}
    env = {**os.environ, **service_env(groundingdino_files, mobile_sam_checkpoint, **sam2), "HF_HUB_OFFLINE": "1",
           "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.token, "DATA_DIR": str(tmp_path),
           # In-process as each actor: the same float reduction order, one image per encoder pass, the same bits.
           "OMP_NUM_THREADS": "1", "BATCH_SIZE": "1"}
    results = []
    for extra in ([], ["--ray", "local", "--ray-actors", "2", "--ray-batch-size", "1"]):
        ls.predictions.clear()
        done = subprocess.run([sys.executable, str(ROOT / "cli.py"), "annotate", "--project", "1", "--prompt", PROMPT,
                               "--chunk-size", "3", *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, done.stderr
        assert f"{TASKS} done, 0 failed, 0 skipped" in done.stderr
        counts = {}
        for prediction in ls.predictions:
            counts[prediction["task"]] = counts.get(prediction["task"], 0) + 1
        assert counts == {i: 1 for i in range(1, TASKS + 1)}
        assert {p["model_version"] for p in ls.predictions} == {
            "groundingdino_tiny+" + ("mobile_sam" if segmenter == "mobile_sam" else "sam2.1_hiera_tiny")}
        results.append(regions_by_task(ls))
    assert results[0] == results[1] and any(results[0].values())


def test_per_label_thresholds_hold_on_ray(project, groundingdino_files, mobile_sam_checkpoint, tmp_path):
    """--label-thresholds travel to the actors: a cat region only above its own box threshold, and none at all
    once that threshold is past every score, while house regions below it stay (the gate is the cats' alone)."""
    ls = project
    env = {**os.environ, **service_env(groundingdino_files, mobile_sam_checkpoint), "HF_HUB_OFFLINE": "1",
           "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.token, "DATA_DIR": str(tmp_path)}

    def regions(thresholds: str) -> list[dict]:
        ls.predictions.clear()
        done = subprocess.run([sys.executable, str(ROOT / "cli.py"), "annotate", "--project", "1", "--tasks", "1-2",
                               "--prompt", PROMPT, "--ray", "local", "--ray-actors", "1", "--label-thresholds",
                               thresholds], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr
        return [r for p in ls.predictions for r in p["result"] if r["type"] == "rectanglelabels"]

    def of(found, label):
        return sorted(r["score"] for r in found if r["value"]["rectanglelabels"] == [label])

    low = regions('{"cats": {"box_threshold": 0.01}}')
    cats = of(low, "cats")
    assert cats, "no cat region even at box threshold 0.01"
    gate = cats[len(cats) // 2]  # a gate between the cat scores
    high = regions(json.dumps({"cats": {"box_threshold": gate}}))
    assert of(high, "cats") == [s for s in cats if s > gate]
    assert any(s <= gate for s in of(high, "house")), (gate, of(high, "house"))
    assert of(regions('{"cats": {"box_threshold": 1.0}}'), "cats") == []
