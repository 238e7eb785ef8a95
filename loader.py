"""Loads the models once per worker process, in the background, and hands them out when ready.

/health and /setup never wait for it; /predict waits (up to MODEL_LOAD_WAIT seconds).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cache import EmbeddingCache
from config import ModelLoadError, Settings
from mlbase import RequestError

if TYPE_CHECKING:
    from dino import GroundingDino
    from sam_wrapper import Segmenter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Models:
    detector: GroundingDino
    segmenter: Segmenter | None
    cache: EmbeddingCache  # shared by both: one bound on the memory per-image state takes


class ModelLoader:
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
        s = self.settings
        started = time.perf_counter()
        try:
            # Imported here, not at module level: torch takes seconds to import, and a gunicorn
            # worker must answer /health as soon as it starts.
            from dino import GroundingDino, resolve_device
            from sam_wrapper import Segmenter

            device = resolve_device(s.device)
            logger.info("loading models on %s", device)
            cache = EmbeddingCache(s.embedding_cache_size, int(s.embedding_cache_mb * 2**20))
            detector = GroundingDino.load(s.groundingdino_config, s.groundingdino_checkpoint,
                                          s.groundingdino_text_encoder, device, cache)
            segmenter = None
            if s.segmenter == "sam":
                segmenter = Segmenter.load("sam", s.sam_checkpoint, device, s.sam_model_type, cache)
            elif s.segmenter == "mobile_sam":
                segmenter = Segmenter.load("mobile_sam", s.mobilesam_checkpoint, device, cache=cache)
            self._models = Models(detector, segmenter, cache)
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
        s = self.settings
        checkpoints = [s.groundingdino_checkpoint]
        if s.segmenter:
            checkpoints.append(s.sam_checkpoint if s.segmenter == "sam" else s.mobilesam_checkpoint)
        return "+".join(os.path.splitext(os.path.basename(path))[0] for path in checkpoints)

    def state(self) -> dict:
        """For /health: never blocks."""
        if not self._done.is_set():
            return {"models": "loading" if self._thread else "not started", "model_version": self.model_version}
        if self._error:
            return {"models": "failed", "error": self._error, "model_version": self.model_version}
        return {"models": "ready", "load_seconds": round(self._seconds or 0, 1), "model_version": self.model_version,
                "embedding_cache": self._models.cache.stats()}

    def get(self, timeout: float | None = None) -> Models:
        """The loaded models; waits for loading up to `timeout` (default MODEL_LOAD_WAIT) seconds."""
        self.start()
        timeout = self.settings.model_load_wait if timeout is None else timeout
        if not self._done.wait(timeout):
            raise RequestError(f"models are still loading (waited {timeout:.0f} s, MODEL_LOAD_WAIT); "
                               "try again shortly", status=503)
        if self._error:
            raise RequestError(f"models failed to load: {self._error}", status=503)
        return self._models
