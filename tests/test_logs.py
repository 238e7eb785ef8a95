"""logs.py: the service silences exactly the known third-party warnings of start-up and a first prediction, and says
so once; other warnings, ours included, still show. pytest's own filters are the same list."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import logs

ROOT = Path(__file__).resolve().parent.parent

# Start the service's app in a fresh process (where no warning has been shown yet) the way gunicorn does, let it load
# the small test models and answer one text prompt; then what the published Grounding DINO config adds at inference
# (activation checkpointing, off in the test models), and warnings the filters must not catch.
PROBE = r"""
import json, os, sys, time, warnings
root, mode, models = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sys.path[:0] = [root, os.path.join(root, "tests")]
import logs
if mode == "unfiltered":
    logs.SILENCED = ()
from model_factory import make_image
from servers import ImageServer
from test_e2e_gunicorn import encode
from test_labeling import GUIDE_CONFIG

with ImageServer({"/data/upload/1/a.png": encode(make_image(320, 40, seed=7), "PNG")}, token="tok") as server:
    env = {"GROUNDINGDINO_CONFIG": models["config"], "GROUNDINGDINO_CHECKPOINT": models["checkpoint"],
           "GROUNDINGDINO_TEXT_ENCODER": models["text_encoder"], "USE_MOBILE_SAM": "true",
           "MOBILESAM_CHECKPOINT": models["mobile_sam"], "MAX_DETECTIONS": "5", "DEVICE": "cpu",
           "DATA_DIR": models["data_dir"], "LABEL_STUDIO_URL": server.url, "LABEL_STUDIO_API_KEY": "tok"}
    from _wsgi import create_backend_app
    client = create_backend_app(env).test_client()
    deadline = time.monotonic() + 240
    while client.get("/health").get_json()["models"] == "loading" and time.monotonic() < deadline:
        time.sleep(0.2)
    health = client.get("/health").get_json()["models"]
    context = {"result": [{"value": {"text": ["shape_cats"]}, "id": "abc", "from_name": "prompt",
                           "to_name": "image", "type": "textarea", "origin": "manual"}]}
    answer = client.post("/predict", json={
        "tasks": [{"id": 1, "data": {"image": "/data/upload/1/a.png"}}], "project": "1.1700000000",
        "label_config": GUIDE_CONFIG, "params": {"login": None, "password": None, "context": context}})

import torch
from torch.utils import checkpoint
with torch.no_grad():
    checkpoint.checkpoint(torch.nn.Linear(2, 2), torch.ones(1, 2))

# A SAM 2.1 segmenter's image transforms (sam2_segmenter.Sam2Segmenter builds them as it loads).
from sam2.utils.transforms import SAM2Transforms
SAM2Transforms(resolution=1024, mask_threshold=0.0)

# label_studio_sdk's exchange of a personal access token (ls_client.py uses it), answered by a mock transport.
import httpx
from types import SimpleNamespace
from label_studio_sdk.tokens.client_ext import TokensClientExt
tokens = TokensClientExt.__new__(TokensClientExt)
tokens._base_url, tokens._api_key = "http://127.0.0.1:9/", "refresh-token"
http = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(200, json={"access": "a"})))
tokens._client_wrapper = SimpleNamespace(httpx_client=SimpleNamespace(httpx_client=http))
tokens.refresh()

warnings.warn("grounded-sam's own warning", UserWarning)
warnings.warn_explicit("another torch warning", UserWarning, "torch/functional.py", 1, module="torch.functional")
print(json.dumps({"health": health, "predict": answer.status_code}))
"""

THIRD_PARTY_WARNING = re.compile(r"site-packages/\S+\.py:\d+: \w+: .*")  # file:line: category: message


@pytest.fixture(scope="module")
def probe_runs(groundingdino_files, mobile_sam_checkpoint, tmp_path_factory) -> dict[str, tuple[dict, str]]:
    """mode -> (the probe's JSON answer, its stderr), for the service as it is and with logs.SILENCED emptied."""
    config, checkpoint, text_encoder = groundingdino_files
    processes = {}
    for mode in ("filtered", "unfiltered"):
        models = {"config": str(config), "checkpoint": str(checkpoint), "text_encoder": str(text_encoder),
                  "mobile_sam": str(mobile_sam_checkpoint), "data_dir": str(tmp_path_factory.mktemp(f"data-{mode}"))}
        processes[mode] = subprocess.Popen(  # both at once: most of their time is imports and loading
            [sys.executable, "-W", "default", "-c", PROBE, str(ROOT), mode, json.dumps(models)], cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = {}
    for mode, process in processes.items():
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, f"{mode} probe failed:\n{err[-5000:]}"
        runs[mode] = (json.loads(out.strip().splitlines()[-1]), err)
    return runs


def test_service_start_up_and_first_prediction_show_no_third_party_warning(probe_runs):
    answer, err = probe_runs["filtered"]
    assert answer == {"health": "ready", "predict": 200}
    assert THIRD_PARTY_WARNING.findall(err) == [], err
    libraries = ", ".join(logs.silenced_libraries())
    assert err.count(f"silencing {len(logs.SILENCED)} known warnings of {libraries} (listed in logs.py)") == 1, err
    assert "[INFO] logs: silencing" in err  # in the service's log format


def test_other_warnings_still_show(probe_runs):
    _, err = probe_runs["filtered"]
    assert "UserWarning: grounded-sam's own warning" in err
    assert "UserWarning: another torch warning" in err  # a library's warning that is not in the list


def test_every_silenced_warning_does_occur_without_the_filters(probe_runs):
    # Without this the first test could pass because the probe no longer triggers what the list silences.
    answer, err = probe_runs["unfiltered"]
    assert answer == {"health": "ready", "predict": 200}
    shown = THIRD_PARTY_WARNING.findall(err)
    for entry in logs.SILENCED:
        assert any(re.search(rf"\.py:\d+: \w+: {entry.message}", line, re.I) for line in shown), \
            f"{entry} never occurred: drop it from logs.SILENCED and pyproject.toml, or make the probe trigger it"


def test_configure_logging_installs_the_filters_once(monkeypatch):
    import warnings

    monkeypatch.setattr(logs, "_silenced", False)
    with warnings.catch_warnings():
        assert logs.silence_third_party_warnings() is True
        count = len(warnings.filters)
        assert logs.silence_third_party_warnings() is False
        assert len(warnings.filters) == count


def test_pytest_ignores_the_same_warnings_and_nothing_broader():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    filters = config["tool"]["pytest"]["ini_options"]["filterwarnings"]
    ignores = [line for line in filters if line.startswith("ignore")]
    assert sorted(ignores) == sorted(logs.pytest_filters()), "pyproject.toml's filterwarnings and logs.SILENCED differ"
