"""Grounding DINO: text phrases -> labeled boxes in the image's pixel frame."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.ops import batched_nms, box_convert

from cache import EmbeddingCache
from config import require_file
from detections import Detections
from device import resolve_device
from errors import ModelLoadError
from prompts import Phrase

logger = logging.getLogger(__name__)


def caption_and_spans(phrases: Sequence[Phrase], tokenizer) -> tuple[str, list[list[int]]]:
    """The caption Grounding DINO reads ("brown cat . house .") and, per phrase, the indices
    of its tokens in the tokenised caption (the columns of pred_logits that belong to it)."""
    caption, char_spans = "", []
    for phrase in phrases:
        start = len(caption)
        caption += phrase.text
        char_spans.append((start, len(caption)))
        caption += " . "
    caption = caption.strip()
    offsets = tokenizer(caption, return_offsets_mapping=True)["offset_mapping"]
    spans = []
    for start, end in char_spans:
        # Special tokens have offset (0, 0) and never fall inside a phrase.
        spans.append([i for i, (a, b) in enumerate(offsets) if b > a and a >= start and b <= end])
    return caption, spans


class GroundingDino:
    """Owns one Grounding DINO model. `detect` is safe to call from several threads: the
    model keeps per-call image features on itself, so calls are serialised by a lock.

    With a cache, an image's backbone features are computed once (the text-independent part of
    the model), and the raw outputs for one image and caption once (a repeated prompt)."""

    def __init__(self, model: torch.nn.Module, device: str, cache: EmbeddingCache | None = None):
        self.model = model.eval().to(device)
        self.device = device
        self.cache = cache
        self.max_text_len = int(getattr(model, "max_text_len", 256))
        self._lock = threading.Lock()
        # Imported here: groundingdino's transforms are the reference preprocessing.
        import groundingdino.datasets.transforms as T

        self._transform = T.Compose(
            [
                T.RandomResize([800], max_size=1333),  # one size: deterministic
                T.ToTensor(),
                T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ]
        )

    @classmethod
    def load(cls, config_path: str, checkpoint_path: str, text_encoder: str, device: str,
             cache: EmbeddingCache | None = None) -> GroundingDino:
        """Build from a config .py and a published-format checkpoint ({"model": state_dict}).

        text_encoder: a local BERT directory (nothing is fetched) or a hub id such as bert-base-uncased.
        """
        require_file("GROUNDINGDINO_CONFIG", config_path)
        require_file("GROUNDINGDINO_CHECKPOINT", checkpoint_path)
        # A hub id is "name" or "org/name"; anything else is meant as a local directory.
        looks_like_path = text_encoder.startswith((".", "/", "~")) or text_encoder.count("/") > 1
        if looks_like_path and not os.path.isdir(text_encoder):
            raise ModelLoadError(f"GROUNDINGDINO_TEXT_ENCODER={text_encoder}: directory not found")
        from groundingdino.util.inference import load_model

        device = resolve_device(device)
        try:
            model = load_model(config_path, checkpoint_path, device=device, text_encoder_type=text_encoder)
        except OSError as e:  # transformers' error when the text encoder can't be found or fetched
            raise ModelLoadError(f"GROUNDINGDINO_TEXT_ENCODER={text_encoder}: {e}") from e
        except Exception as e:
            raise ModelLoadError(f"GROUNDINGDINO_CHECKPOINT={checkpoint_path}: could not load: {e}") from e
        return cls(model, device, cache)

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (3, h, w) float tensor, short side 800 (long side <= 1333), normalised."""
        tensor, _ = self._transform(Image.fromarray(image), None)
        return tensor

    def detect(
        self,
        image: np.ndarray,
        phrases: Sequence[Phrase],
        box_threshold: float,
        text_threshold: float,
        max_detections: int = 50,
        nms_iou: float = 0.7,
        image_id: str | None = None,
    ) -> Detections:
        """Find the phrases in one image.

        image: (H, W, 3) uint8 RGB, displayed orientation. Returns boxes in that image's pixels.
        image_id: the image's identity (cache.image_digest) for the cache; None: no caching.
        A query becomes a detection when its best token score over the whole caption exceeds
        `box_threshold` (its score, as in groundingdino's `predict`); it goes to the phrase whose
        tokens score highest, and is kept if that phrase's best token exceeds `text_threshold`.
        Then per-label NMS at `nms_iou` and the `max_detections` best scores.
        """
        if not phrases:
            return Detections.empty()
        caption, spans = caption_and_spans(phrases, self.model.tokenizer)
        usable = [i for i, span in enumerate(spans) if span and max(span) < self.max_text_len]
        if len(usable) < len(phrases):
            dropped = [phrases[i].text for i in range(len(phrases)) if i not in usable]
            logger.warning("prompt longer than %d tokens: phrases %s are ignored", self.max_text_len, dropped)
        if not usable:
            return Detections.empty()
        if self.cache is None or image_id is None:
            logits, boxes = self._forward(image, caption, None)
        else:
            key = ("groundingdino-outputs", id(self), image_id, caption)
            logits, boxes = self.cache.get(key, lambda: self._forward(image, caption, image_id))
        return self._select(logits, boxes, spans, usable, phrases, image.shape[:2],
                            box_threshold, text_threshold, max_detections, nms_iou)

    def _forward(self, image: np.ndarray, caption: str, image_id: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token scores (queries, 256) and boxes (queries, 4) cxcywh normalised, on the CPU."""
        tensor = self.preprocess(image).to(self.device)[None]
        with self._lock, torch.no_grad():
            if self.cache is not None and image_id is not None:
                features, poss = self.cache.get(("groundingdino-backbone", id(self), image_id),
                                                lambda: self._backbone(tensor))
                # The forward pass appends to the position list: hand it copies.
                self.model.set_image_features(list(features), list(poss))
            outputs = self.model(tensor, captions=[caption])  # unsets the features at its end
        return outputs["pred_logits"].cpu().sigmoid()[0], outputs["pred_boxes"].cpu()[0]

    def _backbone(self, tensor: torch.Tensor) -> tuple[list, list]:
        """The image-only part of the model: multi-scale features and their position embeddings."""
        self.model.set_image_tensor(tensor)
        features, poss = self.model.features, self.model.poss
        self.model.unset_image_tensor()
        return features, poss

    @staticmethod
    def _select(logits, boxes, spans, usable, phrases, size, box_threshold, text_threshold, max_detections, nms_iou):
        height, width = size
        scores = logits.max(dim=1).values
        phrase_scores = torch.stack([logits[:, spans[i]].max(dim=1).values for i in usable], dim=1)
        best_score, best = phrase_scores.max(dim=1)
        keep = (scores > box_threshold) & (best_score > text_threshold)
        if not keep.any():
            return Detections.empty()
        xyxy = box_convert(boxes[keep] * torch.tensor([width, height, width, height]), "cxcywh", "xyxy")
        xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, width)
        xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, height)
        scores, phrase_index = scores[keep], torch.tensor(usable)[best[keep]]
        labels = [phrases[i].label for i in phrase_index.tolist()]
        label_ids = torch.tensor([sorted(set(labels)).index(label) for label in labels])
        order = batched_nms(xyxy, scores, label_ids, nms_iou)[:max_detections]  # sorted by score
        return Detections(xyxy[order].numpy(), scores[order].numpy(), [labels[i] for i in order.tolist()])
