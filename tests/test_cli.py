"""`cli.py predict`: exit codes, the prediction JSON, the overlay, and one-line errors without a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.converter import brush
from model_factory import make_image, service_env
from PIL import Image

import cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def env(groundingdino_files, mobile_sam_checkpoint):
    return service_env(groundingdino_files, mobile_sam_checkpoint)


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "picture.png"
    Image.fromarray(make_image(120, 80, seed=5)).save(path)
    return path


def run(env, *args):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", **env})


def run_here(monkeypatch, capsys, env, *args) -> subprocess.CompletedProcess:
    """cli.main in this process with `env` set: what `run` gives, without a new interpreter's imports (each
    subprocess costs seconds; the test above and the annotate ones run the real command line)."""
    for key, value in {"HF_HUB_OFFLINE": "1", **env}.items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def test_predict_prints_the_prediction_and_writes_the_overlay(env, picture, tmp_path):
    overlay = tmp_path / "overlay.png"
    done = run(env, "predict", str(picture), "--prompt", "brown cat_cats. house", "--box-threshold", "0.3",
               "--overlay", str(overlay))
    assert done.returncode == 0, done.stderr
    prediction = json.loads(done.stdout)
    assert set(prediction) == {"result", "score", "model_version"}
    assert prediction["model_version"] == "groundingdino_tiny+mobile_sam"
    regions = prediction["result"]
    assert regions and {r["type"] for r in regions} == {"rectanglelabels", "brushlabels"}
    assert {r["from_name"] for r in regions} == {"label", "label2"}  # the README's config
    assert {label for r in regions for label in r["value"].get("rectanglelabels", [])} <= {"cats", "house"}
    for region in regions:
        assert (region["original_width"], region["original_height"]) == (120, 80)
        if region["type"] == "brushlabels":
            assert len(brush.decode_rle(region["value"]["rle"])) == 120 * 80 * 4
    drawn = np.asarray(Image.open(overlay))
    assert drawn.shape == (80, 120, 3) and (drawn != np.asarray(Image.open(picture))).any()


def test_predict_with_a_config_and_out_file(env, picture, tmp_path, monkeypatch, capsys):
    config = tmp_path / "label.xml"
    config.write_text('<View><Image name="img" value="$url"/>'
                      '<RectangleLabels name="boxes" toName="img"><Label value="cats"/></RectangleLabels></View>')
    out = tmp_path / "prediction.json"
    done = run_here(monkeypatch, capsys, env, "predict", str(picture), "--prompt", "cats", "--config", str(config),
                    "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    regions = json.loads(out.read_text())["result"]
    assert regions and {(r["type"], r["from_name"], r["to_name"]) for r in regions} == {
        ("rectanglelabels", "boxes", "img")}


@pytest.mark.parametrize(
    "args, message",
    [
        (["predict", "{missing}", "--prompt", "cats"], "{missing}: No such file or directory"),
        (["predict", "{garbage}", "--prompt", "cats"], "not a recognised image format"),
        (["predict", "{picture}", "--prompt", "tree", "--config", "{config}"],
         "prompt 'tree' gives nothing to detect"),
        (["predict", "{picture}", "--prompt", " . ; "], "gives nothing to detect: it has no phrase"),
        (["predict", "{picture}", "--prompt", "cats", "--config", "{missing}"], "No such file or directory"),
        (["predict", "{picture}", "--prompt", "cats", "--config", "{garbage}"], "not valid XML"),
        (["predict", "{picture}", "--prompt", "cats", "--label-thresholds", '{{"cats": {{"box_threshold": 2}}}}'],
         "label_thresholds.cats.box_threshold must be a number between 0.0 and 1.0"),
        (["predict", "{picture}", "--prompt", "cats", "--config", "{config}",
          "--label-thresholds", '{{"dogs": {{"box_threshold": 0.5}}}}'], "dogs"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_1(picture, tmp_path, capsys, args, message):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image")
    config = tmp_path / "label.xml"
    config.write_text('<View><Image name="i" value="$i"/><BrushLabels name="b" toName="i"><Label value="cats"/>'
                      '</BrushLabels></View>')
    paths = {"missing": tmp_path / "missing.png", "garbage": garbage, "picture": picture, "config": config}
    assert cli.main([a.format(**paths) for a in args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message.format(**paths) in err


def test_missing_checkpoint_is_one_line(env, picture, tmp_path):
    done = run({**env, "MOBILESAM_CHECKPOINT": str(tmp_path / "none.pt")}, "predict", str(picture), "--prompt", "x")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == f"error: MOBILESAM_CHECKPOINT={tmp_path}/none.pt: file not found"
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("args", [["{picture}", "--box-threshold", "2"], ["{picture}", "--max-detections", "0"],
                                  ["{picture}"], ["--task", "3"], ["--project", "1", "--task", "0"],
                                  ["{picture}", "--project", "1", "--task", "3"], [],
                                  ["{picture}", "--label-thresholds", "{{"]])
def test_malformed_options_exit_2(picture, args, capsys):
    args = ["predict", *(a.format(picture=picture) for a in args)] + (["--prompt", "cats"] if args != [
        "{picture}"] else [])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 2


# --------------------------------------------------------------------------- annotate (a bulk job)

@pytest.fixture
def project(picture):
    """A 12-task project in a loopback imitation of Label Studio; task 5's image is broken."""
    from fake_label_studio import FakeLabelStudio
    from servers import ImageServer
    from test_labeling import GUIDE_CONFIG

    with ImageServer({"/plain/pic.png": picture.read_bytes(), "/plain/broken.png": b"not an image"}) as images:
        tasks = {i: {"image": f"{images.url}/plain/{'broken' if i == 5 else 'pic'}.png"} for i in range(1, 13)}
        with FakeLabelStudio(GUIDE_CONFIG, tasks) as ls:
            yield ls


