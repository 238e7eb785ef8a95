"""Shared test set-up: no hub access, repo root importable, small random-weight models generated once per session."""

import os
import sys
from pathlib import Path

# Before anything imports transformers / huggingface_hub: no test may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# What every process the tests start (Label Studio, moto, the service, the CLI, Ray, Chromium) inherits, whatever
# the caller's shell sets: unbuffered Python output (the harness shows a child's log as it is written, and a pipe
# would hold it back) and one UTF-8 locale.
os.environ.update(PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8", LANG="C.UTF-8", LC_ALL="C.UTF-8")

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import model_factory  # noqa: E402
import pytest  # noqa: E402

# The Label Studio test modules import this plugin module before naming it in pytest_plugins: registered here, its
# asserts are rewritten (else pytest warns that it "cannot be rewritten").
pytest.register_assert_rewrite("label_studio_harness")


@pytest.fixture(scope="session")
def text_encoder_dir(tmp_path_factory) -> Path:
    """A small random BERT directory with a bert-base-uncased-layout vocab (see model_factory.make_text_encoder)."""
    return model_factory.make_text_encoder(tmp_path_factory.mktemp("text_encoder"))


@pytest.fixture(scope="session")
def groundingdino_files(tmp_path_factory, text_encoder_dir) -> tuple[Path, Path, Path]:
    """(config_path, checkpoint_path, text_encoder_dir) of a small random Grounding DINO."""
    return model_factory.make_groundingdino(tmp_path_factory.mktemp("groundingdino"), text_encoder_dir=text_encoder_dir)


@pytest.fixture(scope="session")
def mobile_sam_checkpoint(tmp_path_factory) -> Path:
    """A random-weight MobileSAM checkpoint in mobile_sam.pt's format."""
    return model_factory.make_mobile_sam(tmp_path_factory.mktemp("mobile_sam") / "mobile_sam.pt")


@pytest.fixture(scope="session")
def sam_vit_b_checkpoint(tmp_path_factory) -> Path:
    """A random-weight SAM ViT-B checkpoint in sam_vit_b_01ec64.pth's format, written once per session (358 MB) and
    deleted at its end, so pytest's kept temporary directories of past runs don't each hold one."""
    path = model_factory.make_sam(tmp_path_factory.mktemp("sam_vit_b") / "sam_vit_b_01ec64.pth", "vit_b")
    yield path
    path.unlink(missing_ok=True)


def metric_samples(text: str) -> dict[str, float]:
    """GET /metrics' Prometheus text, parsed by prometheus_client's own parser: 'name' or 'name{key=value,...}'
    (labels sorted) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples
