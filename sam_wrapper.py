"""SAM / MobileSAM: boxes (or points) on an image -> masks in the image's pixel frame.

Frames: "image" = the displayed image, (H, W) pixels; "input" = the image resized so its long
side is 1024 (SAM's ResizeLongestSide), top-left aligned in a padded 1024x1024 square.
"""

from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

from cache import EmbeddingCache
from config import SEGMENTERS, require_file
from detections import LazyMasks, profile_bounds
from device import autocast, in_warmed_batches, resolve_device
from errors import ModelLoadError
from masks import mask_bounds
from sam_decoder import DecoderInput, PromptDecoder

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class ImageEmbedding:
    """One image encoded by SAM's image encoder, ready for the mask decoder.

    decoder_input: what the mask decoder needs of the image, computed once from the image encoder's
    (1, 256, 64, 64) features (sam_decoder.DecoderInput), on the model's device.
    input_size: (h, w) of the resized image inside the 1024x1024 input.
    original_size: (H, W) of the image.
    """

    decoder_input: DecoderInput
    input_size: tuple[int, int]
    original_size: tuple[int, int]


def postprocess_masks(model: torch.nn.Module, low_res: torch.Tensor, embedding: ImageEmbedding) -> torch.Tensor:
    """(B, C, 256, 256) mask logits -> (B, C, H, W) float logits in image pixels: Sam.postprocess_masks, bit for
    bit (tests/test_sam_wrapper.py), but with the crop to the input size copied before the second interpolation:
    bilinear read the strided crop at about half speed on CPU (two 2048x1536 masks: 11.2 ms, against
    6.2 ms plus 0.3 ms for the copy)."""
    size = model.image_encoder.img_size
    logits = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)
    logits = logits[..., : embedding.input_size[0], : embedding.input_size[1]].contiguous()
    return F.interpolate(logits, embedding.original_size, mode="bilinear", align_corners=False)


class UpscaledMasks(LazyMasks):
    """N masks (H, W) bool in image pixels from SAM's low-resolution logits, upscaled as they are read
    (detections.LazyMasks); the interpolation is Sam.postprocess_masks', bit for bit (postprocess_masks).
    sam2_segmenter.Sam2Masks: SAM 2's, through `_logits`."""

    def __init__(self, low_res: torch.Tensor, embedding, threshold: float, model: torch.nn.Module | None = None):
        super().__init__(len(low_res), embedding.original_size)
        self.low_res, self.embedding, self.threshold, self.model = low_res, embedding, threshold, model

    def _logits(self, start: int, stop: int) -> torch.Tensor:
        """Masks start..stop as (k, H, W) float logits in image pixels, on the model's device."""
        return postprocess_masks(self.model, self.low_res[start:stop, None], self.embedding)[:, 0]

    @torch.no_grad()
    def _chunk(self, start: int, stop: int) -> np.ndarray:
        return (self._logits(start, stop) > self.threshold).cpu().numpy()

    @torch.no_grad()
    def with_bounds(self):
        """The masks in order, each with its bounding box (masks.mask_bounds), found on the model's device where
        the masks are made (a GPU: the host then reads each mask only on its box; on CPU with numpy)."""
        for start in self._chunks():
            stop = min(start + self._chunks().step, len(self))
            masks = self._logits(start, stop) > self.threshold
            if masks.device.type == "cpu":  # torch's any() over a dimension is ~30x slower than numpy's there
                for mask in masks.numpy():
                    yield mask, mask_bounds(mask)
                continue
            rows, cols = masks.any(dim=2).cpu().numpy(), masks.any(dim=1).cpu().numpy()
            for mask, row, col in zip(masks.cpu().numpy(), rows, cols, strict=True):
                yield mask, profile_bounds(row, col)


