"""`cli.py evaluate` against the real Label Studio 1.23.2 of the e2e suite: annotations made through its API
(rectangles, a brush, a polygon, a label the prompt never predicts, a task without annotation, one whose only
annotation is cancelled, one whose image is broken), the figures on predictions of the fixture models, `--apply`
writing the chosen thresholds to the model connection, and the next Retrieve Predictions gated by them."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from label_studio_harness import LS_TOKEN, MODEL_VERSION, LabelStudio, StaticServer
from label_studio_sdk.converter.brush import mask2rle
from model_factory import make_image, service_env
from test_e2e_gunicorn import encode

pytest_plugins = ["label_studio_harness"]
pytestmark = pytest.mark.label_studio

ROOT = Path(__file__).resolve().parent.parent
W, H = 96, 64
LABELS = '<Label value="cats"/><Label value="house"/><Label value="dog"/>'
CONFIG = (f'<View><Image name="image" value="$image"/><RectangleLabels name="box" toName="image">{LABELS}'
          f'</RectangleLabels><BrushLabels name="brush" toName="image">{LABELS}</BrushLabels>'
          f'<PolygonLabels name="poly" toName="image">{LABELS}</PolygonLabels></View>')
PROMPT = "round thing_cats. box_house"  # no phrase for dog: annotated, never predicted


def region(kind: str, label: str, value: dict) -> dict:
    name = {"rectanglelabels": "box", "brushlabels": "brush", "polygonlabels": "poly"}[kind]
    return {"type": kind, "from_name": name, "to_name": "image", "original_width": W, "original_height": H,
            "image_rotation": 0, "value": {**value, kind: [label]}}


def rect(label, x, y, w, h):
    return region("rectanglelabels", label, {"x": x, "y": y, "width": w, "height": h, "rotation": 0})


def brush(label, y0, y1, x0, x1):
    mask = np.zeros((H, W), np.uint8)
    mask[y0:y1, x0:x1] = 255
    return region("brushlabels", label, {"format": "rle", "rle": mask2rle(mask)})


def polygon(label, points):
    return region("polygonlabels", label, {"points": points, "closed": True})


@pytest.fixture(scope="module")
def pictures():
    files = {f"/eval/{i}.png": encode(make_image(W, H, seed=300 + i), "PNG") for i in range(4)}
    files["/eval/broken.png"] = b"this is not a picture"
    server = StaticServer(files)
    try:
        yield server
    finally:
        server.close()


def evaluate(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), "evaluate", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", **env})


def test_evaluate_a_real_project_apply_and_the_next_retrieve_predictions_follows(
        label_studio: LabelStudio, backend, pictures, groundingdino_files, mobile_sam_checkpoint, tmp_path):
    ls = label_studio
    pid = ls.create_project("evaluate", CONFIG)
    ls.import_urls(pid, [f"{pictures.url}/eval/{name}.png" for name in ("0", "1", "2", "3", "broken")])
    t0, t1, t2, t3, broken = (t["id"] for t in ls.tasks(pid))
    ml = ls.connect_backend(pid, backend.url, {"prompt": PROMPT, "mask_smooth": 0})
    # A cat box the model finds on t0 (Retrieve Predictions once, then those predictions deleted), annotated: some
    # threshold point finds it, so a threshold is chosen for cats.
    ls.retrieve_predictions(pid)
    found = next(r["value"] for r in ls.predictions(t0)[0]["result"]
                 if r["type"] == "rectanglelabels" and r["value"]["rectanglelabels"] == ["cats"])
    ls.delete_predictions([t0, t1, t2, t3, broken])
    annotations = {
        t0: [rect("cats", *(found[k] for k in ("x", "y", "width", "height"))),
             polygon("house", [[50, 20], [90, 20], [90, 90], [50, 90]])],
        t1: [brush("cats", 5, 40, 10, 60), rect("dog", 60, 10, 30, 30)],
        broken: [rect("cats", 10, 10, 20, 20)],
    }
    for task, result in annotations.items():
        ls.json("POST", f"/api/tasks/{task}/annotations/", json={"result": result})
    ls.json("POST", f"/api/tasks/{t2}/annotations/", json={"result": [], "was_cancelled": True})
    env = {**service_env(groundingdino_files, mobile_sam_checkpoint), "MAX_DETECTIONS": "5",
           "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": LS_TOKEN, "DATA_DIR": str(tmp_path / "data")}

    out = tmp_path / "report.json"
    done = evaluate(env, "--project", str(pid), "--out", str(out), "--report", str(tmp_path / "report.html"),
                    "--apply")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["tasks"] == 2 and report["notes"]["unannotated"] == 2  # t2 (cancelled) and t3
    assert [f["task"] for f in report["notes"]["failed"]] == [broken]
    assert f"prompt {PROMPT!r}" in report["predictions"]  # the model connection's prompt
    boxes, masks = report["boxes"]["labels"], report["masks"]["labels"]
    assert (boxes["cats"]["annotated"], boxes["house"]["annotated"], boxes["dog"]["annotated"]) == (1, 0, 1)
    assert (masks["cats"]["annotated"], masks["house"]["annotated"]) == (1, 1)  # the brush, the polygon
    assert boxes["dog"]["predicted"] == 0 and boxes["dog"]["recall"] == 0.0 and boxes["dog"]["ap"] == 0.0
    assert boxes["house"]["recall"] is None and boxes["house"]["ap"] is None  # nothing annotated
    assert boxes["cats"]["predicted"] > 0
    chosen = report["extra_params"]["label_thresholds"]
    assert set(chosen) <= {"cats", "house"} and "cats" in chosen  # the annotated cat box the model finds

    stored = ls.json("GET", f"/api/ml/{ml['id']}")["extra_params"]
    stored = json.loads(stored) if isinstance(stored, str) else stored
    assert stored == {"prompt": PROMPT, "mask_smooth": 0, "label_thresholds": chosen}

    ls.retrieve_predictions(pid)
    for task in (t0, t1, t2, t3):
        (prediction,) = [p for p in ls.predictions(task) if p["model_version"] == MODEL_VERSION]
        for r in prediction["result"]:
            label = r["value"][r["type"]][0]
            gate = chosen.get(label, {}).get("box_threshold")
            assert gate is None or r["score"] > gate, (label, r["score"], gate)

    again = evaluate(env, "--project", str(pid), "--model-version", MODEL_VERSION, "--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    stored_report = json.loads(out.read_text())
    # t0, t1 and the broken one now hold a prediction (the broken one's empty: its image could not be read)
    assert stored_report["tasks"] == 3 and "thresholds" not in stored_report
    newest = {task: max((p for p in ls.predictions(task) if p["model_version"] == MODEL_VERSION),
                        key=lambda p: p["id"])["result"] for task in (t0, t1, broken)}
    rectangles = sum(1 for result in newest.values() for r in result if r["type"] == "rectanglelabels")
    overall = stored_report["boxes"]["overall"]
    assert overall["predicted"] == rectangles > 0  # t0's cat box at least, found at its chosen threshold
    # pycocotools' own evaluation of the same boxes, written as COCO JSON the straightforward way
    ap, ap50 = coco_box_ap({task: annotations[task] for task in newest}, newest)
    assert (overall["ap"], overall["ap50"]) == (pytest.approx(ap, abs=1e-9), pytest.approx(ap50, abs=1e-9))


def coco_box_ap(truth: dict[int, list[dict]], found: dict[int, list[dict]]) -> tuple[float, float]:
    """COCOeval's box AP and AP50 (COCO's mean over the labels annotated) of the rectangles found against the
    rectangles annotated, per task, both written here as COCO JSON."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    labels = ["cats", "house", "dog"]

    def boxes(results):
        for r in results:
            if r["type"] == "rectanglelabels":
                v, w, h = r["value"], r["original_width"], r["original_height"]
                yield (labels.index(v["rectanglelabels"][0]) + 1, [v["x"] * w / 100, v["y"] * h / 100,
                                                                  v["width"] * w / 100, v["height"] * h / 100],
                       r.get("score"))

    annotations = [{"id": n, "image_id": task, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                   for n, (task, (c, b, _)) in enumerate(((t, x) for t, res in truth.items() for x in boxes(res)), 1)]
    gt = COCO()
    gt.dataset = {"images": [{"id": task, "width": W, "height": H} for task in truth], "annotations": annotations,
                  "categories": [{"id": i, "name": name} for i, name in enumerate(labels, 1)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes([{"image_id": task, "category_id": c, "bbox": b, "score": score}
                         for task, res in found.items() for c, b, score in boxes(res)])
        run = COCOeval(gt, dt, "bbox")
        run.evaluate()
        run.accumulate()
        run.summarize()
    return float(run.stats[0]), float(run.stats[1])
