"""evaluate.py: regions read from Label Studio results, COCO's figures equal to pycocotools' own evaluation of the same
data exported as COCO JSON, precision / recall / F1 corner cases, the threshold choice, and the sweep on the fixture
models costing one detector pass per task."""

from __future__ import annotations

import contextlib
import io
import json
import time

import numpy as np
import pytest
from label_studio_sdk.converter.brush import mask2rle
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import evaluate as ev
from labeling import parse_label_config

BOX_AND_BRUSH = parse_label_config(
    '<View><Image name="image" value="$image"/><RectangleLabels name="box" toName="image"><Label value="cats"/>'
    '<Label value="house"/></RectangleLabels><BrushLabels name="brush" toName="image"><Label value="cats"/>'
    '<Label value="house"/></BrushLabels></View>')
RECTANGLES = parse_label_config(
    '<View><Image name="image" value="$image"/><RectangleLabels name="box" toName="image"><Label value="cats"/>'
    '<Label value="house"/></RectangleLabels></View>')
LABELS = ("cats", "house")


def rect(label, x, y, w, h, score=None, size=(200, 100)):
    """A rectanglelabels result item; x, y, w, h in pixels of a `size` (width, height) image."""
    W, H = size
    item = {"type": "rectanglelabels", "from_name": "box", "to_name": "image", "original_width": W,
            "original_height": H, "value": {"x": x * 100 / W, "y": y * 100 / H, "width": w * 100 / W,
                                            "height": h * 100 / H, "rectanglelabels": [label]}}
    return item if score is None else {**item, "score": score}


def brush(label, mask, score=None):
    h, w = mask.shape
    item = {"type": "brushlabels", "from_name": "brush", "to_name": "image", "original_width": w,
            "original_height": h, "value": {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255),
                                            "brushlabels": [label]}}
    return item if score is None else {**item, "score": score}


def test_regions_of_reads_each_tool_in_pixels_and_counts_the_others():
    mask = np.zeros((100, 200), bool)
    mask[20:40, 30:90] = True
    polygon = {"type": "polygonlabels", "original_width": 200, "original_height": 100,
               "value": {"points": [[10, 10], [30, 10], [30, 50], [10, 50]], "polygonlabels": ["house"]}}
    results = [rect("cats", 10, 20, 30, 40, 0.7), brush("cats", mask), polygon,
               {"type": "textarea", "value": {"text": ["cats"]}},
               {"type": "keypointlabels", "original_width": 200, "original_height": 100,
                "value": {"x": 1, "y": 1, "keypointlabels": ["cats"]}}]
    regions, ignored = ev.regions_of(results, BOX_AND_BRUSH)
    assert ignored == {"textarea": 1, "keypointlabels": 1}
    box, painted, drawn = regions
    assert (box.label, box.tool, box.score) == ("cats", "rectangle", 0.7) and box.mask is None
    assert np.allclose(box.box, (10, 20, 30, 40))
    assert painted.tool == "brush" and np.array_equal(mask_utils.decode(painted.mask).astype(bool), mask)
    assert painted.box == (30.0, 20.0, 60.0, 20.0) and painted.score == 1.0  # an annotation's: no score
    # 20 %..30 % of 200 px, 10 %..50 % of 100 px: COCO's rasteriser fills the 40 x 40 pixel square
    assert drawn.tool == "polygon" and drawn.box == (20.0, 10.0, 40.0, 40.0)
    assert mask_utils.area(drawn.mask) == 40 * 40


def test_polygons_rasterise_as_label_studios_coco_export_writes_them():
    # The SDK's converter (Label Studio's COCO export) rounds the vertices to pixels; COCO rasterises what it wrote.
    from label_studio_sdk.converter.exports.brush_to_coco import generate_contour_from_polygon

    rng = np.random.default_rng(5)
    for n in range(20):
        width, height = (int(v) for v in rng.integers(20, 300, 2))
        points = rng.uniform(0, 100, (int(rng.integers(3, 9)), 2)).tolist()
        (exported,), _, _ = generate_contour_from_polygon(points, width, height)
        expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([exported], height, width)))
        ours = mask_utils.decode(ev.polygon_rle(points, width, height))
        assert ours.shape == (height, width) and np.array_equal(ours, expected), n


