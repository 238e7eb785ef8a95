"""The GPU path's settings, on CPU with the real random-weight models: PRECISION (bf16 autocast) against float32 on
the same models, batched encoding (BATCH_SIZE) against one image at a time, and what /health says of how the models
run. The GPU figures themselves come from benchmarks/bench_gpu.py (docs/gpu.md)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from model_factory import make_image, service_env, tiny_sam
from servers import ImageServer
from test_e2e_gunicorn import encode
from test_labeling import GUIDE_CONFIG

from cache import image_digest
from config import ConfigError, Settings
from device import compute_dtype
from dino import CompiledBackbone, GroundingDino
from images import ImageLoader
from labeling import parse_label_config
from loader import ModelLoader, build_models
from pipeline import DetectionParams, Pipeline, TextQuery
from prompts import Phrase

CONFIG = parse_label_config(GUIDE_CONFIG)
PHRASES = (Phrase("shape", "cats"), Phrase("round thing", "house"))
QUERY = TextQuery(PHRASES, DetectionParams(0.05, 0.05, 20))
IMAGE = make_image(320, 240, seed=5)
# Stated tolerances of bf16 against float32 (measured on these models: mask IoU >= 0.969, predicted IoU within
# 0.0006, backbone features within 1.0 %).
MIN_MASK_IOU = 0.95
MAX_PREDICTED_IOU_ERROR = 0.01
MAX_FEATURE_ERROR = 0.02  # relative, ||bf16 - fp32|| / ||fp32||


@pytest.fixture(scope="module")
def env(groundingdino_files, mobile_sam_checkpoint):
    return service_env(groundingdino_files, mobile_sam_checkpoint, MAX_DETECTIONS="20")


@pytest.fixture(scope="module")
def fp32(env):
    return build_models(Settings.from_env({**env, "PRECISION": "fp32"}))


@pytest.fixture(scope="module")
def bf16(env):
    return build_models(Settings.from_env({**env, "PRECISION": "bf16"}))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / a.float().norm())


def test_precision_setting_and_its_dtypes():
    assert Settings.from_env({}).precision == "auto"
    with pytest.raises(ConfigError, match="PRECISION must be one of auto, fp32, bf16, fp16, got 'half'"):
        Settings.from_env({"PRECISION": "half"})
    assert compute_dtype("auto", "cpu") is None  # CPU keeps float32 by default
    assert compute_dtype("fp32", "cuda") is None
    assert compute_dtype("bf16", "cpu") is torch.bfloat16
    assert compute_dtype("fp16", "cuda:1") is torch.float16


def test_bf16_sam_masks_match_fp32_on_the_same_boxes(bf16):
    """The image encoder in bf16; the prompt encoder and mask decoder in float32 on float32 features. PRECISION=bf16
    reaches the loaded segmenter (MobileSAM here); the masks are compared on tiny_sam, the same Segmenter code: a
    bf16 encoder pass of MobileSAM takes a minute on a CPU without bf16 units, tiny_sam's 20 s (SAM 2.1's bf16 is
    compared in test_sam2_segmenter.py)."""
    from sam_wrapper import Segmenter

    assert bf16.segmenter.dtype == torch.bfloat16 and bf16.detector.dtype == torch.bfloat16
    model = tiny_sam(seed=0)
    fp32, half = Segmenter(model, "cpu"), Segmenter(model, "cpu", dtype=torch.bfloat16)
    boxes = np.array([[10, 20, 150, 200], [100, 30, 310, 120], [0, 0, 320, 240], [200, 150, 260, 230]], np.float32)
    masks32, iou32 = fp32.segment_boxes(IMAGE, boxes)
    embedding = half.embed(IMAGE)
    low_res, iou16 = half.decode(embedding, boxes=boxes)
    masks32, masks16 = np.asarray(masks32), np.asarray(half.upscale(low_res[:, 0], embedding))
    ious = [(a & b).sum() / max((a | b).sum(), 1) for a, b in zip(masks32, masks16, strict=True)]
    assert all(np.asarray(m).any() for m in masks32)
    assert min(ious) >= MIN_MASK_IOU, ious
    assert np.abs(iou32 - iou16[:, 0].numpy()).max() <= MAX_PREDICTED_IOU_ERROR
    assert embedding.decoder_input.src.dtype == torch.float32  # what the decoder sees
    assert relative_error(fp32.embed(IMAGE).decoder_input.src, embedding.decoder_input.src) > 0  # bf16 ran


def test_bf16_grounding_dino_encoders_match_fp32(fp32, bf16):
    """Grounding DINO's image backbone and text encoder run in bf16 and hand float32 to its float32 transformer. Its
    detections themselves are not compared: this random-weight transformer turns a 0.1 % change of its input
    features into boxes moved by up to 300 px (docs/gpu.md), so no closeness of them could be shown here."""
    tensor = fp32.detector.preprocess(IMAGE)[None]
    with torch.no_grad():
        features32, poss32 = fp32.detector._backbone(tensor)
        features16, poss16 = bf16.detector._backbone(tensor)
    for a, b in zip(features32, features16, strict=True):
        assert b.tensors.dtype == torch.float32
        assert 0 < relative_error(a.tensors, b.tensors) <= MAX_FEATURE_ERROR
    tokens = fp32.detector.model.tokenizer(["shape . round thing ."], return_tensors="pt")
    with torch.no_grad():
        text32 = fp32.detector.model.bert(**tokens)["last_hidden_state"]
        text16 = bf16.detector.model.bert(**tokens)["last_hidden_state"]
    assert text16.dtype == torch.float32
    assert 0 < relative_error(text32, text16) <= MAX_FEATURE_ERROR
    found = bf16.detector.detect(IMAGE, PHRASES, 0.05, 0.05, 20)
    assert len(found) and found.scores.dtype == np.float32 and set(found.labels) <= {"cats", "house"}


def test_health_says_how_the_models_run(env):
    loader = ModelLoader(Settings.from_env({**env, "PRECISION": "bf16"}))
    loader.start()
    loader.get(timeout=600)
    state = loader.state()
    assert state["models"] == "ready"
    assert state["device"] == "cpu" and state["precision"] == "bf16" and state["compiled"] == []
    # rf-groundingdino ships no compiled deformable attention op: ours (dino.levels_batched_deformable_attention).
    assert state["deformable_attention"] == "pytorch, levels batched"
    assert ModelLoader(Settings.from_env(env)).state()["models"] == "not started"


def test_compile_warms_every_batch_size_up_before_the_models_are_ready(env, fp32, caplog):
    """COMPILE=true: SAM's image encoder compiled (inductor, on CPU here) and warmed up at batch 1 and BATCH_SIZE while
    loading, so /health says ready only after that; then batches of 1 to BATCH_SIZE + 1 images compile nothing (the
    larger in chunks) and give the eager encoder's embeddings. Grounding DINO's backbone is set to compile per input
    size, later, in the background: nothing of it at load. (BATCH_SIZE=1 here: each warmed batch size is another
    compile of a minute on this CPU; the padding of a batch to a warmed size is device.in_warmed_batches, tested
    compiled on a small module below.)"""
    import torch._dynamo.utils

    caplog.set_level("INFO", logger="loader")
    loader = ModelLoader(Settings.from_env({**env, "COMPILE": "true", "BATCH_SIZE": "1"}))
    loader.start()
    models = loader.get(timeout=900)
    assert loader.state()["compiled"] == ["segmenter", "groundingdino backbone"]
    messages = [r.getMessage() for r in caplog.records if r.name == "loader"]
    compiled = next(i for i, m in enumerate(messages) if m.startswith("torch.compile: the segmenter's image encoder"))
    assert compiled < next(i for i, m in enumerate(messages) if m.startswith("models ready"))
    assert " warmed up at batch sizes 1 in " in messages[compiled] and messages[compiled].endswith(" s")
    backbone = models.detector.model.backbone[0]
    assert isinstance(backbone, CompiledBackbone) and not backbone.ready and backbone._thread is None
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    images = [make_image(64 + 8 * n, 48, seed=n) for n in range(2)]
    with torch.compiler.set_stance("fail_on_recompile"):  # any compile on a request raises
        for k in range(1, 3):
            models.segmenter.embed_batch(images[:k], [f"batch{k}-{n}" for n in range(k)])
        boxes = np.array([[10, 20, 150, 200], [100, 30, 310, 120]], np.float32)
        masks, _ = models.segmenter.segment_boxes(IMAGE, boxes)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # nothing compiled on a request
    for k in range(1, 3):
        for n in range(k):
            got = models.cache.get(models.segmenter._key(f"batch{k}-{n}"), lambda: pytest.fail("not encoded"))
            assert relative_error(fp32.segmenter.embed(images[n]).decoder_input.src, got.decoder_input.src) <= 1e-4
    eager, _ = fp32.segmenter.segment_boxes(IMAGE, boxes)
    for a, b in zip(np.asarray(masks), np.asarray(eager), strict=True):
        assert (a & b).sum() / (a | b).sum() >= 0.99


def test_a_failed_compile_leaves_the_encoder_eager(fp32, monkeypatch, caplog):
    """A compile or warm-up that raises (no C compiler, an op inductor can't lower) is logged, and the segmenter runs
    eager, as without COMPILE: the service still starts."""
    from sam_wrapper import Segmenter

    segmenter = Segmenter(fp32.segmenter.model, "cpu")
    encoder = segmenter.model.image_encoder

    def broken(module, **kwargs):
        def run(*args):
            raise RuntimeError("inductor: no C compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    assert segmenter.compile((1, 4)) is False
    assert segmenter.model.image_encoder is encoder
    assert "torch.compile of the segmenter's image encoder failed" in caplog.text
    assert segmenter.embed(IMAGE).decoder_input.src.shape == (1, 256, 64, 64)


def count_calls(backbone: CompiledBackbone) -> list:
    """Record each call of the backbone's compiled function from now on: (the calling thread's name, batch size)."""
    calls, compiled = [], backbone._compiled

    def counted(images):
        calls.append((threading.current_thread().name, len(images)))
        return compiled(images)

    backbone._compiled = counted
    return calls


def test_grounding_dinos_backbone_compiles_each_input_size_in_the_background(env, fp32, caplog):
    """COMPILE=true, Grounding DINO: the first image of an input size runs eager (the same detections as the eager
    model) and queues its size; a background thread compiles Swin for it (inductor, on CPU here); from then on that
    size runs compiled, batches of any size compile nothing, and the features, padding masks and detections are the
    eager model's. (Batch 1 only here: each warmed batch size is another compile, 1.5 min on this CPU; the padding
    of batches to a warmed size is tested on a small module below.)"""
    import torch._dynamo.utils
    from groundingdino.util.misc import NestedTensor

    caplog.set_level("INFO", logger="dino")
    detector = GroundingDino.load(env["GROUNDINGDINO_CONFIG"], env["GROUNDINGDINO_CHECKPOINT"],
                                  env["GROUNDINGDINO_TEXT_ENCODER"], "cpu")
    backbone = detector.compile((1,))
    assert detector.compile((1,)) is backbone  # once
    calls = count_calls(backbone)
    eager = fp32.detector.detect(IMAGE, PHRASES, 0.05, 0.05, 20)
    first = detector.detect(IMAGE, PHRASES, 0.05, 0.05, 20)
    assert first.labels == eager.labels and np.array_equal(first.xyxy, eager.xyxy)
    assert backbone.wait(timeout=900)
    assert backbone.ready == {(800, 1066)}
    assert calls == [("compile-backbone", 1)]  # the warm-up; the request ran eager
    message = next(r.getMessage() for r in caplog.records if r.name == "dino")
    assert message.startswith("torch.compile: Grounding DINO's backbone compiled for input 1066×800 and warmed up "
                              "at batch sizes 1 in ") and message.endswith(" s")

    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    tensors = torch.stack([detector.preprocess(make_image(320, 240, seed=n)) for n in range(2)])
    padded = torch.zeros(2, *tensors.shape[-2:], dtype=torch.bool)
    padded[1, 700:, 900:] = True  # as if the second image were smaller
    with torch.compiler.set_stance("fail_on_recompile"), torch.no_grad():  # any compile on a request raises
        found = detector.detect(IMAGE, PHRASES, 0.05, 0.05, 20)
        features = backbone(NestedTensor(tensors, padded))
        reference = backbone.swin(NestedTensor(tensors, padded))  # the library's SwinTransformer.forward
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert [batch for _, batch in calls[1:]] == [1, 1, 1]  # the detection, and two images one at a time
    assert list(features) == list(reference) == [0, 1, 2]
    for a, b in zip(reference.values(), features.values(), strict=True):
        assert torch.equal(a.mask, b.mask) and a.mask[1].any()
        assert relative_error(a.tensors, b.tensors) <= 1e-5
    assert found.labels == eager.labels
    np.testing.assert_allclose(found.xyxy, eager.xyxy, atol=0.5)
    np.testing.assert_allclose(found.scores, eager.scores, atol=1e-4)


class SmallSwin(torch.nn.Module):
    """Stands in for groundingdino's SwinTransformer where only CompiledBackbone's own logic is tested:
    `forward_raw`, (B, 3, h, w) -> two levels of features, images independent."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)

    def forward_raw(self, images):
        first = self.conv(images).relu()
        return first, torch.nn.functional.max_pool2d(first, 2)


