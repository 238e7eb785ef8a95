"""SAM 2.1 (Meta's `sam2` package, Hiera-T/S/B+/L): boxes (or points) on an image -> masks in the image's pixels.

The same calls as sam_wrapper.Segmenter (the pipeline, clicks, the cache and the loader use either), computed as
`SAM2ImagePredictor` computes them (tests/test_sam2_segmenter.py: equal masks, scores and low-res logits), but with
no "current image": every call takes the embedding it works on, so threads never share predictor state.

Frames: "image" = the displayed image, (H, W) pixels; "input" = the image resized (not padded: its aspect ratio is
not kept) to the model's square (1024x1024), where prompts are given in input pixels.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cache import EmbeddingCache
from config import SEGMENTERS, require_file
from device import autocast, in_warmed_batches, resolve_device
from errors import ModelLoadError
from sam_wrapper import PromptSegmenter, UpscaledMasks

logger = logging.getLogger(__name__)

# SAM_MODEL_TYPE -> the config inside the sam2 package that builds it (hydra, sam2/configs/sam2.1/).
CONFIGS = {model_type: f"configs/sam2.1/{model_type}.yaml" for model_type in SEGMENTERS["sam2"].files}


@dataclass(frozen=True)
class Sam2Embedding:
    """One image encoded by SAM 2's image encoder, ready for the mask decoder (SAM2ImagePredictor's `_features`).

    image_embed: (1, 256, 64, 64), with the "no memory" embedding added, as for a single image.
    high_res: the decoder's two finer levels, (1, 32, 256, 256) and (1, 64, 128, 128), already projected.
    original_size: (H, W) of the image.
    """

    image_embed: torch.Tensor
    high_res: tuple[torch.Tensor, torch.Tensor]
    original_size: tuple[int, int]


class Sam2Masks(UpscaledMasks):
    """N masks (H, W) bool from SAM 2's (N, 256, 256) low-resolution logits: SAM2Transforms.postprocess_masks (a
    bilinear resize to the image; no hole filling, as SAM2ImagePredictor's defaults), thresholded at 0."""

    def _logits(self, start: int, stop: int) -> torch.Tensor:
        return upscale_logits(self.low_res[start:stop], self.embedding.original_size)