def test_the_latest_annotation_not_cancelled_is_the_truth():
    task = {"annotations": [{"id": 1, "updated_at": "2026-12-01T10:00:00Z", "result": [1]},
                            {"id": 2, "updated_at": "2026-12-03T10:00:00Z", "result": [2], "was_cancelled": True},
                            {"id": 3, "updated_at": "2026-12-02T10:00:00Z", "result": [3]}]}
    assert ev.latest_annotation(task)["id"] == 3
    assert ev.latest_annotation({"annotations": [{"id": 4, "was_cancelled": True}]}) is None
    assert ev.latest_annotation({}) is None


def random_samples(seed: int, n_images: int = 4) -> list[ev.Sample]:
    """Images with annotated rectangles and brushes, and predictions near (or far from) them, scored."""
    rng = np.random.default_rng(seed)
    samples = []
    for task_id in range(1, n_images + 1):
        truth, predicted = [], []
        for _ in range(rng.integers(0, 4)):
            label = LABELS[rng.integers(0, 2)] if task_id > 1 else "cats"  # image 1: no house annotated
            x, y, w, h = rng.integers(0, 120), rng.integers(0, 60), rng.integers(10, 80), rng.integers(8, 40)
            mask = np.zeros((100, 200), np.uint8)
            mask[y : y + h, x : x + w] = 1
            truth += [rect(label, x, y, w, h), brush(label, mask)]
            for _ in range(rng.integers(0, 3)):
                dx, dy = rng.integers(-8, 9, 2)
                moved = np.roll(mask, (dy, dx), (0, 1))
                score = float(rng.uniform(0.1, 1))
                other = label if rng.uniform() < 0.8 else LABELS[1 - LABELS.index(label)]
                predicted += [rect(other, max(x + dx, 0), max(y + dy, 0), w, h, score), brush(other, moved, score)]
        samples.append(ev.Sample(task_id, 200, 100, ev.regions_of(truth, BOX_AND_BRUSH)[0],
                                 ev.regions_of(predicted, BOX_AND_BRUSH)[0]))
    return samples


def coco_files(samples, tmp_path, part: int, iou_type: str):
    """The samples as COCO JSON files (ground truth, and detections as a results list), written and read back the
    way any COCO user evaluates: pycocotools' COCO(file) and loadRes(file)."""
    def entry(region, image_id, n):
        e = {"id": n, "image_id": image_id, "category_id": LABELS.index(region.label) + 1, "bbox": list(region.box),
             "iscrowd": 0, "area": region.box[2] * region.box[3]}
        if iou_type == "segm":
            rle = {"size": region.mask["size"], "counts": region.mask["counts"].decode()}
            e.update(segmentation=rle, area=float(mask_utils.area(region.mask)))
        return e

    truth = [(s.task_id, r) for s in samples for r in ev.split(s.truth, BOX_AND_BRUSH, True)[part]]
    found = [(s.task_id, r) for s in samples for r in ev.split(s.predicted, BOX_AND_BRUSH, False)[part]]
    gt = {"images": [{"id": s.task_id, "width": s.width, "height": s.height} for s in samples],
          "categories": [{"id": k + 1, "name": label} for k, label in enumerate(LABELS)],
          "annotations": [entry(r, i, n) for n, (i, r) in enumerate(truth, 1)]}
    results = [{**entry(r, i, n), "score": r.score} for n, (i, r) in enumerate(found, 1)]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(tmp_path / "gt.json"))
        reference = COCOeval(coco, coco.loadRes(str(tmp_path / "dt.json")), iou_type)
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    return reference


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap_equals_cocoeval_on_the_same_data_exported_as_coco_json(seed, tmp_path):
    samples = random_samples(seed)
    report = ev.evaluate(samples, BOX_AND_BRUSH, LABELS)
    for name, part, iou_type in (("boxes", 0, "bbox"), ("masks", 1, "segm")):
        reference = coco_files(samples, tmp_path, part, iou_type)
        ours = report[name]["overall"]
        assert ours["ap"] == pytest.approx(reference.stats[0]) and ours["ap50"] == pytest.approx(reference.stats[1])
        for k, label in enumerate(LABELS):  # per label: COCO's precision table of that category
            p = reference.eval["precision"][:, :, k, 0, -1]
            expected = p[p > -1].mean() if (p > -1).any() else None
            assert report[name]["labels"][label]["ap"] == pytest.approx(expected)


