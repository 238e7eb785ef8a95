"""Fake models for unit tests of our own logic: they stand in for Grounding DINO and SAM only (the real models are
covered by test_dino.py, test_sam_wrapper.py, test_pipeline.py and the end-to-end tests)."""

from __future__ import annotations

import numpy as np

from cache import EmbeddingCache
from detections import Detections
from loader import Models


class FakeDetector:
    """Phrase i -> one box at a fixed place, score 0.9 - 0.1 * i, kept above its phrase's box threshold. Records
    each call's phrases and per-phrase box thresholds."""

    def __init__(self):
        self.calls = []

    def detect(self, image, phrases, box_threshold, text_threshold, max_detections=50, nms_iou=0.7, image_id=None):
        gates = np.broadcast_to(box_threshold, len(phrases)).tolist()
        self.calls.append(([p.text for p in phrases], gates))
        h, w = image.shape[:2]
        rows = [(i, 0.9 - 0.1 * i) for i in range(len(phrases)) if 0.9 - 0.1 * i > gates[i]]
        rows = rows[:max_detections]
        xyxy = [(w * 0.1 * (i + 1), h * 0.1, w * 0.1 * (i + 1) + w * 0.2, h * 0.6) for i, _ in rows]
        return Detections(np.array(xyxy, np.float32).reshape(-1, 4), [s for _, s in rows],
                          [phrases[i].label for i, _ in rows])


class FakeSegmenter:
    """Each box's mask is the box itself; a click prompt's mask is its box, or a 5-pixel square per
    positive click."""

    def __init__(self):
        self.calls = 0
        self.prompts = []

    def segment_prompt(self, image, points, point_labels, box=None, image_id=None):
        self.prompts.append((points.tolist(), point_labels.tolist(), None if box is None else box.tolist()))
        mask = np.zeros(image.shape[:2], bool)
        if box is not None:
            x0, y0, x1, y1 = np.round(box).astype(int)
            mask[y0:y1, x0:x1] = True
        for (x, y), positive in zip(points.astype(int), point_labels, strict=True):
            mask[max(0, y - 2): y + 3, max(0, x - 2): x + 3] = bool(positive)
        return mask, 0.875

    def segment_boxes(self, image, xyxy, image_id=None):
        self.calls += 1
        h, w = image.shape[:2]
        masks = np.zeros((len(xyxy), h, w), bool)
        for m, (x0, y0, x1, y1) in zip(masks, xyxy.astype(int), strict=True):
            m[y0:y1, x0:x1] = True
        return masks, np.ones(len(xyxy), np.float32)


class FakeLoader:
    model_version = "fake-dino+fake-sam"

    def __init__(self):
        self.models = Models(FakeDetector(), FakeSegmenter(), EmbeddingCache(4, 2**20))

    def start(self):
        pass

    def state(self):
        return {"models": "ready", "model_version": self.model_version}

    def get(self, timeout=None):
        return self.models


class LoadedModels:
    """A loader that already holds `models` (real ones, from loader.build_models): the app serves them as is."""

    def __init__(self, models: Models, model_version: str):
        self.models, self.model_version = models, model_version

    def start(self):
        pass

    def state(self):
        return {}

    def get(self, timeout=None):
        return self.models
