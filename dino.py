"""Grounding DINO: text phrases -> labeled boxes in the image's pixel frame."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms, box_convert

from cache import EmbeddingCache
from config import require_file
from detections import Detections
from device import Autocast, autocast, in_warmed_batches, resolve_device
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


def input_size(height: int, width: int, short: int = 800, longest: int = 1333) -> tuple[int, int]:
    """The (h, w) Grounding DINO reads an image of (height, width) pixels at: the short side `short` unless the long
    side would exceed `longest`, then the long side about `longest`; rounded as groundingdino's
    `RandomResize([800], max_size=1333)` rounds (its training and `load_image` sizes)."""
    low, high = min(height, width), max(height, width)
    if high / low * short > longest:
        short = int(round(longest * low / high))
    if low == short:
        return height, width
    if width < height:
        return int(short * height / width), short
    return short, int(short * width / height)


def deformable_attention_kernel(device: str) -> str:
    """Which multi-scale deformable attention Grounding DINO runs on `device`: "cuda op" (the compiled kernel of
    IDEA's groundingdino, `groundingdino._C`, used for CUDA tensors) or "pytorch, levels batched"
    (`levels_batched_deformable_attention`, which GroundingDino installs). The rf-groundingdino package we install
    has no compiled op, so it is the latter on every device."""
    import importlib.util

    from groundingdino.models.GroundingDINO import ms_deform_attn

    compiled = (hasattr(ms_deform_attn, "MultiScaleDeformableAttnFunction")
                and importlib.util.find_spec("groundingdino._C") is not None)
    return "cuda op" if compiled and torch.device(device).type == "cuda" else "pytorch, levels batched"


def levels_batched_deformable_attention(value: torch.Tensor, spatial_shapes: torch.Tensor,
                                        sampling_locations: torch.Tensor, attention_weights: torch.Tensor
                                        ) -> torch.Tensor:
    """groundingdino's `multi_scale_deformable_attn_pytorch` with every feature level in one weighted gather.

    The library samples each level with its own `grid_sample` (bilinear, zero padding, align_corners=False), stacks
    the levels' samples and sums them under the attention weights: per call, four samplings, a stack of
    (B·heads, C, Q, L·P) and host syncs on the level sizes. Here each sample's four bilinear neighbours, across all
    levels, are indices into the flattened value and their bilinear weights times its attention weight, and one
    `embedding_bag` sums them: no per-level work, nothing as large as the stack, no host sync. Same result to float
    rounding (tests/test_dino.py).

    value: (B, S, heads, C), the levels' maps flattened row-major one after another (S = Σ h·w);
    spatial_shapes: (L, 2) integer (h, w) of each level; sampling_locations: (B, Q, heads, L, P, 2), x and y in
    [0, 1] of each level's map; attention_weights: (B, Q, heads, L, P). Returns (B, Q, heads·C)."""
    batch, size, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    shapes = spatial_shapes.to(value.device)
    height, width = shapes[:, 0, None, None], shapes[:, 1, None, None]  # (L, 1, 1), against (..., L, P, 2)
    starts = (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:, None, None] - height * width
    # Each (image, head) gathers from its own block of the (B·heads·S, C) table.
    blocks = torch.arange(batch * heads, device=value.device).view(batch, 1, heads, 1, 1, 1) * size + starts
    # A sample's two neighbours along each axis, in grid_sample's frame (align_corners=False: pixel centres at
    # integer + 0.5), each weighted 1 - its distance, or 0 outside the map (zero padding): (B, Q, heads, L, P, 2).
    near = torch.arange(2, device=value.device, dtype=sampling_locations.dtype)
    x = sampling_locations[..., 0, None] * width - 0.5
    y = sampling_locations[..., 1, None] * height - 0.5
    xs, ys = x.floor() + near, y.floor() + near
    x_weights = (1 - (x - xs).abs()) * ((xs >= 0) & (xs < width))
    y_weights = (1 - (y - ys).abs()) * ((ys >= 0) & (ys < height)) * attention_weights[..., None]
    columns = xs.clamp(min=0).minimum(width - 1).long()
    rows = blocks + ys.clamp(min=0).minimum(height - 1).long() * width
    # The four neighbours: (B·Q·heads, L·P·4) indices and weights, one bag per (image, query, head).
    indices = (rows[..., :, None] + columns[..., None, :]).view(-1, levels * points * 4)
    weights = (y_weights[..., :, None] * x_weights[..., None, :]).view(-1, levels * points * 4)
    table = value.transpose(1, 2).reshape(batch * heads * size, channels)
    output = F.embedding_bag(indices, table, mode="sum", per_sample_weights=weights.to(value.dtype))
    return output.view(batch, queries, heads * channels)


def use_levels_batched_deformable_attention() -> None:
    """Have groundingdino's deformable attention modules call `levels_batched_deformable_attention`. Process-wide:
    they look `multi_scale_deformable_attn_pytorch` up in their module at each call."""
    from groundingdino.models.GroundingDINO import ms_deform_attn

    ms_deform_attn.multi_scale_deformable_attn_pytorch = levels_batched_deformable_attention


class TextFeatures(torch.nn.Module):
    """Grounding DINO's text encoder (BERT), run once per caption: wraps `model.bert` and keeps the last
    `size` captions' outputs, keyed by the exact tensors the model hands it (token ids, its sub-sentence attention
    mask, position ids), so every image of a bulk job, and every repeated prompt, reuses the first one's. A batch
    whose rows are one caption is encoded from its first row and expanded (a bulk batch shares its prompt).

    Called with (1 or B, T) integer tensors as keywords; returns {"last_hidden_state": (B, T, 768)}, what the
    model reads. Not thread-safe by itself: GroundingDino runs the model under its lock."""

    def __init__(self, encoder: torch.nn.Module, size: int = 16):
        super().__init__()
        self.encoder, self.size = encoder, size
        self._outputs: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def forward(self, **inputs: torch.Tensor) -> dict:
        batch = next(iter(inputs.values())).shape[0]
        first = {name: value[:1] for name, value in inputs.items()}
        if any(not torch.equal(value, first[name].expand_as(value)) for name, value in inputs.items()):
            return self.encoder(**inputs)  # different captions in one batch: not what the service sends
        key = tuple((name, value.shape, value.cpu().numpy().tobytes()) for name, value in sorted(first.items()))
        hidden = self._outputs.get(key)
        if hidden is None:
            hidden = self.encoder(**first)["last_hidden_state"]
            self._outputs[key] = hidden
            while len(self._outputs) > self.size:
                self._outputs.popitem(last=False)
        self._outputs.move_to_end(key)
        return {"last_hidden_state": hidden.expand(batch, *hidden.shape[1:])}


class CompiledBackbone(torch.nn.Module):
    """Grounding DINO's Swin image backbone, `torch.compile`d (static shapes) for each input size it meets, in the
    background.

    The input size follows each image's aspect ratio (`input_size`), so one static compile does not fit all
    images, a compile on the first image of a size would hold that request for a minute, dynamic shapes did not
    finish compiling in 125 s on an H200, and padding to a few bucket sizes would change Swin's features (its
    windows see the padding). So the first image of a new (h, w) runs eager and queues that size; a daemon thread
    compiles it and warms it up at each of `batch_sizes`; from then on that size runs compiled, a batch padded with
    blank images up to the next warmed batch size (`device.in_warmed_batches`, as the segmenter's: Swin's images
    don't interact). At most `limit` sizes are compiled, the first ones seen (a project's images mostly share a few
    sizes); the rest run eager. No request compiles. A failed compile is logged and leaves that size eager.

    Called as the library's `SwinTransformer` is: a NestedTensor of (B, 3, h, w) images and (B, h, w) padding mask
    -> {level: NestedTensor((B, C, h', w') features, (B, h', w') mask)}."""

    def __init__(self, swin: torch.nn.Module, device: str, dtype: torch.dtype | None,
                 batch_sizes: Sequence[int] = (1,), limit: int = 4):
        super().__init__()
        self.swin, self.device, self.dtype = swin, device, dtype
        self.batch_sizes, self.limit = tuple(sorted(set(batch_sizes))), limit
        self.ready: set[tuple[int, int]] = set()  # (h, w) compiled and warmed at every batch size
        self._seen: set[tuple[int, int]] = set()  # queued, compiled or failed: never queued again
        self._queue: queue.Queue[tuple[int, int]] = queue.Queue()
        self._idle = threading.Condition()
        self._thread: threading.Thread | None = None
        # Every (size, batch size) is a cache entry of the one compiled function: let dynamo keep them all.
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                                   limit * len(self.batch_sizes) + 1)
        self._compiled = torch.compile(swin.forward_raw, dynamic=False)

    def forward(self, tensor_list) -> dict:
        from groundingdino.util.misc import NestedTensor

        images = tensor_list.tensors
        size = tuple(images.shape[-2:])
        if size in self.ready:
            outs = in_warmed_batches(self._compiled, images, self.batch_sizes)
        else:
            self._request(size)
            outs = self.swin.forward_raw(images)
        # The padding mask at each level, as SwinTransformer.forward makes it.
        mask = tensor_list.mask[None].float()
        return {level: NestedTensor(out, F.interpolate(mask, size=out.shape[-2:]).to(torch.bool)[0])
                for level, out in enumerate(outs)}

    def _request(self, size: tuple[int, int]) -> None:
        """Queue `size` for the compile thread, once, while fewer than `limit` sizes are taken."""
        with self._idle:
            if size in self._seen or len(self._seen) >= self.limit:
                return
            self._seen.add(size)
            self._queue.put(size)
            if self._thread is None:
                self._thread = threading.Thread(target=self._compile_queued, name="compile-backbone", daemon=True)
                self._thread.start()

    def _compile_queued(self) -> None:
        while True:
            size = self._queue.get()
            started = time.perf_counter()
            try:
                for batch in self.batch_sizes:
                    with torch.no_grad(), autocast(self.device, self.dtype):
                        self._compiled(torch.zeros(batch, 3, *size, device=self.device))
            except Exception:  # that size stays eager; the service goes on
                logger.exception("torch.compile of Grounding DINO's backbone for input %d×%d failed; it runs eager",
                                 size[1], size[0])
            else:
                self.ready.add(size)
                logger.info("torch.compile: Grounding DINO's backbone compiled for input %d×%d and warmed up at batch "
                            "sizes %s in %.1f s", size[1], size[0], ", ".join(map(str, self.batch_sizes)),
                            time.perf_counter() - started)
            with self._idle:
                self._queue.task_done()
                self._idle.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every queued size is compiled or failed; False if `timeout` seconds pass first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._queue.unfinished_tasks == 0, timeout)