class PromptSegmenter:
    """What every segmenter (Segmenter below, sam2_segmenter.Sam2Segmenter) does on top of its own
    `_embed(images) -> embeddings` (one encoder pass), `decode(embedding, boxes, points, point_labels, multimask)`
    and `upscale(low_res, embedding)`: embeddings by image through the shared cache, boxes and clicks to masks."""

    cache: EmbeddingCache | None

    def embed(self, image: np.ndarray):
        """(H, W, 3) uint8 RGB -> its embedding (the expensive step: one image encoder pass)."""
        return self._embed([image])[0]

    def embed_batch(self, images: list[np.ndarray], image_ids: list[str]) -> None:
        """Encode the images not in the cache yet in one image encoder pass, and cache their embeddings, where
        `embedding_for` then finds them. Every image enters the encoder as the same square (SAM pads it, SAM 2.1
        resizes it), so each one's embedding is the one `embed` gives it. Needs a cache."""
        if self.cache is None:
            return
        todo = [(image, image_id) for image, image_id in zip(images, image_ids, strict=True)
                if self._key(image_id) not in self.cache]
        if todo:
            for (_, image_id), embedding in zip(todo, self._embed([image for image, _ in todo]), strict=True):
                self.cache.put(self._key(image_id), embedding)

    def embedding_for(self, image: np.ndarray, image_id: str | None = None, keep: bool = False):
        """The image's embedding, from the cache when `image_id` (cache.image_digest) is given. keep: a person is
        clicking on this image: its embedding stays cached after those of images seen once."""
        if self.cache is None or image_id is None:
            return self.embed(image)
        return self.cache.get(self._key(image_id), lambda: self.embed(image), keep=keep)

    def _key(self, image_id: str) -> tuple:
        """The cache key of an image's embedding."""
        return ("sam-embedding", id(self), image_id)

    def segment_boxes(self, image: np.ndarray, xyxy: np.ndarray,
                      image_id: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One mask per box, all boxes in one decoder call.

        image: (H, W, 3) uint8 RGB; xyxy: (N, 4) image pixels. Returns masks (N, H, W) bool and
        SAM's predicted IoU per mask (N,) float32. N == 0 skips the encoder entirely.
        The masks are an UpscaledMasks: read them in order (or np.asarray them).
        """
        height, width = image.shape[:2]
        if len(xyxy) == 0:
            return np.zeros((0, height, width), bool), np.zeros(0, np.float32)
        embedding = self.embedding_for(image, image_id)
        low_res, iou = self.decode(embedding, boxes=xyxy)
        return self.upscale(low_res[:, 0], embedding), iou[:, 0].float().cpu().numpy()

    def segment_prompt(self, image: np.ndarray, points: np.ndarray, point_labels: np.ndarray,
                       box: np.ndarray | None = None, image_id: str | None = None) -> tuple[np.ndarray, float]:
        """One mask for one interactive prompt: clicks and/or a box, as SamPredictor.predict takes them.

        points: (P, 2) xy image pixels, P >= 0; point_labels: (P,) 1 foreground / 0 background;
        box: (4,) xyxy image pixels or None. A single click is ambiguous, so it asks SAM for three
        masks and keeps the best-scoring one; a box or several clicks ask for one.
        Returns the mask (H, W) bool and SAM's predicted IoU for it.
        """
        if len(points) == 0 and box is None:
            raise ValueError("a SAM prompt needs at least one point or a box")
        embedding = self.embedding_for(image, image_id, keep=True)
        low_res, iou = self.decode(
            embedding,
            boxes=None if box is None else np.asarray(box)[None],
            points=np.asarray(points)[None] if len(points) else None,
            point_labels=np.asarray(point_labels)[None] if len(points) else None,
            multimask=box is None and len(points) == 1,
        )
        best = int(iou[0].argmax())
        return self.upscale(low_res[0, best : best + 1], embedding)[0], float(iou[0, best])


class Segmenter(PromptSegmenter):
    """Owns one SAM-family model (segment_anything's Sam or mobile_sam's Sam); stateless between calls.

    Every call takes the image embedding it works on as an argument, so threads never share a
    "current image" (SamPredictor's set_image state); the model itself is used under a lock.
    With a cache, each image is encoded once for all the text prompts and clicks on it; `embed_batch`
    encodes several at once. dtype: the image encoder's autocast dtype (None: float32); the prompt encoder
    and mask decoder always run in float32, on float32 features, so a click's numerics don't change.
    """

    def __init__(self, model: torch.nn.Module, device: str, cache: EmbeddingCache | None = None,
                 dtype: torch.dtype | None = None):
        self.model = model.eval().to(device)
        self.device = device
        self.cache = cache
        self.dtype = dtype
        self.transform = ResizeLongestSide(model.image_encoder.img_size)
        # On CPU, prompts go through the mask decoder 4 at a time (sam_decoder.PromptDecoder: cache-sized passes).
        self.decoder = PromptDecoder(self.model, chunk=4 if torch.device(device).type == "cpu" else None)
        # The image encoder and the prompt decoder share no state: a click's decoder pass (the scheduler's click lane)
        # need not wait for another image's encoder pass.
        self._encoder_lock, self._decoder_lock = threading.Lock(), threading.Lock()
        self._warmed: tuple[int, ...] = ()  # the batch sizes the compiled encoder was warmed up at (compile)

    @classmethod
    def load(cls, kind: str, checkpoint: str, device: str, model_type: str = "vit_h",
             cache: EmbeddingCache | None = None, dtype: torch.dtype | None = None) -> Segmenter:
        """kind: a key of config.SEGMENTERS: "sam" (model_type vit_h | vit_l | vit_b) or "mobile_sam" (vit_t)."""
        spec = SEGMENTERS[kind]
        require_file(spec.variable, checkpoint)
        if model_type not in spec.files:
            model_type = next(iter(spec.files))  # MobileSAM has one type
        registry = importlib.import_module(spec.package).sam_model_registry
        try:
            model = registry[model_type](checkpoint=checkpoint)
        except Exception as e:  # a truncated file, or weights of another model type
            hint = " (does SAM_MODEL_TYPE match the checkpoint?)" if len(spec.files) > 1 else ""
            raise ModelLoadError(f"{spec.variable}={checkpoint}: could not load as {model_type}{hint}: {e}") from e
        return cls(model, resolve_device(device), cache, dtype)

    def compile(self, batch_sizes: tuple[int, ...] = (1,)) -> bool:
        """torch.compile the image encoder with static shapes (its input is always (B, 3, 1024, 1024)) and warm it up
        at each of `batch_sizes`. From then on every encoder pass runs at a warmed batch size (`_encode`), so no
        request compiles. If compiling or a warm-up fails (no C compiler, an op inductor can't lower), the encoder
        stays eager, the error is logged and False is returned: the service still starts."""
        eager = self.model.image_encoder
        size = eager.img_size
        try:
            self.model.image_encoder = torch.compile(eager, dynamic=False)
            for batch in sorted(set(batch_sizes)):
                with self._encoder_lock, torch.no_grad(), autocast(self.device, self.dtype):
                    self.model.image_encoder(torch.zeros(batch, 3, size, size, device=self.device))
        except Exception:  # a failed compile must not take the service down: it runs eager, as without COMPILE
            logger.exception("torch.compile of the segmenter's image encoder failed; it runs eager")
            self.model.image_encoder = eager
            return False
        self._warmed = tuple(sorted(set(batch_sizes)))
        return True

    def _encode(self, batch: torch.Tensor) -> torch.Tensor:
        """(k, 3, 1024, 1024) preprocessed images -> (k, 256, 64, 64) features. Compiled, a batch runs at the smallest
        warmed batch size >= k, padded with blank images whose outputs are dropped (larger batches: in chunks of the
        largest), since any other size would compile again (dynamic=False) in the middle of a request. The images
        of a batch don't interact (each is its own sequence of tokens), so padding changes no image's features
        beyond float rounding. Eager, the batch runs as it is."""
        if not self._warmed:
            return self.model.image_encoder(batch)
        return in_warmed_batches(self.model.image_encoder, batch, self._warmed)

    @torch.no_grad()
    def _embed(self, images: list[np.ndarray]) -> list[ImageEmbedding]:
        inputs, sizes = [], []
        for image in images:
            if self.model.image_format != "RGB":
                image = image[..., ::-1]
            resized = self.transform.apply_image(image)
            tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()
            sizes.append((tuple(tensor.shape[-2:]), tuple(image.shape[:2])))
            inputs.append(self.model.preprocess(tensor))  # normalised, padded to (3, 1024, 1024)
        with self._encoder_lock:
            with autocast(self.device, self.dtype):
                features = self._encode(torch.stack(inputs))
            features = features.float()  # (B, 256, 64, 64)
        with self._decoder_lock:
            prepared = [self.decoder.prepare(features[i : i + 1]) for i in range(len(images))]
        return [ImageEmbedding(d, input_size, original_size) for d, (input_size, original_size)
                in zip(prepared, sizes, strict=True)]

    @torch.no_grad()
    def decode(
        self,
        embedding: ImageEmbedding,
        boxes: np.ndarray | None = None,
        points: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        multimask: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the prompt encoder and mask decoder once for a batch of prompts.

        boxes: (B, 4) xyxy in image pixels; points: (B, P, 2) xy in image pixels with
        point_labels (B, P), 1 = foreground, 0 = background. Returns low-resolution mask logits
        (B, C, 256, 256) and predicted IoUs (B, C), C = 3 if multimask else 1. Prompts are mapped
        to the input frame as SamPredictor.predict does (numpy, float64, then float32).
        """
        size = embedding.original_size
        box_t = pts = None
        if boxes is not None:
            box_t = torch.as_tensor(self.transform.apply_boxes(np.asarray(boxes), size), dtype=torch.float,
                                    device=self.device)
        if points is not None:
            coords = torch.as_tensor(self.transform.apply_coords(np.asarray(points), size), dtype=torch.float,
                                     device=self.device)
            pts = (coords, torch.as_tensor(point_labels, dtype=torch.int, device=self.device))
        with self._decoder_lock:
            sparse, _ = self.model.prompt_encoder(points=pts, boxes=box_t, masks=None)
            return self.decoder.decode(embedding.decoder_input, sparse, multimask)

    @torch.no_grad()
    def decode_input_points(self, embedding: ImageEmbedding, coords: torch.Tensor, labels: torch.Tensor,
                            multimask: bool = True, iou_thresh: float = float("-inf")
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Point prompts already in the input frame, as SamPredictor.predict_torch takes them: coords (B, P, 2)
        (any float dtype: the prompt encoder gets them as they are), labels (B, P). Returns the predicted IoUs
        (B, C) of every prompt, the indices (K,) of the prompts with an IoU above `iou_thresh`, and their logits
        (K, C, 256, 256), as `decode` gives them (sam_decoder.PromptDecoder.decode_above; everything.py)."""
        with self._decoder_lock:
            sparse, _ = self.model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
            return self.decoder.decode_above(embedding.decoder_input, sparse, multimask, iou_thresh)

    @property
    def mask_threshold(self) -> float:
        return self.model.mask_threshold

    def input_points(self, points: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
        """(K, 2) xy pixels of an image of `size` (H, W) -> (K, 2) in the input frame, on the device, float64 as
        SamAutomaticMaskGenerator hands its grid points to SamPredictor.predict_torch (everything.py)."""
        return torch.as_tensor(self.transform.apply_coords(points, size), device=self.device)

    @torch.no_grad()
    def upscale_logits(self, low_res: torch.Tensor, embedding: ImageEmbedding) -> torch.Tensor:
        """(B, 256, 256) mask logits -> (B, H, W) float logits in image pixels (Sam.postprocess_masks)."""
        return postprocess_masks(self.model, low_res[:, None], embedding)[:, 0]

    def upscale(self, low_res: torch.Tensor, embedding: ImageEmbedding) -> UpscaledMasks:
        """(B, 256, 256) mask logits -> B masks (H, W) bool in image pixels, computed as they are read."""
        return UpscaledMasks(low_res, embedding, self.model.mask_threshold, self.model)
