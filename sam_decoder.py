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
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
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
        hs, keys = self._transformer(image, sparse)
        keep = slice(1, None) if multimask else slice(0, 1)
        return self._masks(image, hs, keys)[:, keep], self.model.mask_decoder.iou_prediction_head(hs[:, 0, :])[:, keep]

    @torch.no_grad()
    def decode_above(self, image: DecoderInput, sparse: torch.Tensor, multimask: bool,
                     iou_thresh: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """decode, but the masks only of the prompts with a predicted IoU above `iou_thresh` (the IoUs need the
        transformer alone; the upscaling convolutions and the mask products are skipped for the others).

        Returns IoUs (B, C) of every prompt, the indices (K,) of the prompts with masks, and their logits
        (K, C, 256, 256), each the same as decode's."""
        hs, keys = self._transformer(image, sparse)
        out = slice(1, None) if multimask else slice(0, 1)
        iou = self.model.mask_decoder.iou_prediction_head(hs[:, 0, :])[:, out]
        selected = torch.nonzero((iou > iou_thresh).any(dim=1)).flatten()
        if len(selected) == len(iou):
            return iou, selected, self._masks(image, hs, keys)[:, out]
        return iou, selected, self._masks(image, hs[selected], keys[selected])[:, out]

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

    def _masks(self, image: DecoderInput, hs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Output tokens (B, T, 256) and image tokens (B, 4096, 256) -> every mask token's logits (B, 4, 256, 256)."""
        decoder = self.model.mask_decoder
        batch = hs.shape[0]
        _, c, h, w = image.src.shape
        upscaled = decoder.output_upscaling(keys.transpose(1, 2).reshape(batch, c, h, w))
        mask_tokens = hs[:, 1 : 1 + decoder.num_mask_tokens, :]
        hyper_in = torch.stack([mlp(mask_tokens[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
                               dim=1)
        b, c, h, w = upscaled.shape
        # hyper_in.shape[1], not -1: with no prompt (B = 0: none above decode_above's threshold) -1 is ambiguous.
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