def annotate_env(env, ls, tmp_path):
    return {**env, "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.token, "DATA_DIR": str(tmp_path / "data")}


def per_task(ls) -> dict[int, int]:
    counts: dict[int, int] = {}
    for p in ls.predictions:
        counts[p["task"]] = counts.get(p["task"], 0) + 1
    return counts


def test_predict_a_task_of_a_project_with_its_labeling_config(env, picture, tmp_path, monkeypatch, capsys):
    from fake_label_studio import FakeLabelStudio
    from servers import ImageServer

    boxes_only = ('<View><Image name="photo" value="$img"/><RectangleLabels name="boxes" toName="photo">'
                  '<Label value="cats"/></RectangleLabels></View>')
    with ImageServer({"/pic.png": picture.read_bytes(), "/broken.png": b"not an image"}) as images, \
            FakeLabelStudio(boxes_only, {3: {"img": f"{images.url}/pic.png"},
                                         5: {"img": f"{images.url}/broken.png"}}) as ls:
        e = annotate_env(env, ls, tmp_path)
        done = run_here(monkeypatch, capsys, e, "predict", "--project", "1", "--task", "3", "--prompt", "shape_cats")
        assert done.returncode == 0, done.stderr
        regions = json.loads(done.stdout)["result"]
        assert regions and {(r["from_name"], r["to_name"], r["type"]) for r in regions} == {
            ("boxes", "photo", "rectanglelabels")}
        done = run_here(monkeypatch, capsys, e, "predict", "--project", "1", "--task", "99", "--prompt", "cats")
        assert done.returncode == 1 and done.stderr.strip().splitlines()[-1] == "error: project 1 has no task 99"
        done = run_here(monkeypatch, capsys, e, "predict", "--project", "1", "--task", "5", "--prompt", "cats")
        assert done.returncode == 1 and "not a recognised image format" in done.stderr


def test_annotate_a_project_then_only_missing(env, project, tmp_path, monkeypatch, capsys):
    e = annotate_env(env, project, tmp_path)
    done = run(e, "annotate", "--project", "1", "--prompt", "shape_cats. round thing_house", "--chunk-size", "5")
    assert done.returncode == 0, done.stderr
    assert per_task(project) == {i: 1 for i in range(1, 13) if i != 5}
    assert all(p["model_version"] == "groundingdino_tiny+mobile_sam" and p["result"] for p in project.predictions)
    assert "11 done, 1 failed, 0 skipped" in done.stderr
    assert "task 5 failed (undecodable)" in done.stderr and "12/12 tasks" in done.stderr  # a plain progress line
    again = run_here(monkeypatch, capsys, e, "annotate", "--project", "1", "--prompt", "shape_cats", "--only-missing",
                     "--tasks", "1-6")
    assert again.returncode == 0, again.stderr
    assert "0 done, 1 failed, 5 skipped" in again.stderr and per_task(project)[1] == 1


def test_annotate_stopped_by_ctrl_c_or_killed_resumes_without_doubles(env, project, tmp_path):
    import signal
    import time

    # One image per model pass: a batch of four could predict and import the tasks left to the resumed run all at
    # once, before the kill below lands (then the last resume finds the job done).
    e = {**annotate_env(env, project, tmp_path), "BATCH_SIZE": "1"}
    args = [sys.executable, str(ROOT / "cli.py"), "annotate", "--project", "1", "--prompt", "shape_cats",
            "--chunk-size", "2"]
    proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", **e}, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 240
    while len(project.predictions) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    job_id = err.split("annotate --resume ")[1].split()[0]
    assert 2 <= len(project.predictions) < 11
    assert all(n == 1 for n in per_task(project).values())

    # Killed outright (SIGKILL, no clean-up) in the middle of the resumed run, then resumed again.
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "annotate", "--resume", job_id], cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **e}, stderr=subprocess.DEVNULL)
    before, deadline = len(project.predictions), time.monotonic() + 240
    while len(project.predictions) < before + 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait(30)
    assert before < len(project.predictions) < 11  # killed after an import, before the end
    done = run(e, "annotate", "--resume", job_id)
    assert done.returncode == 0, done.stderr
    assert per_task(project) == {i: 1 for i in range(1, 13) if i != 5}