def test_precision_recall_f1_count_coco_matches_at_iou_half():
    full = np.zeros((100, 200), np.uint8)
    full[10:50, 10:50] = 1
    truth = [rect("cats", 10, 10, 40, 40), rect("cats", 120, 10, 40, 40), rect("house", 10, 60, 30, 30)]
    predicted = [rect("cats", 12, 10, 40, 40, 0.9),  # IoU 0.9: a match
                 rect("cats", 140, 10, 40, 40, 0.8),  # IoU 1/3 with the second cat: not one
                 rect("house", 120, 10, 40, 40, 0.7)]  # on a cat, labeled house: not one
    sample = ev.Sample(1, 200, 100, ev.regions_of(truth, RECTANGLES)[0], ev.regions_of(predicted, RECTANGLES)[0])
    report = ev.evaluate([sample], RECTANGLES, LABELS)
    assert "masks" not in report  # a rectangle-only config: box figures only
    cats, house, overall = report["boxes"]["labels"]["cats"], report["boxes"]["labels"]["house"], \
        report["boxes"]["overall"]
    assert (cats["annotated"], cats["predicted"], cats["matched"]) == (2, 2, 1)
    assert cats["precision"] == 0.5 and cats["recall"] == 0.5 and cats["f1"] == 0.5
    assert (house["matched"], house["precision"], house["recall"], house["f1"]) == (0, 0.0, 0.0, 0.0)
    assert (overall["annotated"], overall["predicted"], overall["matched"]) == (3, 3, 1)


def test_empty_truth_and_no_predictions():
    nothing = ev.Sample(1, 200, 100, [], [])
    only_truth = ev.Sample(2, 200, 100, ev.regions_of([rect("cats", 10, 10, 40, 40)], RECTANGLES)[0], [])
    report = ev.evaluate([nothing, only_truth], RECTANGLES, LABELS)
    cats, house = report["boxes"]["labels"]["cats"], report["boxes"]["labels"]["house"]
    assert cats["ap"] == 0.0 and cats["precision"] is None and cats["recall"] == 0.0  # nothing predicted
    assert house["ap"] is None and house["recall"] is None and house["f1"] is None  # nothing annotated


def test_mean_iou_of_matched_masks():
    truth_mask = np.zeros((100, 200), np.uint8)
    truth_mask[10:50, 10:60] = 1  # 40 x 50
    found_mask = np.zeros((100, 200), np.uint8)
    found_mask[10:50, 15:60] = 1  # 40 x 45 inside it: IoU 0.9
    sample = ev.Sample(1, 200, 100, ev.regions_of([brush("cats", truth_mask)], BOX_AND_BRUSH)[0],
                       ev.regions_of([brush("cats", found_mask, 0.8)], BOX_AND_BRUSH)[0])
    masks = ev.evaluate([sample], BOX_AND_BRUSH, LABELS)["masks"]
    assert masks["labels"]["cats"]["mean_iou"] == pytest.approx(0.9) and masks["overall"]["mean_iou"] == \
        pytest.approx(0.9)


def test_the_chosen_thresholds_are_each_labels_best_f1_or_its_best_recall_at_the_target_precision():
    truth = ev.regions_of([rect("cats", 10, 10, 40, 40), rect("cats", 120, 10, 40, 40)], RECTANGLES)[0]
    hit1, hit2 = (ev.regions_of([rect("cats", 10, 10, 40, 40, 0.9)], RECTANGLES)[0],
                  ev.regions_of([rect("cats", 120, 10, 40, 40, 0.5)], RECTANGLES)[0])
    miss = ev.regions_of([rect("cats", 60, 60, 20, 20, 0.4)], RECTANGLES)[0]
    # box threshold 0.3: both cats and a false one; 0.45: both cats (best F1); 0.6: one cat (precision 1 too)
    sweep = {(0.3,): hit1 + hit2 + miss, (0.45,): hit1 + hit2, (0.6,): hit1}
    sample = ev.Sample(1, 200, 100, truth, [], sweep)
    best = ev.choose_thresholds([sample], RECTANGLES, ["cats"], ["box_threshold"])["labels"]["cats"]
    assert best["chosen"] == {"box_threshold": 0.45} and best["f1"] == 1.0
    assert [point[0] for point in best["curve"]] == [0.3, 0.45, 0.6]
    strict = ev.choose_thresholds([sample], RECTANGLES, ["cats"], ["box_threshold"], target_precision=0.9)
    assert strict["labels"]["cats"]["chosen"] == {"box_threshold": 0.45}  # precision 1 at the better recall
    assert ev.extra_params_snippet(strict) == {"label_thresholds": {"cats": {"box_threshold": 0.45}}}
    never = ev.choose_thresholds([ev.Sample(1, 200, 100, truth, [], {(0.3,): miss})], RECTANGLES, ["cats"],
                                 ["box_threshold"], target_precision=0.5)
    assert never["labels"]["cats"]["chosen"] is None and ev.extra_params_snippet(never) == {"label_thresholds": {}}