def upscale_logits(low_res: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 256, 256) mask logits -> (B, H, W) float logits in image pixels (SAM2Transforms.postprocess_masks)."""
    return F.interpolate(low_res[:, None].float(), size, mode="bilinear", align_corners=False)[:, 0]


class Sam2Segmenter(PromptSegmenter):
    """Owns one SAM 2 model (sam2's SAM2Base, used for single images); stateless between calls.

    As sam_wrapper.Segmenter: the image encoder and the prompt decoder each under a lock of their own (a click's
    decoder pass needs no encoder), a cache of embeddings by image, `embed_batch` for several images in one pass,
    the image encoder under autocast in `dtype` (None: float32) and the decoder in float32 on float32 features."""

    mask_threshold = 0.0  # SAM2ImagePredictor's default

    def __init__(self, model: torch.nn.Module, device: str, cache: EmbeddingCache | None = None,
                 dtype: torch.dtype | None = None):
        from sam2.utils.transforms import SAM2Transforms

        self.model = model.eval().to(device)
        self.device, self.cache, self.dtype = device, cache, dtype
        self.transforms = SAM2Transforms(resolution=model.image_size, mask_threshold=self.mask_threshold)
        size = model.image_size
        self._feature_sizes = [(size // 4, size // 4), (size // 8, size // 8), (size // 16, size // 16)]
        self._encoder_lock, self._decoder_lock = threading.Lock(), threading.Lock()
        self._encode_fn = self._features
        self._warmed: tuple[int, ...] = ()

    @classmethod
    def load(cls, checkpoint: str, device: str, model_type: str, cache: EmbeddingCache | None = None,
             dtype: torch.dtype | None = None) -> Sam2Segmenter:
        """model_type: a key of config.SEGMENTERS["sam2"].files (sam2.1_hiera_t | s | b+ | l); checkpoint: Meta's
        file ({"model": state_dict}), as sam2.build_sam.build_sam2 loads it (with its post-processing options)."""
        require_file("SAM_CHECKPOINT", checkpoint)
        from sam2.build_sam import build_sam2

        try:
            model = build_sam2(CONFIGS[model_type], checkpoint, device="cpu")
        except Exception as e:  # a truncated file, or weights of another model type
            raise ModelLoadError(f"SAM_CHECKPOINT={checkpoint}: could not load as {model_type} (does SAM_MODEL_TYPE "
                                 f"match the checkpoint?): {e}") from e
        return cls(model, resolve_device(device), cache, dtype)

    # ------------------------------------------------------------------ image encoder

    def _features(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3, 1024, 1024) input images -> the decoder's three levels, coarsest last: (B, 32, 256, 256),
        (B, 64, 128, 128), (B, 256, 64, 64) (SAM2ImagePredictor.set_image_batch)."""
        backbone_out = self.model.forward_image(batch)
        _, vision_feats, _, _ = self.model._prepare_backbone_features(backbone_out)
        if self.model.directly_add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + self.model.no_mem_embed
        return tuple(feat.permute(1, 2, 0).reshape(len(batch), -1, *size)
                     for feat, size in zip(vision_feats, self._feature_sizes, strict=True))

    def compile(self, batch_sizes: tuple[int, ...] = (1,)) -> bool:
        """torch.compile the image encoder (with the decoder's feature projections) with static shapes and warm it
        up at each of `batch_sizes`, as Segmenter.compile: False, logged and eager, if that fails."""
        size = self.model.image_size
        compiled = torch.compile(self._features, dynamic=False)
        try:
            for batch in sorted(set(batch_sizes)):
                with self._encoder_lock, torch.no_grad(), autocast(self.device, self.dtype):
                    compiled(torch.zeros(batch, 3, size, size, device=self.device))
        except Exception:  # a failed compile must not take the service down: it runs eager, as without COMPILE
            logger.exception("torch.compile of the segmenter's image encoder failed; it runs eager")
            return False
        self._encode_fn, self._warmed = compiled, tuple(sorted(set(batch_sizes)))
        return True

    @torch.no_grad()
    def _embed(self, images: list[np.ndarray]) -> list[Sam2Embedding]:
        batch = torch.stack([self.transforms(image) for image in images]).to(self.device)  # SAM2Transforms
        with self._encoder_lock:
            with autocast(self.device, self.dtype):
                if self._warmed:
                    levels = in_warmed_batches(self._encode_fn, batch, self._warmed)
                else:
                    levels = self._encode_fn(batch)
            s0, s1, embed = (level.float() for level in levels)
        return [Sam2Embedding(embed[i : i + 1], (s0[i : i + 1], s1[i : i + 1]), tuple(image.shape[:2]))
                for i, image in enumerate(images)]

    # ------------------------------------------------------------------ prompts -> masks

    @torch.no_grad()
    def decode(self, embedding: Sam2Embedding, boxes: np.ndarray | None = None, points: np.ndarray | None = None,
               point_labels: np.ndarray | None = None, multimask: bool = False,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder and mask decoder once for a batch of prompts, as SAM2ImagePredictor.predict.

        boxes: (B, 4) xyxy image pixels; points: (B, P, 2) xy image pixels with point_labels (B, P), 1 foreground,
        0 background. Returns low-resolution mask logits (B, C, 256, 256), not clamped, and predicted IoUs (B, C),
        C = 3 if multimask else 1."""
        size = embedding.original_size
        coords = labels = None
        if points is not None:
            coords = self.transforms.transform_coords(
                torch.as_tensor(points, dtype=torch.float, device=self.device), normalize=True, orig_hw=size)
            labels = torch.as_tensor(point_labels, dtype=torch.int, device=self.device)
        if boxes is not None:  # a box is two points labelled 2 and 3, before any clicks
            corners = self.transforms.transform_boxes(
                torch.as_tensor(boxes, dtype=torch.float, device=self.device), normalize=True, orig_hw=size)
            corner_labels = torch.tensor([[2, 3]], dtype=torch.int, device=self.device).repeat(len(corners), 1)
            coords = corners if coords is None else torch.cat([corners, coords], dim=1)
            labels = corner_labels if labels is None else torch.cat([corner_labels, labels], dim=1)
        iou, _, low_res = self.decode_input_points(embedding, coords, labels, multimask)
        return low_res, iou

    def input_points(self, points: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
        """(K, 2) xy pixels of an image of `size` (H, W) -> (K, 2) float32 in the input frame, on the device, as
        SAM2AutomaticMaskGenerator maps its grid points (everything.py)."""
        return self.transforms.transform_coords(torch.as_tensor(points, dtype=torch.float32, device=self.device),
                                                normalize=True, orig_hw=size)

    @torch.no_grad()
    def decode_input_points(self, embedding: Sam2Embedding, coords: torch.Tensor, labels: torch.Tensor,
                            multimask: bool = True, iou_thresh: float = float("-inf")
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Point prompts in the input frame (input_points), coords (B, P, 2) and labels (B, P), in one decoder call
        as SAM2ImagePredictor._predict: the predicted IoUs (B, C) of every prompt, the indices (K,) of those with an
        IoU above `iou_thresh`, and their low-resolution logits (K, C, 256, 256), as Segmenter's (everything.py)."""
        with self._decoder_lock:
            sparse, dense = self.model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
            low_res, iou, _, _ = self.model.sam_mask_decoder(
                image_embeddings=embedding.image_embed, image_pe=self.model.sam_prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask,
                repeat_image=len(coords) > 1, high_res_features=list(embedding.high_res))
        selected = torch.nonzero((iou > iou_thresh).any(dim=1)).flatten()
        return iou, selected, low_res[selected]

    @torch.no_grad()
    def upscale_logits(self, low_res: torch.Tensor, embedding: Sam2Embedding) -> torch.Tensor:
        """(B, 256, 256) mask logits -> (B, H, W) float logits in image pixels."""
        return upscale_logits(low_res, embedding.original_size)

    def upscale(self, low_res: torch.Tensor, embedding: Sam2Embedding) -> Sam2Masks:
        """(B, 256, 256) mask logits -> B masks (H, W) bool in image pixels, computed as they are read."""
        return Sam2Masks(low_res, embedding, self.mask_threshold)