class GroundingDino:
    """Owns one Grounding DINO model. `detect` is safe to call from several threads: the
    model keeps per-call image features on itself, so calls are serialised by a lock.

    With a cache, an image's backbone features are computed once (the text-independent part of
    the model), and the raw outputs for one image and caption once (a repeated prompt); `encode_batch`
    computes both for several images in one pass. The caption's text features are computed once per caption
    (`TextFeatures`), with or without a cache. dtype: the autocast dtype (None: float32) of the image
    backbone (Swin) and the text encoder (BERT); the transformer that fuses them, selects queries and refines
    boxes stays float32 (README "GPU" says why), and every output is float32."""

    def __init__(self, model: torch.nn.Module, device: str, cache: EmbeddingCache | None = None,
                 dtype: torch.dtype | None = None):
        self.model = model.eval().to(device)
        self.device = device
        self.cache = cache
        self.dtype = dtype
        if dtype is not None:
            self.model.backbone = Autocast(self.model.backbone, device, dtype)
            self.model.bert = Autocast(self.model.bert, device, dtype)
        if not isinstance(self.model.bert, TextFeatures):  # a bulk job's prompt is encoded once, not per image
            self.model.bert = TextFeatures(self.model.bert)
        self.max_text_len = int(getattr(model, "max_text_len", 256))
        self._lock = threading.Lock()
        use_levels_batched_deformable_attention()
        # ImageNet statistics, as groundingdino's transforms normalise.
        self._mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(3, 1, 1) * 255
        self._std = torch.tensor([0.229, 0.224, 0.225], device=device).view(3, 1, 1) * 255

    @classmethod
    def load(cls, config_path: str, checkpoint_path: str, text_encoder: str, device: str,
             cache: EmbeddingCache | None = None, dtype: torch.dtype | None = None) -> GroundingDino:
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
        return cls(model, device, cache, dtype)

    def compile(self, batch_sizes: Sequence[int] = (1,)) -> CompiledBackbone:
        """Have the Swin backbone compiled for each input size it meets, in the background (`CompiledBackbone`)."""
        joiner = self.model.backbone.module if isinstance(self.model.backbone, Autocast) else self.model.backbone
        if not isinstance(joiner[0], CompiledBackbone):
            joiner[0] = CompiledBackbone(joiner[0], self.device, self.dtype, batch_sizes)
        return joiner[0]

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (3, h, w) float32 on the model's device, at `input_size`, normalised: what
        groundingdino's `load_image` makes with PIL, resized on the device instead.

        On the CPU torch's uint8 antialiased resize (PIL's fixed-point arithmetic; a few pixels in ten thousand
        differ by one level); on a GPU, which has no uint8 resize, the same filter in float32, rounded to whole
        levels (about one pixel in six differs by one level). Either way only the uint8 image crosses to the device."""
        size = input_size(*image.shape[:2])
        pixels = torch.from_numpy(np.ascontiguousarray(image)).to(self.device).permute(2, 0, 1)[None]
        if pixels.device.type == "cpu":
            resized = F.interpolate(pixels, size, mode="bilinear", antialias=True).float()
        else:
            resized = F.interpolate(pixels.float(), size, mode="bilinear", antialias=True).round_().clamp_(0, 255)
        return (resized[0] - self._mean) / self._std

    def detect(
        self,
        image: np.ndarray,
        phrases: Sequence[Phrase],
        box_threshold: float | Sequence[float],
        text_threshold: float | Sequence[float],
        max_detections: int = 50,
        nms_iou: float = 0.7,
        image_id: str | None = None,
    ) -> Detections:
        """Find the phrases in one image.

        image: (H, W, 3) uint8 RGB, displayed orientation. Returns boxes in that image's pixels.
        image_id: the image's identity (cache.image_digest) for the cache; None: no caching.
        A query becomes a detection when its best token score over the whole caption exceeds
        `box_threshold` (its score, as in groundingdino's `predict`); it goes to the phrase whose
        tokens score highest, and is kept if that phrase's best token exceeds `text_threshold`. Either threshold
        is one for all phrases, or one per phrase (the detection is gated by its phrase's).
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
            logits, boxes = self.cache.get(self._outputs_key(image_id, caption),
                                           lambda: self._forward(image, caption, image_id))
        return self._select(logits, boxes, spans, usable, phrases, image.shape[:2],
                            box_threshold, text_threshold, max_detections, nms_iou)

    def _forward(self, image: np.ndarray, caption: str, image_id: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token scores (queries, 256) and boxes (queries, 4) cxcywh normalised, on the CPU."""
        tensor = self.preprocess(image)[None]
        with self._lock, torch.no_grad():
            if self.cache is not None and image_id is not None:
                features, poss = self.cache.get(self._backbone_key(image_id), lambda: self._backbone(tensor))
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

    def encode_batch(self, images: Sequence[np.ndarray], image_ids: Sequence[str], phrases: Sequence[Phrase]
                     ) -> None:
        """Run the model on several images for one prompt, leaving each image's backbone features and outputs
        in the cache, where `detect` then finds them. Images of one preprocessed size share a forward pass;
        others get their own, since padding them to a common size would change their results. Needs a cache.

        images: (H, W, 3) uint8 RGB each; image_ids: their cache.image_digest."""
        if self.cache is None or not phrases:
            return
        caption, _ = caption_and_spans(phrases, self.model.tokenizer)
        groups: dict[tuple, list[tuple[torch.Tensor, str]]] = {}
        for image, image_id in zip(images, image_ids, strict=True):
            if self._outputs_key(image_id, caption) not in self.cache:
                tensor = self.preprocess(image)
                groups.setdefault(tuple(tensor.shape), []).append((tensor, image_id))
        from groundingdino.util.misc import NestedTensor

        for members in groups.values():
            batch = torch.stack([tensor for tensor, _ in members])
            with self._lock, torch.no_grad():
                features, poss = self._backbone(batch)
                self.model.set_image_features(list(features), list(poss))
                outputs = self.model(batch, captions=[caption] * len(members))
            logits, boxes = outputs["pred_logits"].cpu().sigmoid(), outputs["pred_boxes"].cpu()
            for i, (_, image_id) in enumerate(members):
                one = slice(i, i + 1)
                self.cache.put(self._backbone_key(image_id),
                               ([NestedTensor(f.tensors[one], f.mask[one]) for f in features], [p[one] for p in poss]))
                self.cache.put(self._outputs_key(image_id, caption), (logits[i], boxes[i]))

    def _backbone_key(self, image_id: str) -> tuple:
        """The cache key of an image's backbone features (the same for every caption)."""
        return ("groundingdino-backbone", id(self), image_id)

    def _outputs_key(self, image_id: str, caption: str) -> tuple:
        """The cache key of the raw outputs for an image and a caption."""
        return ("groundingdino-outputs", id(self), image_id, caption)

    @staticmethod
    def _select(logits, boxes, spans, usable, phrases, size, box_threshold, text_threshold, max_detections, nms_iou):
        height, width = size
        scores = logits.max(dim=1).values
        phrase_scores = torch.stack([logits[:, spans[i]].max(dim=1).values for i in usable], dim=1)
        best_score, best = phrase_scores.max(dim=1)
        phrase_index = torch.tensor(usable)[best]
        gate = lambda t: torch.tensor(np.broadcast_to(t, len(phrases)), dtype=scores.dtype)[phrase_index]  # noqa: E731
        keep = (scores > gate(box_threshold)) & (best_score > gate(text_threshold))
        if not keep.any():
            return Detections.empty()
        xyxy = box_convert(boxes[keep] * torch.tensor([width, height, width, height]), "cxcywh", "xyxy")
        xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, width)
        xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, height)
        scores, phrase_index = scores[keep], phrase_index[keep]
        labels = [phrases[i].label for i in phrase_index.tolist()]
        label_ids = torch.tensor([sorted(set(labels)).index(label) for label in labels])
        order = batched_nms(xyxy, scores, label_ids, nms_iou)[:max_detections]  # sorted by score
        return Detections(xyxy[order].numpy(), scores[order].numpy(), [labels[i] for i in order.tolist()])