# ------------------------------------------------------------------------------------ the fixture models, for real


@pytest.fixture(scope="module")
def pipeline(groundingdino_files, mobile_sam_checkpoint):
    from model_factory import make_image, service_env
    from servers import ImageServer
    from test_e2e_gunicorn import encode

    from config import Settings
    from images import ImageLoader
    from loader import build_models
    from pipeline import Pipeline

    files = {f"/data/upload/1/{i}.png": encode(make_image(96, 64, seed=i), "PNG") for i in (1, 2)}
    with ImageServer(files, token="eval-token") as server:
        env = service_env(groundingdino_files, mobile_sam_checkpoint)
        settings = Settings.from_env({**env, "LABEL_STUDIO_URL": server.url, "LABEL_STUDIO_API_KEY": "eval-token"})
        yield Pipeline(build_models(settings), settings, ImageLoader(settings))


def test_the_sweep_costs_one_detector_pass_per_task_and_its_point_in_force_is_the_prediction(pipeline):
    from test_labeling import GUIDE_CONFIG

    from pipeline import DetectionParams, TextQuery
    from prompts import parse_prompt

    config = parse_label_config(GUIDE_CONFIG)
    query = TextQuery(parse_prompt("shape_cats. round thing_house", config.labels).phrases,
                      DetectionParams(0.3, 0.25, 50))
    grid = ev.sweep_grid(pipeline.models.engine)
    cache = pipeline.models.cache
    before = dict(cache.computed)
    samples = [ev.predict_sample(pipeline, {"id": i, "data": {"image": f"/data/upload/1/{i}.png"}}, [], config,
                                 query, grid) for i in (1, 2)]
    ran = {k: v - before.get(k, 0) for k, v in cache.computed.items()}
    assert ran["groundingdino-outputs"] == 2  # 2 tasks x 165 grid points: 2 detector passes
    for sample in samples:
        assert len(sample.sweep) == len(grid["box_threshold"]) * len(grid["text_threshold"]) == 165
        in_force = sample.sweep[(0.3, 0.25)]
        rectangles = [r for r in sample.predicted if r.tool == "rectangle"]
        assert rectangles and len(in_force) == len(rectangles)
        for swept, sent in zip(in_force, rectangles, strict=True):  # both by score, best first
            assert swept.label == sent.label and swept.score == pytest.approx(sent.score, abs=1e-4)
            assert swept.box == pytest.approx(sent.box, abs=1e-3)  # through Label Studio's percent and back
        assert len(sample.sweep[(0.8, 0.6)]) <= len(in_force) <= len(sample.sweep[(0.1, 0.1)])


def test_bench_evaluate_runs_and_both_ways_agree():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_evaluate.py"), "--quick", "--tasks", "1",
                           "--points", "1", "--size", "160x120"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1 detector passes" in done.stdout and "165 detector passes" in done.stdout
    assert "same boxes at the timed points: yes" in done.stdout


# ---------------------------------------------------------------------------------------------------- /evaluations

@pytest.fixture
def service(tmp_path):
    """The service's app (fake models: phrase 0's box at x 10-30 %, y 10-60 % of the image, score 0.9) and a
    5-task project in the Label Studio imitation, tasks 1 and 2 annotated with that box, task 4's image missing."""
    from fake_label_studio import FakeLabelStudio
    from fakes import FakeLoader
    from servers import ImageServer
    from test_api import png
    from test_labeling import GUIDE_CONFIG

    from _wsgi import create_backend_app

    with ImageServer({"/plain/a.png": png(64, 48)}) as images:
        tasks = {i: {"image": f"{images.url}/plain/{'missing' if i == 4 else 'a'}.png"} for i in range(1, 6)}
        with FakeLabelStudio(GUIDE_CONFIG, tasks) as ls:
            box = {"type": "rectanglelabels", "from_name": "label", "to_name": "image", "original_width": 64,
                   "original_height": 48, "value": {"x": 10, "y": 10, "width": 20, "height": 50,
                                                    "rectanglelabels": ["cats"]}}
            for task in (1, 2, 4):
                ls.annotations[task] = [{"id": task, "result": [box]}]
            ls.ml_backends.append({"id": 3, "extra_params": {"prompt": "cats", "mask_smooth": 0}})
            app = create_backend_app({"DATA_DIR": str(tmp_path / "data"), "LABEL_STUDIO_URL": ls.url},
                                     loader=FakeLoader())
            client = app.test_client()
            client.ls = ls
            yield client


def finished(client, evaluation_id: str, headers: dict, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.get(f"/evaluations/{evaluation_id}", headers=headers).json
        if run["state"] in ("done", "failed"):
            return run
        time.sleep(0.05)
    pytest.fail(f"evaluation {evaluation_id} did not end: {run}")


def test_an_evaluation_runs_as_a_job_with_the_callers_key_and_applies_its_thresholds(service):
    from conftest import metric_samples

    auth = {"Authorization": f"Token {service.ls.token}"}
    assert service.post("/evaluations", json={"project": 1, "all": True}).status_code == 401
    started = service.post("/evaluations", json={"project": 1, "tasks": "1-5"}, headers=auth)
    assert started.status_code == 201 and started.json["state"] in ("queued", "running", "done")
    assert started.json["prompt"] == "cats"  # the model connection's
    run = finished(service, started.json["id"], auth)
    assert run["state"] == "done", run
    assert (run["total"], run["done"], run["failed"], run["skipped"]) == (5, 2, 1, 2)
    report = run["report"]
    assert [f["task"] for f in report["notes"]["failed"]] == [4]
    cats = report["boxes"]["labels"]["cats"]
    assert (cats["annotated"], cats["predicted"], cats["matched"], cats["ap"]) == (2, 2, 2, 1.0)
    # Every grid point below the fake's score 0.9 finds both boxes (F1 1): the highest such point is chosen.
    assert report["extra_params"] == {"label_thresholds": {"cats": {"box_threshold": 0.8, "text_threshold": 0.6}}}
    # Its model passes ran as a bulk job's do: after every labeler's.
    metrics = metric_samples(service.get("/metrics").get_data(as_text=True))
    assert metrics["grounded_sam_model_pass_seconds_count{kind=job,model=detector}"] == 2

    other = {"Authorization": "Token someone-else"}
    assert service.get(f"/evaluations/{run['id']}", headers=other).status_code == 404
    page = service.get(f"/evaluations/{run['id']}/report", headers=auth)
    assert page.status_code == 200 and page.mimetype == "text/html" and "<svg" in page.get_data(as_text=True)
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]

    applied = service.post(f"/evaluations/{run['id']}/apply", headers=auth)
    assert applied.status_code == 200, applied.json
    written = {"prompt": "cats", "mask_smooth": 0, **report["extra_params"]}
    assert applied.json == {"extra_params": written} and service.ls.ml_backends[0]["extra_params"] == written


@pytest.mark.parametrize(
    ("body", "token", "status", "message"),
    [
        ({"all": True}, None, 400, "'project' must be a Label Studio project id"),
        ({"project": 1}, None, 400, "say which tasks"),
        ({"project": 1, "all": True, "target_precision": 2}, None, 400, "'target_precision' must be a number"),
        ({"project": 1, "all": True, "prompt": 5}, None, 400, "'prompt' must be a string"),
        ({"project": 1, "all": True, "prompt": "giraffe"}, None, 422, "giraffe"),
        ({"project": 99, "all": True}, None, 404, "404"),
        ({"project": 1, "all": True}, "wrong", 403, "refused the key"),
    ],
)
def test_bad_evaluation_requests_are_4xx_naming_the_problem(service, body, token, status, message):
    response = service.post("/evaluations", json=body, headers={"Authorization": f"Token {token or service.ls.token}"})
    assert response.status_code == status and message in response.json["error"], response.json


def test_an_evaluation_with_nothing_to_score_fails_saying_why_and_has_nothing_to_apply(service):
    auth = {"Authorization": f"Token {service.ls.token}"}
    run = finished(service, service.post("/evaluations", json={"project": 1, "tasks": "3,5"}, headers=auth).json["id"],
                   auth)
    assert run["state"] == "failed" and "no annotated task to evaluate in 2 selected task(s)" in run["error"]
    assert run["report"] is None
    refused = service.post(f"/evaluations/{run['id']}/apply", headers=auth)
    assert refused.status_code == 400 and "it is failed" in refused.json["error"]
    assert service.get(f"/evaluations/{run['id']}/report", headers=auth).status_code == 404