def test_compiled_backbone_pads_batches_and_compiles_at_most_its_limit_of_sizes(caplog):
    """Batches run at the next warmed batch size, padded, their outputs the eager ones; sizes past `limit` are never
    queued and run eager; a size whose compile fails is logged, runs eager and is not tried again. Under bf16
    autocast, as PRECISION=auto runs it on a GPU: the compile thread warms up under the same autocast, so requests
    compile nothing."""
    from groundingdino.util.misc import NestedTensor

    from device import Autocast, autocast

    torch.manual_seed(0)
    swin = SmallSwin()
    backbone = CompiledBackbone(swin, "cpu", torch.bfloat16, batch_sizes=(1, 3), limit=2)
    wrapped = Autocast(backbone, "cpu", torch.bfloat16)  # as GroundingDino wraps the backbone
    calls = count_calls(backbone)

    def check(size: tuple[int, int], batch: int) -> None:
        images = torch.randn(batch, 3, *size)
        with torch.no_grad():
            got = wrapped(NestedTensor(images, torch.zeros(batch, *size, dtype=torch.bool)))
            with autocast("cpu", torch.bfloat16):
                expected = swin.forward_raw(images)
        for level, features in enumerate(expected):
            assert got[level].tensors.dtype == torch.float32
            torch.testing.assert_close(got[level].tensors, features.float(), atol=0.02, rtol=0.02)
            assert got[level].mask.shape == (batch, *features.shape[-2:])

    for size in [(40, 60), (32, 32), (48, 24)]:
        check(size, 1)
    assert backbone.wait(timeout=300) and backbone.ready == {(40, 60), (32, 32)}  # the limit: the first two
    assert calls == [("compile-backbone", batch) for batch in (1, 3, 1, 3)]
    with torch.compiler.set_stance("fail_on_recompile"):  # any compile on a request raises
        check((40, 60), 2)  # padded to 3
        check((32, 32), 4)  # 3 + 1
        check((48, 24), 2)  # eager
    assert [batch for _, batch in calls[4:]] == [3, 3, 1] and backbone.wait(timeout=0)

    def broken(images):
        raise RuntimeError("inductor: no C compiler")

    failing = CompiledBackbone(swin, "cpu", None)
    failing._compiled = broken
    for _ in range(2):
        with torch.no_grad():
            failing(NestedTensor(torch.randn(1, 3, 16, 16), torch.zeros(1, 16, 16, dtype=torch.bool)))
        assert failing.wait(timeout=60) and not failing.ready
    assert caplog.text.count("torch.compile of Grounding DINO's backbone for input 16×16 failed; it runs eager") == 1


