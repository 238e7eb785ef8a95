"""Builds the models the settings name: `build_models` (plain, synchronous: the command line, tests, a Ray actor)
and `ModelLoader`, which runs it once per gunicorn worker in a background thread.

/health and /setup never wait for the loader; /predict waits (up to MODEL_LOAD_WAIT seconds).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cache import EmbeddingCache
from config import SEGMENTERS, Settings, require_file
from errors import ModelLoadError, ModelsNotReady

if TYPE_CHECKING:
    from dino import GroundingDino
    from sam3_engine import Sam3Engine
    from sam_wrapper import Segmenter

logger = logging.getLogger(__name__)

# transformers' from_pretrained (Grounding DINO's BERT) creates modules under accelerate's init_empty_weights, which
# patches torch.nn.Module.register_parameter for the whole process: a model built by another thread meanwhile gets
# meta tensors ("Cannot copy out of meta tensor"). So two loaders in one process build one at a time.
_BUILD_LOCK = threading.Lock()


@dataclass(frozen=True)
class Models:
    detector: GroundingDino | Sam3Engine  # text phrases -> Detections (SAM 3's carry their masks)
    segmenter: Segmenter | None  # boxes -> masks for Grounding DINO; clicks and `*` for either engine
    cache: EmbeddingCache  # shared by both: one bound on the memory per-image state takes
    engine: str = "grounded_sam"  # Settings.engine
    # How they run, for /health: device, precision, compiled, deformable_attention (Grounding DINO's).
    runtime: dict = field(default_factory=dict)


def build_models(settings: Settings) -> Models:
    """Load the engine's detector (Grounding DINO, or SAM 3) and the segmenter the settings name, sharing one
    embedding cache.

    Raises ModelLoadError naming the variable and the file. Takes seconds to minutes (checkpoints are large)."""
    with _BUILD_LOCK:
        return _build_models(settings)


def _build_models(settings: Settings) -> Models:
    # Every model file first: a missing or unreadable one is an error in a second, not after the others loaded.
    for checkpoint in settings.checkpoints():
        require_file(checkpoint.variable, checkpoint.path)
    # Imported here, not at module level: torch takes seconds to import, and a gunicorn worker must answer
    # /health as soon as it starts.
    from device import allow_tf32, compute_dtype, dtype_name, resolve_device
    from dino import GroundingDino, deformable_attention_kernel
    from sam_wrapper import Segmenter

    s = settings
    device = resolve_device(s.device)
    dtype = compute_dtype(s.precision, device)
    allow_tf32(s.precision, device)
    logger.info("loading models on %s (%s)", device, dtype_name(dtype))
    cache = EmbeddingCache(s.embedding_cache_size, int(s.embedding_cache_mb * 2**20))
    if s.engine == "sam3":
        from sam3_engine import Sam3Engine

        detector = Sam3Engine.load(s.sam3_checkpoint, s.sam3_tokenizer, device, cache)
    else:
        detector = GroundingDino.load(s.groundingdino_config, s.groundingdino_checkpoint,
                                      s.groundingdino_text_encoder, device, cache, dtype)
    segmenter = None
    if s.segmenter is not None:
        checkpoint = s.checkpoint(SEGMENTERS[s.segmenter].variable)
        if s.segmenter == "sam2":
            from sam2_segmenter import Sam2Segmenter

            segmenter = Sam2Segmenter.load(checkpoint.path, device, s.segmenter_model_type, cache, dtype)
        else:
            segmenter = Segmenter.load(s.segmenter, checkpoint.path, device, s.segmenter_model_type, cache, dtype)
    runtime = {"device": device, "precision": dtype_name(dtype), "compiled": []}
    if s.engine == "grounded_sam":
        runtime["deformable_attention"] = deformable_attention_kernel(device)
    if segmenter is not None and s.compile in ("segmenter", "true"):
        sizes = (1, s.batch_size)  # one image (a click, a single task) and a bulk batch; smaller batches are padded
        started = time.perf_counter()
        if segmenter.compile(sizes):
            logger.info("torch.compile: the segmenter's image encoder compiled and warmed up at batch sizes %s in "
                        "%.1f s", ", ".join(map(str, sorted(set(sizes)))), time.perf_counter() - started)
            runtime["compiled"].append("segmenter")
    if s.engine == "grounded_sam" and s.compile == "true":
        # Its input size follows each image's aspect ratio: compiled per size met, in the background (dino.py).
        detector.compile((1, s.batch_size))
        runtime["compiled"].append("groundingdino backbone")
    return Models(detector, segmenter, cache, engine=s.engine, runtime=runtime)


class ModelLoader:
    """`build_models` once per worker process, in a daemon thread started after the fork."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._models: Models | None = None
        self._error: str | None = None
        self._seconds: float | None = None

    def start(self) -> None:
        """Begin loading in a daemon thread (idempotent; call it in each worker, after fork)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._load, name="model-loader", daemon=True)
                self._thread.start()

    def _load(self) -> None:
        started = time.perf_counter()
        try:
            self._models = build_models(self.settings)
            self._seconds = time.perf_counter() - started
            logger.info("models ready in %.1f s: %s", self._seconds, self.model_version)
        except ModelLoadError as e:
            self._error = str(e)
            logger.error("model loading failed: %s", e)
        except Exception as e:  # anything else must still end "loading" with a message
            self._error = f"{type(e).__name__}: {e}"
            logger.exception("model loading failed")
        finally:
            self._done.set()

    @property
    def model_version(self) -> str:
        """Names the models in use, from the settings (known before loading finishes)."""
        return self.settings.model_version

    def state(self) -> dict:
        """For /health: never blocks."""
        if not self._done.is_set():
            return {"models": "loading" if self._thread else "not started", "model_version": self.model_version}
        if self._error:
            return {"models": "failed", "error": self._error, "model_version": self.model_version}
        return {"models": "ready", "load_seconds": round(self._seconds or 0, 1), "model_version": self.model_version,
                **self._models.runtime, "embedding_cache": self._models.cache.stats()}

    def get(self, timeout: float | None = None) -> Models:
        """The loaded models; waits for loading up to `timeout` (default MODEL_LOAD_WAIT) seconds.

        Raises ModelsNotReady when they are still loading after that, or failed to load."""
        self.start()
        timeout = self.settings.model_load_wait if timeout is None else timeout
        if not self._done.wait(timeout):
            raise ModelsNotReady(f"models are still loading (waited {timeout:.0f} s, MODEL_LOAD_WAIT); "
                                 "try again shortly")
        if self._error:
            raise ModelsNotReady(f"models failed to load: {self._error}")
        return self._models
