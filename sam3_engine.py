"""SAM 3 ("segment anything with concepts"): text phrases -> every instance's box, score and mask, in one model.

The second engine beside Grounding DINO + SAM (ENGINE=sam3): each phrase is one SAM 3 text query on the image.
Frames: "image" = the displayed image, (H, W) pixels; "input" = the image resized (not padded) to the model's
square resolution (1008x1008 for the published model); SAM 3 predicts boxes as normalised cxcywh of the input
square, which is the whole image stretched, so they map to image pixels by scaling x by W and y by H.

The computation is the package's reference inference, `sam3.model.sam3_image_processor.Sam3Processor`
(`set_image` then `set_text_prompt`), bit for bit (tests/test_sam3_engine.py); what differs is only what is kept:
the image's backbone features go into the shared EmbeddingCache (no per-object "current image"), the masks are
upscaled to image pixels lazily, a few at a time, and the detections are cut to the `max_detections` best.

sam3 0.1.4 hard-codes CUDA in places that a CPU-only machine reaches (see `cuda_redirected`): the model is built,
and off CUDA also run, inside that mode, which only moves those tensors to the model's device.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torchvision.ops import batched_nms

from cache import EmbeddingCache
from config import require_file
from detections import Detections, LazyMasks
from device import resolve_device
from errors import ModelLoadError
from prompts import Phrase

logger = logging.getLogger(__name__)

RESOLUTION = 1008  # the published model's input square (sam3.model_builder builds for it)


class cuda_redirected(TorchFunctionMode):  # noqa: N801 (used as a context manager, like torch's own modes)
    """While active, tensors that sam3 asks for on "cuda" are made on `device` instead, and `Tensor.pin_memory()`
    (a CUDA host-memory request, then copied to the tensor's own device) returns the tensor itself.

    The places in sam3 0.1.4 this is for, all of them device placement only (tests/test_sam3_engine.py checks the
    results equal the package's own CPU computations):
    - `PositionEmbeddingSine(precompute_resolution=...)` fills its cache with `torch.zeros(..., device="cuda")`
      (the builder asks for it for the vision backbone);
    - `TransformerDecoder.__init__` precomputes its box-relative position coordinates with `device="cuda"`;
    - `SequenceGeometryEncoder._encode_boxes` calls `pin_memory()` on the boxes' scale (every text query goes
      through it, with zero boxes).
    Other torch calls pass through unchanged. The model is built inside it on every device (so "cuda" means the
    model's device, cuda:N included, not cuda:0) and run inside it off CUDA only."""

    def __init__(self, device: str | torch.device):
        super().__init__()
        self.device = torch.device(device)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.pin_memory:
            return args[0]
        requested = kwargs.get("device")
        if requested is not None and torch.device(requested).type == "cuda":
            kwargs = {**kwargs, "device": self.device}
        return func(*args, **kwargs)


def _import_sam3() -> None:
    """Import the sam3 package, undoing what its import does to global state: sam3.model_builder turns on TF32
    matmuls and convolutions for the whole process when a CUDA device of compute capability >= 8 is present. The
    service's numeric precision is its own settings' business, not a side effect of loading SAM 3."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    import sam3.model_builder  # noqa: F401

    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@dataclass(frozen=True)
class ImageFeatures:
    """One image encoded by SAM 3's vision backbone (`Sam3Image.backbone.forward_image` on the (1, 3, R, R)
    input): its output dict (feature pyramid "backbone_fpn", "vision_pos_enc", ...) on the model's device, and
    the image's (H, W). Read-only: each query works on a shallow copy."""

    backbone_out: dict
    original_size: tuple[int, int]


class Sam3Masks(LazyMasks):
    """N masks (H, W) bool in image pixels from SAM 3's (N, h, w) mask logits, upscaled as they are read
    (detections.LazyMasks). Each mask is what Sam3Processor gives: bilinear upscaling (align_corners=False) of the
    logits to (H, W), sigmoid, > 0.5."""

    def __init__(self, low_res: torch.Tensor, original_size: tuple[int, int]):
        super().__init__(len(low_res), original_size)
        self.low_res = low_res  # (N, h, w) float logits

    @torch.inference_mode()
    def _chunk(self, start: int, stop: int) -> np.ndarray:
        from sam3.model.data_misc import interpolate

        logits = interpolate(self.low_res[start:stop].unsqueeze(1), self.shape[1:], mode="bilinear",
                             align_corners=False).sigmoid()
        return (logits[:, 0] > 0.5).cpu().numpy()


class Sam3Engine:
    """Owns one SAM 3 image model (`sam3.model.sam3_image.Sam3Image`). `detect` is safe to call from several
    threads (the model runs under a lock). With a cache, each image is encoded once for all its phrases and
    prompts (~45 s on 2 CPU cores at 1008x1008), and each (image, phrase) query runs once (~6 s there)."""

    def __init__(self, model: torch.nn.Module, device: str, cache: EmbeddingCache | None = None,
                 resolution: int = RESOLUTION):
        """model: a Sam3Image, e.g. `sam3.model_builder.build_sam3_image_model`'s (or a smaller one built from
        the package's parts); resolution: its input square's side."""
        _import_sam3()
        from sam3.model.data_misc import FindStage
        from torchvision.transforms import v2

        self.device = device
        on_cuda = torch.device(device).type == "cuda"
        self._mode = contextlib.nullcontext if on_cuda else (lambda: cuda_redirected(device))
        with self._mode():
            self.model = model.eval().to(device)
        self.cache = cache
        self.resolution = resolution
        # Sam3Processor's preprocessing and its one-image, one-text find stage.
        self._transform = v2.Compose([
            v2.ToDtype(torch.uint8, scale=True),
            v2.Resize(size=(resolution, resolution)),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
        ])
        zero = torch.tensor([0], device=device, dtype=torch.long)
        self._find_stage = FindStage(img_ids=zero, text_ids=zero, input_boxes=None, input_boxes_mask=None,
                                     input_boxes_label=None, input_points=None, input_points_mask=None)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, checkpoint: str, tokenizer: str, device: str, cache: EmbeddingCache | None = None) -> Sam3Engine:
        """Build the published SAM 3 image model (`build_sam3_image_model`, ~841 M parameters) and load
        `checkpoint`: the published sam3.pt layout (keys "detector.*" for the image model, "tracker.*" for the
        video tracker, which the image model does not use), or a bare image-model state dict.

        tokenizer: the CLIP BPE vocabulary file (bpe_simple_vocab_16e6.txt.gz). Raises ModelLoadError naming the
        variable and the file: a missing or unreadable file, one torch can't read, or one that lacks weights the
        model needs (the package's own loader only prints those and goes on with random weights)."""
        require_file("SAM3_CHECKPOINT", checkpoint)
        require_file("SAM3_TOKENIZER", tokenizer)
        try:  # before the 10 s build: a truncated or foreign file fails at once
            try:  # memory-mapped: the 3.4 GB are not held twice while they are copied into the model
                state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # a file in torch's legacy (pre-zip) format can't be mapped
                state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelLoadError(f"SAM3_CHECKPOINT={checkpoint}: could not read it as a checkpoint: {e}") from e
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        if not isinstance(state, dict):
            raise ModelLoadError(f"SAM3_CHECKPOINT={checkpoint}: not a state dict")
        if any(k.startswith("detector.") for k in state):
            state = {k.removeprefix("detector."): v for k, v in state.items() if k.startswith("detector.")}
        device = resolve_device(device)
        _import_sam3()
        from sam3.model_builder import build_sam3_image_model

        try:  # the builder's "cuda" tensors are made on `device` (on cuda:N too, where "cuda" would be cuda:0)
            with cuda_redirected(device):
                model = build_sam3_image_model(bpe_path=tokenizer, device="cpu", checkpoint_path=None,
                                               load_from_HF=False, enable_segmentation=True,
                                               enable_inst_interactivity=False)
        except Exception as e:  # a tokenizer file that is not the gzipped BPE vocabulary
            raise ModelLoadError(f"SAM3_TOKENIZER={tokenizer}: could not build SAM 3 with it: {e}") from e
        try:
            missing, _ = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # a tensor of another shape: another model's weights
            raise ModelLoadError(f"SAM3_CHECKPOINT={checkpoint}: not SAM 3 image-model weights: {e}") from e
        if missing:
            raise ModelLoadError(f"SAM3_CHECKPOINT={checkpoint}: not SAM 3 image-model weights: {len(missing)} "
                                 f"of its tensors are missing (e.g. {', '.join(missing[:3])})")
        del state
        return cls(model, device, cache)

    @torch.inference_mode()
    def encode(self, image: np.ndarray) -> ImageFeatures:
        """(H, W, 3) uint8 RGB -> its features (the expensive step: one vision backbone pass), as
        Sam3Processor.set_image computes them."""
        from torchvision.transforms import v2

        tensor = self._transform(v2.functional.to_image(image).to(self.device)).unsqueeze(0)
        with self._lock, self._mode():
            backbone_out = self.model.backbone.forward_image(tensor)
        return ImageFeatures(backbone_out, tuple(image.shape[:2]))

    def features_for(self, image: np.ndarray, image_id: str | None = None) -> ImageFeatures:
        """The image's features, from the cache when `image_id` (cache.image_digest) is given."""
        if self.cache is None or image_id is None:
            return self.encode(image)
        return self.cache.get(("sam3-features", id(self), image_id), lambda: self.encode(image))

    @torch.inference_mode()
    def grounding(self, features: ImageFeatures, text: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One text query on an encoded image, all of SAM 3's queries (Q = 200 for the published model): scores
        (Q,) = sigmoid(logit) * sigmoid(presence), boxes (Q, 4) cxcywh normalised to the input square, mask logits
        (Q, h, w) (h = w = resolution / 3.5: 288 at 1008), as Sam3Processor._forward_grounding reads them."""
        with self._lock, self._mode():
            text_out = self.model.backbone.forward_text([text], device=self.device)
            backbone_out = {**features.backbone_out, **text_out}
            outputs = self.model.forward_grounding(backbone_out=backbone_out, find_input=self._find_stage,
                                                   geometric_prompt=self.model._get_dummy_prompt(),
                                                   find_target=None)
        probs = outputs["pred_logits"].sigmoid()
        presence = outputs["presence_logit_dec"].sigmoid().unsqueeze(1)
        return (probs * presence).squeeze(-1)[0], outputs["pred_boxes"][0], outputs["pred_masks"][0]

    @torch.inference_mode()
    def query(self, features: ImageFeatures, text: str, score_threshold: float, image_id: str | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One text query, as Sam3Processor.set_text_prompt runs it (confidence_threshold = score_threshold).
        With `image_id`, the query's outputs are cached (~66 MB at 1008: the 200 mask logits), so the same
        phrase on the same image again (another threshold, Retrieve Predictions again) runs no model.

        Returns, for the queries whose score is > score_threshold, in the model's query order: boxes (K, 4)
        float32 xyxy image pixels, scores (K,), mask logits (K, h, w)."""
        if self.cache is None or image_id is None:
            scores, boxes, masks = self.grounding(features, text)
        else:
            key = ("sam3-query", id(self), image_id, text)
            scores, boxes, masks = self.cache.get(key, lambda: self.grounding(features, text))
        from sam3.model import box_ops

        keep = scores > score_threshold
        height, width = features.original_size
        xyxy = box_ops.box_cxcywh_to_xyxy(boxes[keep]) * torch.tensor([width, height, width, height]).to(
            self.device)[None, :]
        return xyxy, scores[keep], masks[keep]

    def detect(self, image: np.ndarray, phrases: Sequence[Phrase], score_threshold: float | Sequence[float],
               max_detections: int = 50, nms_iou: float = 0.7, image_id: str | None = None) -> Detections:
        """Find the phrases in one image: one SAM 3 text query per phrase, each detection labeled with its
        phrase's label.

        image: (H, W, 3) uint8 RGB, displayed orientation; image_id: its identity (cache.image_digest) for the
        cache, None: no caching. A query is a detection when its score exceeds `score_threshold` (one for all
        phrases, or one per phrase). Then per-label NMS at `nms_iou` (1.0: none; SAM 3 itself does none, and its
        queries rarely duplicate), and the `max_detections` best scores. Returns Detections with xyxy (N, 4)
        float32 image pixels (not clamped, as Sam3Processor gives them), scores (N,) and masks (N, H, W) bool (a lazy
        Sam3Masks), sorted by score."""
        if not phrases:
            return Detections.empty()
        features = self.features_for(image, image_id)
        gates = np.broadcast_to(score_threshold, len(phrases)).tolist()
        found = [(phrase, *self.query(features, phrase.text, gate, image_id))
                 for phrase, gate in zip(phrases, gates, strict=True)]
        boxes = torch.cat([f[1] for f in found]).float().cpu()
        scores = torch.cat([f[2] for f in found]).float().cpu()
        masks = torch.cat([f[3] for f in found])
        labels = [phrase.label for phrase, b, *_ in found for _ in range(len(b))]
        if not len(labels):
            return Detections.empty()
        label_ids = torch.tensor([sorted(set(labels)).index(label) for label in labels])
        order = torch.sort(scores, descending=True, stable=True).indices  # ties keep the model's query order
        if nms_iou < 1.0:  # (at 1.0 nothing is suppressed)
            order = batched_nms(boxes, scores, label_ids, nms_iou)
        order = order[:max_detections]
        return Detections(boxes[order].numpy(), scores[order].numpy(), [labels[i] for i in order.tolist()],
                          Sam3Masks(masks[order.to(masks.device)], features.original_size))