@pytest.fixture
def passes(request, env):
    """Models of BATCH_SIZE=4 (one set for the module: every test uses images of its own), and the batch size of
    each pass through the SAM image encoder and the Grounding DINO backbone while the test runs."""
    models = request.getfixturevalue("batched")
    calls = {"sam": [], "dino": []}
    hooks = [models.segmenter.model.image_encoder.register_forward_hook(
                 lambda m, i, o: calls["sam"].append(len(i[0]))),
             models.detector.model.backbone.register_forward_hook(
                 lambda m, i, o: calls["dino"].append(len(i[0].tensors)))]
    yield models, calls
    for hook in hooks:
        hook.remove()


@pytest.fixture(scope="module")
def batched(env):
    return build_models(Settings.from_env({**env, "PRECISION": "fp32", "BATCH_SIZE": "4"}))


def test_batched_encoding_gives_what_one_at_a_time_gives(env, fp32, passes):
    """Two 320x240 images share one Grounding DINO pass, a 240x320 one gets its own (another preprocessed size), and
    all three share one SAM encoder pass. Every image's detections are the ones it gets alone."""
    images = [make_image(320, 240, seed=s) for s in (1, 2)] + [make_image(240, 320, seed=4)]
    ids = [image_digest(image) for image in images]
    settings = Settings.from_env({**env, "BATCH_SIZE": "4"})
    reference = [Pipeline(fp32, settings, None).detect(image, i, QUERY) for image, i in zip(images, ids, strict=True)]
    batched, calls = passes
    pipeline = Pipeline(batched, settings, None)
    assert pipeline.batch_size == 4
    pipeline.encode(list(zip(images, ids, strict=True)), QUERY)
    assert sorted(calls["dino"]) == [1, 2] and calls["sam"] == [3]
    results = [pipeline.detect(image, i, QUERY) for image, i in zip(images, ids, strict=True)]
    assert sorted(calls["dino"]) == [1, 2] and calls["sam"] == [3]  # detect read the batch's results
    for ref, got in zip(reference, results, strict=True):
        assert len(ref) == len(got) > 0 and ref.labels == got.labels
        assert np.abs(ref.xyxy - got.xyxy).max() <= 1e-3  # pixels (measured: 2e-5)
        assert np.abs(ref.scores - got.scores).max() <= 1e-5  # (measured: 4e-7)
        assert all((a == b).all() for a, b in zip(ref.masks, got.masks, strict=True))


