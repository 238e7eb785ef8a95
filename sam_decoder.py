"""SAM's mask decoder, with the work that depends on the image alone done once per image.

segment_anything's MaskDecoder (MobileSAM's is the same code) runs, for every prompt, a two-way
transformer between the prompt tokens and the 64x64 image tokens. Its first layer starts from the image
alone: the image embedding plus the no-mask dense prompt embedding, that sum plus the dense positional
encoding, and three projections of all 4096 image tokens (keys and values of the tokens-to-image
attention, queries of the image-to-tokens attention). That is about a quarter of a click's decoder pass
on CPU, and the stock decoder repeats it for every box of a batch. `PromptDecoder.prepare` computes it
once per image; `PromptDecoder.decode` runs the rest with the model's own layers, in MaskDecoder's order
of operations on the same tensors, so masks and IoUs are bit-identical to MaskDecoder.forward
(tests/test_sam_decoder.py).

Frames: image tokens are the 64x64 embedding grid in row-major order, (1, 4096, C); prompt tokens are
(B, T, 256) for B prompts of T tokens each (the 5 output tokens, then points and box corners).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecoderInput:
    """The decoder's per-image inputs, computed once by PromptDecoder.prepare.

    src: (1, 256, 64, 64) image embedding plus the no-mask dense prompt embedding.
    t2i_keys, t2i_values: (1, 4096, 128) first layer's tokens-to-image attention keys and values.
    i2t_queries: (1, 4096, 128) first layer's image-to-tokens attention queries.
    """

    src: torch.Tensor
    t2i_keys: torch.Tensor
    t2i_values: torch.Tensor
    i2t_queries: torch.Tensor


def _heads(x: torch.Tensor, num_heads: int, batch: int) -> torch.Tensor:
    """(b, N, C) -> (batch, heads, N, C / heads), as Attention._separate_heads; b == 1 is broadcast."""
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2).expand(batch, -1, -1, -1)


def _attend(attention: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention.forward after its input projections: q, k, v are (B, heads, N, c) -> (B, Nq, 256)."""
    attn = q @ k.permute(0, 1, 3, 2)
    attn = attn / math.sqrt(q.shape[-1])
    attn = torch.softmax(attn, dim=-1)
    out = attn @ v
    b, heads, n, c = out.shape
    return attention.out_proj(out.transpose(1, 2).reshape(b, n, heads * c))