def test_annotate_skips_by_default_and_redo_is_asked_for(capsys):
    parse = cli.parser().parse_args
    assert parse(["annotate", "--project", "1", "--redo"]).redo
    assert not parse(["annotate", "--project", "1", "--only-missing"]).redo
    with pytest.raises(SystemExit) as exit_info:
        parse(["annotate", "--project", "1", "--redo", "--only-missing"])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["annotate", "--help"])
    assert "the default, kept for older scripts" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    "args, env_changes, message",
    [
        (["--project", "1", "--prompt", "cats"], {"LABEL_STUDIO_API_KEY": ""}, "set LABEL_STUDIO_URL (or --url) and"),
        (["--project", "1", "--prompt", "cats"], {"LABEL_STUDIO_API_KEY": "wrong"}, "refused the key"),
        (["--project", "2", "--prompt", "cats"], {}, "404"),
        (["--project", "1", "--prompt", "tree"], {}, "prompt 'tree' gives nothing to detect"),
        (["--project", "1", "--prompt", "cats", "--tasks", "9-3"], {}, "task selection '9-3'"),
        (["--resume", "nope"], {}, "no job 'nope'"),
    ],
)
def test_annotate_errors_are_one_line(env, project, tmp_path, monkeypatch, capsys, args, env_changes, message):
    for key, value in {**annotate_env(env, project, tmp_path), **env_changes}.items():
        monkeypatch.setenv(key, value)
    assert cli.main(["annotate", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


# --------------------------------------------------------------------------- evaluate


def test_evaluate_scores_the_annotated_tasks_and_applies_the_chosen_thresholds(env, project, tmp_path,
                                                                               monkeypatch, capsys):
    """Tasks 1-3 annotated (a cats box; 4's only annotation cancelled, 5's image broken); the model connection's
    extra params kept by --apply, its label_thresholds the chosen ones."""
    box = {"type": "rectanglelabels", "from_name": "label", "to_name": "image", "original_width": 120,
           "original_height": 80, "value": {"x": 10, "y": 10, "width": 50, "height": 50, "rectanglelabels": ["cats"]}}
    for task in (1, 2, 3, 5):
        project.annotations[task] = [{"id": task, "result": [box], "updated_at": "2026-12-07T10:00:00Z"}]
    project.annotations[4] = [{"id": 4, "result": [box], "was_cancelled": True}]
    project.ml_backends.append({"id": 7, "extra_params": '{"prompt": "shape_cats", "mask_smooth": 1}'})
    out, report = tmp_path / "report.json", tmp_path / "report.html"
    result = run_here(monkeypatch, capsys, annotate_env(env, project, tmp_path), "evaluate", "--project", "1",
                      "--tasks", "1-6", "--out", str(out), "--report", str(report), "--apply")
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["tasks"] == 3 and data["notes"]["unannotated"] == 2  # tasks 4 (cancelled) and 6
    assert [f["task"] for f in data["notes"]["failed"]] == [5] and "task 5 not evaluated" in result.stderr
    assert data["predictions"].endswith("prompt 'shape_cats'")  # the model connection's prompt
    cats = data["boxes"]["labels"]["cats"]
    assert cats["annotated"] == 3 and cats["predicted"] >= cats["matched"] >= 0
    assert data["masks"]["labels"]["cats"]["annotated"] == 0  # box annotations only: nothing to score masks on
    assert "cats" in result.stdout and "(all)" in result.stdout and "extra_params: {" in result.stdout
    assert report.read_text().count("<svg") == 1
    chosen = data["extra_params"]["label_thresholds"]
    assert project.ml_backends[0]["extra_params"] == {"prompt": "shape_cats", "mask_smooth": 1,
                                                      "label_thresholds": chosen}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "6"], "no annotated task to evaluate"),
        (["--model-version", "nope"], "no annotated task to evaluate"),
        (["--model-version", "v1", "--apply"], "--apply writes the chosen thresholds"),
        (["--label-thresholds", '{"dogs": {"box_threshold": 0.2}}'], "'dogs'"),
    ],
)
def test_evaluate_errors_are_one_line(env, project, tmp_path, monkeypatch, capsys, args, message):
    project.annotations[1] = [{"id": 1, "result": []}]
    project.ml_backends.append({"id": 7, "extra_params": None})
    result = run_here(monkeypatch, capsys, annotate_env(env, project, tmp_path), "evaluate", "--project", "1", *args)
    last = result.stderr.splitlines()[-1]  # after the progress lines
    assert result.returncode == 1 and last.startswith("error: ") and message in last, result.stderr