def test_predict_tasks_batches_and_keeps_each_tasks_outcome(env, fp32, passes):
    """Retrieve Predictions and the bulk job: tasks in, outcomes out in order, the bad one a failure in its place."""
    pictures = {f"/data/upload/1/{n}.png": encode(make_image(160, 120, seed=n), "PNG") for n in range(2)}
    with ImageServer({**pictures, "/data/upload/1/bad.png": b"not an image"}, token="t") as server:
        settings = Settings.from_env({**env, "BATCH_SIZE": "4", "LABEL_STUDIO_URL": server.url,
                                      "LABEL_STUDIO_API_KEY": "t"})
        tasks = [{"id": n, "data": {"image": f"/data/upload/1/{n}.png"}} for n in range(2)]
        tasks.insert(1, {"id": 9, "data": {"image": "/data/upload/1/bad.png"}})
        models, calls = passes
        outcomes = Pipeline(models, settings, ImageLoader(settings)).predict_tasks(tasks, CONFIG, QUERY)
        assert calls["dino"] == [2] and calls["sam"] == [2]  # the two good images in one pass each
        one_by_one = [Pipeline(fp32, settings, ImageLoader(settings)).predict_task(t, CONFIG, QUERY) for t in tasks]
    assert [o.task_id for o in outcomes] == [0, 9, 1]
    assert outcomes[1].failure.kind == "undecodable" and outcomes[1].prediction is None
    for got, ref in zip(outcomes, one_by_one, strict=True):
        if ref.failure is None:
            assert got.prediction["result"] and labels(got.prediction) == labels(ref.prediction)
            assert [r["value"].get("rle") for r in got.prediction["result"]] == [
                r["value"].get("rle") for r in ref.prediction["result"]]
            assert got.seconds > 0


def labels(prediction: dict) -> list:
    return [(r["type"], r["value"].get(r["type"])) for r in prediction["result"]]


def test_bench_gpu_runs_on_cpu(tmp_path):
    """benchmarks/bench_gpu.py --device cpu --quick: the GPU benchmark's own code paths, on the small models."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "figures.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--device", "cpu", "--quick",
                          "--models", str(tmp_path / "models"), "--json", str(out)],
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert list(figures["rows"]) == ["fp32, compile=false"]  # --quick: the bf16 row is the same code, 4 min on a CPU
    for row in figures["rows"].values():
        assert set(row) == {"dino", "mobile_sam", "answer mobile_sam"} and all(v > 0 for v in row.values())
    assert figures["bulk"].keys() == {"fp32"} and figures["bulk"]["fp32"].keys() == {"1", "2"}
    assert all(rate > 0 for rate in figures["bulk"]["fp32"].values())
    assert figures["dino parts fp32"].keys() == {"input before", "input now", "attention before", "attention now",
                                                 "pass before", "pass now"}
    assert all(ms > 0 for ms in figures["dino parts fp32"].values())
    assert "| fp32, compile=false |" in run.stdout and "images/s" in run.stdout