class PromptDecoder:
    """Decodes batches of prompt embeddings against a prepared image with one Sam model's mask decoder.

    Holds no per-image state: prepare() returns it, and decode() takes it, so one PromptDecoder serves
    every image and thread (callers serialise model use themselves).

    chunk: prompts per pass through the transformer and the upscaling convolutions (None: the whole batch).
    On CPU a pass over 64 prompts streams 64 x 4096 x 256 fp32 image tokens (256 MiB) through memory for
    each of the transformer's operations, and the upscaled 64 x 32 x 256 x 256 (512 MiB); 4 at a time they
    stay in cache: a segment-everything batch decodes in about 0.6 of the time. A batch is split into
    near-equal chunks (9 prompts: 3, 3 and 3), and the heads that read the output tokens (predicted IoU,
    hypernetworks) run on the whole batch, as MaskDecoder runs them: on this machine's CPU kernels the
    results are the same bits as one pass (tests/test_sam_decoder.py).
    """

    def __init__(self, model: torch.nn.Module, chunk: int | None = None):
        self.model = model
        self.chunk = chunk
        with torch.no_grad():
            # (1, 4096, 256): the same for every image and prompt, so computed once.
            self.image_pe = model.prompt_encoder.get_dense_pe().flatten(2).permute(0, 2, 1)

    @torch.no_grad()
    def prepare(self, features: torch.Tensor) -> DecoderInput:
        """features: (1, 256, 64, 64) from the image encoder -> the decoder's per-image inputs."""
        prompt_encoder = self.model.prompt_encoder
        dense = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        src = features + dense.expand(1, -1, *prompt_encoder.image_embedding_size)
        keys = src.flatten(2).permute(0, 2, 1)
        keys_pe = keys + self.image_pe
        layer = self.model.mask_decoder.transformer.layers[0]
        return DecoderInput(src, layer.cross_attn_token_to_image.k_proj(keys_pe),
                            layer.cross_attn_token_to_image.v_proj(keys),
                            layer.cross_attn_image_to_token.q_proj(keys_pe))

    @torch.no_grad()
    def decode(self, image: DecoderInput, sparse: torch.Tensor,
               multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """sparse: (B, P, 256) prompt embeddings from the prompt encoder (no mask input).

        Returns low-resolution mask logits (B, C, 256, 256) and predicted IoUs (B, C), C = 3 if
        multimask else 1, as MaskDecoder.forward.
        """
        iou, _, masks = self.decode_above(image, sparse, multimask, None)
        return masks, iou

    @torch.no_grad()
    def decode_above(self, image: DecoderInput, sparse: torch.Tensor, multimask: bool,
                     iou_thresh: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """decode, but the masks only of the prompts with a predicted IoU above `iou_thresh` (None: every prompt)
        (the IoUs need the transformer alone; the upscaling convolutions and mask products are skipped for the
        others).

        Returns IoUs (B, C) of every prompt, the indices (K,) of the prompts with masks, and their logits
        (K, C, 256, 256), each the same as decode's."""
        decoder = self.model.mask_decoder
        out = slice(1, None) if multimask else slice(0, 1)
        passes = [(part, *self._transformer(image, sparse[part])) for part in self._chunks(len(sparse))]
        hs = torch.cat([tokens for _, tokens, _ in passes])
        iou = decoder.iou_prediction_head(hs[:, 0, :])[:, out]
        mask_tokens = hs[:, 1 : 1 + decoder.num_mask_tokens, :]
        hyper_in = torch.stack([mlp(mask_tokens[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
                               dim=1)
        if iou_thresh is None:
            above = torch.ones(len(iou), dtype=torch.bool, device=iou.device)
        else:
            above = (iou > iou_thresh).any(dim=1)
        selected = torch.nonzero(above).flatten()
        masks = []
        for part, _, keys in passes:
            chosen = torch.nonzero(above[part]).flatten()
            if len(chosen):
                keys = keys if len(chosen) == len(keys) else keys[chosen]
                masks.append(self._masks(image, hyper_in[chosen + part.start], keys)[:, out])
        if not masks:  # no prompt above the threshold (an empty or flat image)
            return iou, selected, hs.new_zeros((0, iou.shape[1], 4 * image.src.shape[2], 4 * image.src.shape[3]))
        return iou, selected, torch.cat(masks)

    def _chunks(self, batch: int) -> list[slice]:
        """[0, batch) cut into near-equal slices of at most `chunk` prompts, none under 3 (two prompts' token
        projections, 14 rows, take another CPU kernel than the batch's: not the same bits)."""
        count = 1 if self.chunk is None else max(1, min(-(-batch // self.chunk), batch // 3))
        sizes = [batch // count + (i < batch % count) for i in range(count)]
        bounds = [sum(sizes[:i]) for i in range(count + 1)]
        return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def _transformer(self, image: DecoderInput, sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two-way transformer: (B, P, 256) prompt embeddings -> output tokens hs (B, T, 256) and image
        tokens (B, 4096, 256)."""
        decoder = self.model.mask_decoder
        transformer = decoder.transformer
        batch = sparse.shape[0]
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse), dim=1)
        keys = image.src.flatten(2).permute(0, 2, 1).expand(batch, -1, -1)
        image_pe = self.image_pe.expand(batch, -1, -1)

        queries, keys = self._first_layer(image, tokens, keys)
        for layer in transformer.layers[1:]:
            queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=image_pe)
        attn_out = transformer.final_attn_token_to_image(q=queries + tokens, k=keys + image_pe, v=keys)
        return transformer.norm_final_attn(queries + attn_out), keys

    def _masks(self, image: DecoderInput, hyper_in: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Hypernetwork outputs (B, 4, 32) and image tokens (B, 4096, 256) -> every mask token's logits
        (B, 4, 256, 256) (all four, as MaskDecoder: the product of one row alone is not the same bits)."""
        batch = keys.shape[0]
        _, c, h, w = image.src.shape
        upscaled = self.model.mask_decoder.output_upscaling(keys.transpose(1, 2).reshape(batch, c, h, w))
        b, c, h, w = upscaled.shape
        return (hyper_in @ upscaled.view(b, c, h * w)).view(b, hyper_in.shape[1], h, w)

    def _first_layer(self, image: DecoderInput, tokens: torch.Tensor,
                     keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TwoWayAttentionBlock.forward of layer 0 (it skips the positional encoding in self-attention),
        with the image-side projections taken from `image`. tokens: (B, T, 256); keys: (B, 4096, 256)."""
        layer = self.model.mask_decoder.transformer.layers[0]
        batch = tokens.shape[0]
        queries = layer.norm1(layer.self_attn(q=tokens, k=tokens, v=tokens))

        attention = layer.cross_attn_token_to_image
        n = attention.num_heads
        q = _heads(attention.q_proj(queries + tokens), n, batch)
        attn_out = _attend(attention, q, _heads(image.t2i_keys, n, batch), _heads(image.t2i_values, n, batch))
        queries = layer.norm2(queries + attn_out)
        queries = layer.norm3(queries + layer.mlp(queries))

        attention = layer.cross_attn_image_to_token
        n = attention.num_heads
        q = queries + tokens
        attn_out = _attend(attention, _heads(image.i2t_queries, n, batch), _heads(attention.k_proj(q), n, batch),
                           _heads(attention.v_proj(queries), n, batch))
        return queries, layer.norm4(keys + attn_out)
