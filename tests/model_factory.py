"""Small random-weight models saved in the published checkpoints' formats, for tests and benchmarks.

No real weights can be fetched here, so these functions build the same architectures (shrunk where the packages
allow it) with seeded random weights and write them the way the real files are laid out, so that the product's
real loading code (``groundingdino.util.inference.load_model``, ``sam_model_registry[...](checkpoint=...)``,
``AutoTokenizer`` / ``BertModel.from_pretrained``) loads them unchanged.

Importing this module has no side effects: heavy packages are imported inside the functions, and every function
that draws random numbers does so inside ``torch.random.fork_rng`` so the caller's global RNG state is untouched.
Nothing here touches the network; callers should still set ``HF_HUB_OFFLINE=1`` (tests/conftest.py does).
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

# bert-base-uncased's layout: [PAD]=0, [unused0..98]=1..99, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103,
# [unused99..993]=104..998, then single characters from 999: the printable ASCII punctuation, digits and
# lowercase letters in code-point order ('!'=999, ','=1010, '.'=1012, ';'=1025, '?'=1029, 'a'=1037).
VOCAB_SIZE = 30522
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 100, 101, 102, 103
FIRST_CHAR_ID = 999
FIRST_WORD_ID = 1996  # 'the' in the real vocab; whole words start here as they do there
# Whole-word tokens the tests and benchmarks rely on (ids are NOT the real bert-base-uncased ids, only the
# special tokens and the single characters above are).
WORDS = (
    "the a an and of on in with is are this that there "
    "cat cats dog dogs house houses shape shapes round thing things box boxes brown red green blue white black "
    "car cars light lights traffic person people tree trees sky road sign window door wall grass water "
    "object objects circle rectangle square"
).split()

# Cheaper settings written over the packaged GroundingDINO_SwinT_OGC.py (hidden_dim stays 256: the text
# position embedding hard-codes 256 features; nheads stays 8; the Swin-T backbone is already the smallest
# supported one: the ResNet choices need torchvision's pretrained download).
GROUNDINGDINO_OVERRIDES = {
    "enc_layers": 1,
    "dec_layers": 1,
    "dim_feedforward": 256,
    "num_queries": 100,
    "use_checkpoint": False,
    "use_transformer_ckpt": False,
}


def _vocab_tokens() -> list[str]:
    chars = sorted(string.punctuation + string.digits + string.ascii_lowercase)  # code-point order, as in BERT
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [f"[unused{i}]" for i in range(99, 99 + FIRST_CHAR_ID - len(tokens))]
    assert len(tokens) == FIRST_CHAR_ID
    tokens += chars
    unused = 99 + FIRST_CHAR_ID - 104
    while len(tokens) < FIRST_WORD_ID:
        tokens.append(f"[unused{unused}]")
        unused += 1
    words = [w for w in dict.fromkeys(WORDS) if w not in tokens]
    tokens += words
    tokens += ["##" + c for c in string.ascii_lowercase + string.digits]
    while len(tokens) < VOCAB_SIZE:
        tokens.append(f"[unused{unused}]")
        unused += 1
    return tokens


def make_text_encoder(directory: Path, hidden_size: int = 64, layers: int = 1, seed: int = 0) -> Path:
    """Write a small random BERT that ``AutoTokenizer.from_pretrained(dir)`` / ``BertModel.from_pretrained(dir)``
    load offline: config.json + model.safetensors (``BertModel.save_pretrained``) and vocab.txt + tokenizer files
    (``BertTokenizerFast.save_pretrained``), uncased.

    The vocab keeps bert-base-uncased's id layout where Grounding DINO hard-codes ids: 30,522 entries, [PAD]=0,
    [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103, ','=1010, '.'=1012, ';'=1025, '?'=1029 (all single ASCII
    punctuation, digits and letters at their real ids 999..1062). From id 1996 it holds the whole words in
    ``WORDS`` (not at their real ids), then '##a'..'##z', '##0'..'##9' (so every lowercase word tokenises without
    [UNK]), and '[unusedN]' for the rest. Returns ``directory``.
    """
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(_vocab_tokens()) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast.from_pretrained(str(directory), do_lower_case=True, model_max_length=512)
    tokenizer.save_pretrained(str(directory))

    heads = max(1, hidden_size // 32)
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden_size * 2,
        max_position_embeddings=512,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config).eval()
    model.save_pretrained(str(directory))
    return directory


def _write_groundingdino_config(path: Path, text_encoder_dir: Path) -> Path:
    import groundingdino

    source = Path(groundingdino.__file__).parent / "config" / "GroundingDINO_SwinT_OGC.py"
    text = source.read_text(encoding="utf-8")
    overrides = {**GROUNDINGDINO_OVERRIDES, "text_encoder_type": str(text_encoder_dir)}
    for name, value in overrides.items():
        text, count = re.subn(rf"(?m)^{name}\s*=.*$", f"{name} = {value!r}", text)
        if count != 1:
            raise RuntimeError(f"{source} has {count} assignments to {name}, expected 1")
    path.write_text(
        "# Small random-weight Grounding DINO for tests (written by tests/model_factory.py from\n"
        f"# {source.name}).\n" + text,
        encoding="utf-8",
    )
    return path


def make_groundingdino(directory: Path, seed: int = 0, text_encoder_dir: Path | None = None) -> tuple[Path, Path, Path]:
    """Write a small random Grounding DINO; return ``(config_path, checkpoint_path, text_encoder_dir)``.

    - config: the packaged ``GroundingDINO_SwinT_OGC.py`` with ``GROUNDINGDINO_OVERRIDES`` (1 encoder and 1
      decoder layer, dim_feedforward 256, 100 queries, no activation checkpointing) and ``text_encoder_type`` set
      to the local BERT directory. Swin-T backbone, hidden_dim 256 (both fixed by the package, see above).
    - checkpoint: ``torch.save({"model": model.state_dict()})``, the layout of the published
      ``groundingdino_swint_ogc.pth``; it holds every key of the model (BERT included, equal to the text encoder
      directory's weights), so ``load_model``'s ``strict=False`` leaves nothing at random init.
    - text encoder: ``make_text_encoder(directory / "bert")`` unless ``text_encoder_dir`` is given (reused as is).

    Load with ``groundingdino.util.inference.load_model(str(config), str(checkpoint), device="cpu")``.
    Deterministic for a seed (the build runs under ``torch.manual_seed(seed)`` in a forked RNG).
    """
    from groundingdino.models import build_model
    from groundingdino.util.slconfig import SLConfig

    from dino import use_levels_batched_deformable_attention

    # The calibration pass runs the attention the service runs, whatever ran first in this process: the checkpoint
    # is the same for a seed.
    use_levels_batched_deformable_attention()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if text_encoder_dir is None:
        text_encoder_dir = make_text_encoder(directory / "bert", seed=seed)
    text_encoder_dir = Path(text_encoder_dir)
    config_path = _write_groundingdino_config(directory / "GroundingDINO_tiny.py", text_encoder_dir)
    checkpoint_path = directory / "groundingdino_tiny.pth"

    args = SLConfig.fromfile(str(config_path))
    args.device = "cpu"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(args)
        _spread_groundingdino_scores(model, seed)
    torch.save({"model": model.state_dict()}, checkpoint_path)
    return config_path, checkpoint_path, text_encoder_dir


# Calibration input for _spread_groundingdino_scores, and the targets it aims for.
CALIBRATION_CAPTION = "shape . round thing ."
CALIBRATION_IMAGE_SIZE = (64, 48)
TARGET_SCORE_LOGIT_STD = 1.2  # std of the per-query best logit; sigmoid(0 +- 2 std) spans ~0.08..0.92
TARGET_BOX_DELTA_STD = 0.5  # in inverse-sigmoid space, around the two-stage proposals
BOX_SIZE_BIAS = 1.5  # proposals are 0.05 wide on the finest level; this makes typical boxes ~0.15..0.3


@torch.no_grad()
def _spread_groundingdino_scores(model: torch.nn.Module, seed: int) -> None:
    """Rescale two output heads of a random-weight Grounding DINO so its outputs are not degenerate.

    At random init the class logits (a bare dot product ``hs @ text.T`` of 256-d LayerNorm outputs) have a mean
    of ~+15 and a std of ~12, so nearly every sigmoid score is 0.0 or 1.0; and the box head's last layer is
    zero-initialised, so every box is its two-stage proposal (all 0.05 x 0.05). One forward pass on
    ``make_image(64, 48, seed)`` with ``CALIBRATION_CAPTION`` measures them, then:

    - ``transformer.decoder.norm`` (the LayerNorm on the decoder output, read only by the class and box heads):
      weight *= TARGET_SCORE_LOGIT_STD / std over queries of the best token's logit, and bias = -k * t / |t|^2
      with t the mean text feature and k chosen so the median best-token logit is 0: on the calibration input
      predict()'s scores (sigmoid of each query's best token logit) then have median ~0.5 and spread over ~0.1..0.9;
    - ``bbox_embed[0].layers[-1]`` (shared by all decoder layers): seeded normal weights scaled so the box deltas
      have std TARGET_BOX_DELTA_STD, and bias (0, 0, BOX_SIZE_BIAS, BOX_SIZE_BIAS) so boxes vary in place and size.

    Other captions and images get similar but not identical spreads. Runs inside make_groundingdino's forked RNG.
    """
    captured = {}

    def grab(module, args, output):
        captured["hs"], captured["text"] = args[0], args[1]

    image = groundingdino_image_tensor(make_image(*CALIBRATION_IMAGE_SIZE, seed=seed))
    model.eval()
    handle = model.class_embed[-1].register_forward_hook(grab)
    try:
        model(image[None], captions=[CALIBRATION_CAPTION])
    finally:
        handle.remove()
    hs, text = captured["hs"][0], captured["text"]
    mask = text["text_token_mask"][0]
    feats = text["encoded_text"][0][mask]  # valid tokens x 256
    mean_feat = feats.mean(0)
    norm = model.transformer.decoder.norm
    old_bias = norm.bias.clone()
    # hs = w * x_hat + b  ->  w * scale * x_hat + new_bias = (hs - b) * scale + new_bias
    logits = (hs - old_bias) @ feats.T  # queries x valid tokens, before the rescale
    scale = TARGET_SCORE_LOGIT_STD / logits.max(1).values.std().clamp_min(1e-6)
    # A bias along the mean text feature shifts token j's logits by -k * r_j (r_j ~ 1); pick k by bisection so
    # the median over queries of the best token's logit (what predict() reports as the score) is 0.
    direction = mean_feat / mean_feat.dot(mean_feat)
    r = feats @ direction
    lo, hi = -1e4, 1e4
    for _ in range(100):
        k = (lo + hi) / 2
        if (logits * scale - k * r).max(1).values.median() > 0:
            lo = k
        else:
            hi = k
    new_bias = -k * direction
    norm.weight.mul_(scale)
    norm.bias.copy_(new_bias)

    box_out = model.bbox_embed[0].layers[-1]
    generator = torch.Generator().manual_seed(seed)
    box_out.weight.copy_(torch.randn(box_out.weight.shape, generator=generator))
    box_out.bias.zero_()
    hidden = (hs - old_bias) * scale + new_bias
    for layer in model.bbox_embed[0].layers[:-1]:
        hidden = torch.relu(layer(hidden))
    deltas = box_out(hidden)
    box_out.weight.mul_(TARGET_BOX_DELTA_STD / deltas.std().clamp_min(1e-6))
    box_out.bias.copy_(torch.tensor([0.0, 0.0, BOX_SIZE_BIAS, BOX_SIZE_BIAS]))


def make_mobile_sam(path: Path, seed: int = 0) -> Path:
    """Random-weight MobileSAM (``mobile_sam.sam_model_registry["vit_t"]()``) saved with
    ``torch.save(model.state_dict())`` like the published mobile_sam.pt; loads with
    ``mobile_sam.sam_model_registry["vit_t"](checkpoint=str(path))``. Deterministic for a seed."""
    from mobile_sam import sam_model_registry

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = sam_model_registry["vit_t"]()
    torch.save(model.state_dict(), path)
    return path


def make_sam(path: Path, model_type: str = "vit_b", seed: int = 0) -> Path:
    """Random-weight ``segment_anything.sam_model_registry[model_type]()`` saved with
    ``torch.save(model.state_dict())`` like the published sam_vit_*.pth; loads with
    ``sam_model_registry[model_type](checkpoint=str(path))``. Deterministic for a seed."""
    from segment_anything import sam_model_registry

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = sam_model_registry[model_type]()
    torch.save(model.state_dict(), path)
    return path


def make_sam2(path: Path, model_type: str = "sam2.1_hiera_t", seed: int = 0) -> Path:
    """Random-weight SAM 2.1 at a published config (``sam2.build_sam.build_sam2``, no checkpoint) saved as Meta's
    files are, ``torch.save({"model": state_dict})``; loads with ``build_sam2(config, str(path))``. Deterministic
    for a seed. Hiera-T: 39 M parameters, 156 MB."""
    from sam2.build_sam import build_sam2

    from sam2_segmenter import CONFIGS

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_sam2(CONFIGS[model_type], None, device="cpu")
    torch.save({"model": model.state_dict()}, path)
    return path


TINY_SAM_MASK_LOGIT_GAIN = 20.0


def tiny_sam(seed: int = 0) -> Sam:
    """In-memory ``segment_anything`` Sam with a tiny ViT image encoder, for fast parity tests against SamPredictor.

    Built like ``segment_anything.build_sam._build_sam`` (img_size 1024, patch 16, 256-channel neck, the normal
    prompt encoder and mask decoder) but with embed_dim 32, depth 1, 1 head, global attention in block 0.
    Random weights, deterministic for a seed, eval mode. The last layer of each mask-token hypernetwork MLP is
    multiplied by TINY_SAM_MASK_LOGIT_GAIN (20) so that mask logits for a box prompt have std ~2 instead of ~0.1
    (fewer pixels within float noise of the 0 threshold); masks for a box prompt are neither all-False nor
    all-True (checked for seeds 0-3).
    """
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    prompt_embed_dim, image_size, patch_size = 256, 1024, 16
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = Sam(
            image_encoder=ImageEncoderViT(
                depth=1,
                embed_dim=32,
                img_size=image_size,
                mlp_ratio=4,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                num_heads=1,
                patch_size=patch_size,
                qkv_bias=True,
                use_rel_pos=True,
                global_attn_indexes=[0],
                window_size=14,
                out_chans=prompt_embed_dim,
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=prompt_embed_dim,
                image_embedding_size=(image_size // patch_size, image_size // patch_size),
                input_image_size=(image_size, image_size),
                mask_in_chans=16,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_embed_dim, mlp_dim=2048, num_heads=8),
                transformer_dim=prompt_embed_dim,
                iou_head_depth=3,
                iou_head_hidden_dim=256,
            ),
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        )
        # Random init gives mask logits of std ~0.1, so a tiny numeric difference flips many pixels at the 0
        # threshold; scaling the hypernetwork MLPs' last layers brings the std to ~2 (masks stay non-degenerate).
        with torch.no_grad():
            for mlp in sam.mask_decoder.output_hypernetworks_mlps:
                mlp.layers[-1].weight.mul_(TINY_SAM_MASK_LOGIT_GAIN)
                mlp.layers[-1].bias.mul_(TINY_SAM_MASK_LOGIT_GAIN)
    return sam.eval()


def make_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """(height, width, 3) uint8 RGB picture: a noisy grey background with a filled red circle and a filled blue
    rectangle (sizes relative to the picture). Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    image = rng.normal(128, 20, size=(height, width, 3)).clip(0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    cx, cy, r = width * 0.3, height * 0.4, max(1.0, min(width, height) * 0.2)
    image[(xx - cx) ** 2 + (yy - cy) ** 2 <= r**2] = (220, 40, 40)
    x0, x1 = int(width * 0.55), max(int(width * 0.55) + 1, int(width * 0.9))
    y0, y1 = int(height * 0.5), max(int(height * 0.5) + 1, int(height * 0.85))
    image[y0:y1, x0:x1] = (40, 60, 210)
    return image


def library_deformable_attention():
    """groundingdino's own `multi_scale_deformable_attn_pytorch` (a grid_sample per level), from a fresh copy of its
    module: dino.GroundingDino replaces it in the imported one."""
    import importlib.util

    from groundingdino.models.GroundingDINO import ms_deform_attn

    from dino import levels_batched_deformable_attention

    spec = importlib.util.spec_from_file_location("library_ms_deform_attn", ms_deform_attn.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.multi_scale_deformable_attn_pytorch is not levels_batched_deformable_attention
    return module.multi_scale_deformable_attn_pytorch


def groundingdino_image_tensor(image: np.ndarray) -> torch.Tensor:
    """Preprocess an RGB uint8 array exactly like ``groundingdino.util.inference.load_image``."""
    import groundingdino.datasets.transforms as T
    from PIL import Image

    transform = T.Compose(
        [
            T.RandomResize([800], max_size=1333),
            T.ToTensor(),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    tensor, _ = transform(Image.fromarray(image), None)
    return tensor


def make_real_size_groundingdino(directory: Path, seed: int = 0) -> tuple[Path, Path, Path]:
    """Grounding DINO at its published size, random weights: the packaged GroundingDINO_SwinT_OGC.py config,
    a bert-base-size text encoder (BertConfig(): 12 layers, hidden 768) with make_text_encoder's vocabulary,
    and a checkpoint in groundingdino_swint_ogc.pth's format. For benchmarks: about 11 s per CPU forward pass.

    Returns (config_path, checkpoint_path, text_encoder_dir).
    """
    from groundingdino.models import build_model
    from groundingdino.util.slconfig import SLConfig
    from transformers import BertConfig, BertModel

    from config import GROUNDINGDINO_PACKAGED_CONFIG

    directory = Path(directory)
    bert_dir = make_text_encoder(directory / "bert-base", seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        BertModel(BertConfig()).eval().save_pretrained(str(bert_dir))  # replaces the small one's weights
    args = SLConfig.fromfile(GROUNDINGDINO_PACKAGED_CONFIG)
    args.text_encoder_type = str(bert_dir)
    args.device = "cpu"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(args)
        _spread_groundingdino_scores(model, seed)
    checkpoint = directory / "groundingdino_swint_ogc.pth"
    torch.save({"model": model.state_dict()}, checkpoint)
    return Path(GROUNDINGDINO_PACKAGED_CONFIG), checkpoint, bert_dir


def service_env(groundingdino_files: tuple[Path, Path, Path], mobile_sam_checkpoint: Path, **extra: str
                ) -> dict[str, str]:
    """The service's environment variables (docs/configuration.md) for these generated models, on CPU."""
    config, checkpoint, text_encoder = groundingdino_files
    return {"GROUNDINGDINO_CONFIG": str(config), "GROUNDINGDINO_CHECKPOINT": str(checkpoint),
            "GROUNDINGDINO_TEXT_ENCODER": str(text_encoder), "USE_MOBILE_SAM": "true",
            "MOBILESAM_CHECKPOINT": str(mobile_sam_checkpoint), "MAX_DETECTIONS": "5", "DEVICE": "cpu", **extra}


# SAM 3 (sam3 0.1.4) at a test size: the builder's own parts (sam3.model_builder) with the two big encoders shrunk.
SAM3_TINY_RESOLUTION = 224  # input square: 16x16 patches of 14 (the published model: 1008, 72x72)


def sam3_tokenizer_path() -> Path:
    """The CLIP BPE vocabulary SAM 3's tokenizer reads, as open_clip_torch ships it (config.SAM3_PACKAGED_TOKENIZER)."""
    from config import SAM3_PACKAGED_TOKENIZER

    return Path(SAM3_PACKAGED_TOKENIZER)


def tiny_sam3(seed: int = 0) -> torch.nn.Module:
    """In-memory random-weight ``Sam3Image`` for fast tests, put together like
    ``sam3.model_builder.build_sam3_image_model`` (same classes, the builder's own geometry encoder, dot-product
    scorer, segmentation head and neck) but with a small vision trunk (ViT embed_dim 64, depth 2, 2 heads, one
    window and one global block, input SAM3_TINY_RESOLUTION), a small text encoder (width 64, 1 layer, 2 heads;
    the real CLIP tokenizer and 49408-token vocabulary) and 1-layer transformer encoder and decoder (200 queries,
    presence token, as published). About 20 M parameters (most in the 49408-token embedding and the builder's
    geometry encoder and heads). Deterministic for a seed; eval mode. Built inside
    sam3_engine.cuda_redirected("cpu") (the builder's parts ask for CUDA).

    With random init the scores (sigmoid(logit) * sigmoid(presence)) spread over ~0.25-0.5 (on make_image(160,
    120, 5): "cat" 0.31-0.47, "house" 0.31-0.49); the tests pick thresholds inside that range."""
    from sam3_engine import _import_sam3, cuda_redirected

    _import_sam3()  # first: sam3's own import would switch TF32 on for the whole test process on a recent GPU
    from sam3 import model_builder as mb
    from sam3.model.decoder import TransformerDecoder, TransformerDecoderLayer
    from sam3.model.encoder import TransformerEncoderFusion, TransformerEncoderLayer
    from sam3.model.model_misc import MultiheadAttentionWrapper
    from sam3.model.text_encoder_ve import VETextEncoder
    from sam3.model.tokenizer_ve import SimpleTokenizer
    from sam3.model.vitdet import ViT

    res = SAM3_TINY_RESOLUTION
    with torch.random.fork_rng(devices=[]), cuda_redirected("cpu"):
        torch.manual_seed(seed)
        trunk = ViT(img_size=res, pretrain_img_size=res, patch_size=14, embed_dim=64, depth=2, num_heads=2,
                    mlp_ratio=4.0, norm_layer="LayerNorm", drop_path_rate=0.0, qkv_bias=True, use_abs_pos=True,
                    tile_abs_pos=True, global_att_blocks=(1,), rel_pos_blocks=(), use_rope=True,
                    use_interp_rope=True, window_size=res // 14, pretrain_use_cls_token=True,
                    retain_cls_token=False, ln_pre=True, ln_post=False, return_interm_layers=False,
                    bias_patch_embed=False)
        neck = mb._create_vit_neck(mb._create_position_encoding(precompute_resolution=res), trunk)
        text = VETextEncoder(tokenizer=SimpleTokenizer(bpe_path=str(sam3_tokenizer_path())), d_model=256,
                             width=64, heads=2, layers=1)
        backbone = mb._create_vl_backbone(neck, text)

        def attention(batch_first):
            return MultiheadAttentionWrapper(num_heads=8, dropout=0.0, embed_dim=256, batch_first=batch_first)

        encoder = TransformerEncoderFusion(
            layer=TransformerEncoderLayer(activation="relu", d_model=256, dim_feedforward=256, dropout=0.0,
                                          pos_enc_at_attn=True, pos_enc_at_cross_attn_keys=False,
                                          pos_enc_at_cross_attn_queries=False, pre_norm=True,
                                          self_attention=attention(True), cross_attention=attention(True)),
            num_layers=1, d_model=256, num_feature_levels=1, frozen=False, use_act_checkpoint=False,
            add_pooled_text_to_img_feat=False, pool_text_with_mask=True)
        decoder = TransformerDecoder(
            layer=TransformerDecoderLayer(activation="relu", d_model=256, dim_feedforward=256, dropout=0.0,
                                          cross_attention=MultiheadAttentionWrapper(num_heads=8, dropout=0.0,
                                                                                    embed_dim=256),
                                          n_heads=8, use_text_cross_attention=True),
            num_layers=1, num_queries=200, return_intermediate=True, box_refine=True, num_o2m_queries=0, dac=True,
            boxRPB="log", d_model=256, frozen=False, interaction_layer=None, dac_use_selfatt_ln=True,
            resolution=res, stride=14, use_act_checkpoint=False, presence_token=True)
        transformer = mb.TransformerWrapper(encoder=encoder, decoder=decoder, d_model=256)
        model = mb._create_sam3_model(backbone, transformer, mb._create_geometry_encoder(),
                                      mb._create_segmentation_head(), mb._create_dot_product_scoring(), None,
                                      eval_mode=True)
        _init_sam3_text_encoder(model)
    return model.eval()


@torch.no_grad()
def _init_sam3_text_encoder(model: torch.nn.Module) -> None:
    """Give the two parameters that sam3's TextTransformer leaves as torch.empty (uninitialised memory: NaN or
    huge values; a real checkpoint overwrites them) CLIP's initialisation: positional_embedding ~ N(0, 0.01),
    text_projection ~ N(0, width^-0.5). Draws from the global RNG (callers run it under fork_rng)."""
    encoder = model.backbone.language_backbone.encoder
    torch.nn.init.normal_(encoder.positional_embedding, std=0.01)
    torch.nn.init.normal_(encoder.text_projection, std=encoder.text_projection.shape[0] ** -0.5)


def sam3_checkpoint_state(model: torch.nn.Module) -> dict:
    """A Sam3Image's weights in the published sam3.pt layout: every key prefixed "detector." (the file also holds
    "tracker.*" weights for video, which the image model ignores)."""
    return {f"detector.{k}": v for k, v in model.state_dict().items()}


def make_real_size_sam3(path: Path, seed: int = 0) -> Path:
    """The published SAM 3 image model (``build_sam3_image_model``, ~841 M parameters) with random weights, saved
    in sam3.pt's layout (3.4 GB; about 10 s to build and 10-20 s to write). Deterministic for a seed."""
    from sam3_engine import _import_sam3, cuda_redirected

    _import_sam3()
    from sam3.model_builder import build_sam3_image_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]), cuda_redirected("cpu"):
        torch.manual_seed(seed)
        model = build_sam3_image_model(bpe_path=str(sam3_tokenizer_path()), device="cpu", load_from_HF=False,
                                       checkpoint_path=None)
        _init_sam3_text_encoder(model)
    torch.save(sam3_checkpoint_state(model), path)
    return path
