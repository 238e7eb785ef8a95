"""The one place that reads the service's environment.

Every variable the service understands is a field of `Settings` (or `ServerSettings`
for gunicorn), read once by `from_env`. Values are validated here so that a typo
fails at startup with the variable's name, not deep inside a request.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from errors import ModelLoadError


@dataclass(frozen=True)
class SegmenterKind:
    """One family of mask models: the package whose `sam_model_registry` builds it, the variable that names its
    checkpoint, and each model type's checkpoint file as its authors publish it (the default file name, and the
    name of its weights.py manifest entry)."""

    package: str
    variable: str
    files: Mapping[str, str]  # model type -> published checkpoint file name


# The one table of which segmenter needs which checkpoint setting and which weights.py entry.
SEGMENTERS = {
    "sam": SegmenterKind("segment_anything", "SAM_CHECKPOINT", {
        "vit_h": "sam_vit_h_4b8939.pth",
        "vit_l": "sam_vit_l_0b3195.pth",
        "vit_b": "sam_vit_b_01ec64.pth",
    }),
    "mobile_sam": SegmenterKind("mobile_sam", "MOBILESAM_CHECKPOINT", {"vit_t": "mobile_sam.pt"}),
    # SAM 2.1 (Meta's sam2 package builds it from its own configs, sam2_segmenter.CONFIGS); chosen, as SAM 1, by
    # USE_SAM and SAM_MODEL_TYPE, its file named by SAM_CHECKPOINT.
    "sam2": SegmenterKind("sam2", "SAM_CHECKPOINT", {
        "sam2.1_hiera_t": "sam2.1_hiera_tiny.pt",
        "sam2.1_hiera_s": "sam2.1_hiera_small.pt",
        "sam2.1_hiera_b+": "sam2.1_hiera_base_plus.pt",
        "sam2.1_hiera_l": "sam2.1_hiera_large.pt",
    }),
}
SAM_MODEL_TYPES = {**SEGMENTERS["sam"].files, **SEGMENTERS["sam2"].files}  # SAM_MODEL_TYPE -> its file name
# PRECISION: auto = bfloat16 on CUDA (float16 where the GPU has no bfloat16), float32 on CPU (device.py).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# COMPILE: what torch.compile compiles (docs/gpu.md): nothing, SAM's image encoder (at load), or that and Grounding
# DINO's Swin backbone (in the background, for each input size it meets: its shapes vary with the aspect ratio).
COMPILES = ("false", "segmenter", "true")
GROUNDINGDINO_CHECKPOINT_NAME = "groundingdino_swint_ogc.pth"
# Found without importing groundingdino (which imports torch): importing config must stay cheap.
GROUNDINGDINO_PACKAGED_CONFIG = str(
    Path(importlib.util.find_spec("groundingdino").origin).parent / "config" / "GroundingDINO_SwinT_OGC.py"
)


# SAM 3 (ENGINE=sam3): the checkpoint as published (facebook/sam3 on the model hub, gated), and its tokenizer's
# file, the CLIP BPE vocabulary that the sam3 wheel lacks; open_clip_torch ships the same file (weights.py).
ENGINES = ("grounded_sam", "sam3")
SAM3_CHECKPOINT_NAME = "sam3.pt"
SAM3_TOKENIZER_NAME = "bpe_simple_vocab_16e6.txt.gz"
_OPEN_CLIP = importlib.util.find_spec("open_clip")
SAM3_PACKAGED_TOKENIZER = (str(Path(_OPEN_CLIP.origin).parent / SAM3_TOKENIZER_NAME) if _OPEN_CLIP
                           else os.path.join("models", SAM3_TOKENIZER_NAME))


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class Checkpoint:
    """A model file the settings need: the variable naming it, its path, and its published file name (the
    weights.py manifest entry that fetches it; the default path ends in it)."""

    variable: str
    path: str
    published_name: str


def require_file(variable: str, path: str) -> None:
    """Raise ModelLoadError unless `path` (the value of `variable`) is a readable file."""
    if not os.path.isfile(path):
        raise ModelLoadError(f"{variable}={path}: file not found")
    if not os.access(path, os.R_OK):
        raise ModelLoadError(f"{variable}={path}: file is not readable")


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _number(env: Mapping[str, str], name: str, default, kind=float, lo=None, hi=None):
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = kind(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a {kind.__name__}, got {raw!r}") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"{name} must be between {lo} and {hi}, got {raw!r}")
    return value


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = _str(env, name, default).lower()
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _str(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name)
    return default if raw is None or raw.strip() == "" else raw.strip()


@dataclass(frozen=True)
class Settings:
    """Service settings; see README "Environment variables" for each one."""

    # Models
    engine: str = "grounded_sam"  # or "sam3": SAM 3 finds the phrases' boxes and masks; the segmenter does clicks
    model_dir: str = "models"
    groundingdino_config: str = GROUNDINGDINO_PACKAGED_CONFIG
    groundingdino_checkpoint: str = "models/groundingdino_swint_ogc.pth"
    groundingdino_text_encoder: str = "models/bert-base-uncased"
    use_sam: bool = False
    use_mobile_sam: bool = True
    sam_model_type: str = "vit_h"
    sam_checkpoint: str = "models/sam_vit_h_4b8939.pth"
    mobilesam_checkpoint: str = "models/mobile_sam.pt"
    sam3_checkpoint: str = "models/sam3.pt"
    sam3_tokenizer: str = SAM3_PACKAGED_TOKENIZER
    device: str = "auto"
    # GPU speed (README "GPU"): the encoders' autocast precision, torch.compile, images per encoder pass
    precision: str = "auto"
    compile: str = "false"  # COMPILES: false, segmenter (SAM's image encoder), true (and Grounding DINO's backbone)
    batch_size: int = 4
    # Per-image model state (SAM embeddings, Grounding DINO features) kept for repeated prompts
    embedding_cache_size: int = 64
    embedding_cache_mb: float = 1024.0
    image_cache_seconds: float = 300.0
    # Detection
    box_threshold: float = 0.3
    text_threshold: float = 0.25
    sam3_score_threshold: float = 0.5  # Sam3Processor's confidence_threshold
    max_detections: int = 50
    nms_iou: float = 0.7
    polygon_tolerance: float = 1.0
    # Mask clean-up (masks.py): holes / islands under this many image pixels filled / dropped; smoothing radius
    mask_min_area: int = 100
    mask_smooth: int = 0
    # Segment everything (everything.py): SamAutomaticMaskGenerator's main arguments, and the label overlap
    everything_points_per_side: int = 32
    everything_points_per_batch: int = 64
    everything_pred_iou_thresh: float = 0.88
    everything_stability_score_thresh: float = 0.95
    everything_box_nms_thresh: float = 0.7
    everything_crop_n_layers: int = 0
    everything_min_overlap: float = 0.5
    # None: prompt with the config's label names; "": no prediction without a prompt.
    default_prompt: str | None = None
    # Label Studio access (for /data/upload/... task images)
    label_studio_url: str = ""
    label_studio_api_key: str = ""
    local_files_document_root: str = ""
    image_fetch_timeout: float = 30.0
    image_max_mb: float = 64.0
    image_max_pixels: int = 100_000_000
    # The URL policy (urlpolicy.py): absolute image URLs only to these hosts; empty: any host
    image_allowed_hosts: tuple[str, ...] = ()
    # Service
    basic_auth_user: str = ""
    basic_auth_pass: str = ""
    model_load_wait: float = 90.0
    # Label Studio gives a /predict ML_TIMEOUT_PREDICT (default 100 s), then drops the whole answer.
    predict_time_budget: float = 80.0
    # The scheduler (scheduler.py): a foreground request that can't be served within REQUEST_DEADLINE s of its arrival
    # is refused with 503; MODEL_CONCURRENCY model passes at once; at most QUEUE_LIMIT requests admitted (default:
    # THREADS less 4, so that requests that need no model always find a thread).
    request_deadline: float = 90.0
    model_concurrency: int = 1
    queue_limit: int = 28
    # Retrieve Predictions: the tasks past the budget go to a background bulk job that imports their predictions.
    background_predictions: bool = True
    job_chunk_size: int = 50
    # A bulk job's imports run beside its predicting: a chunk goes out when it holds JOB_CHUNK_SIZE predictions or
    # its oldest has waited JOB_IMPORT_WAIT s; while one import is in flight the next grows, up to JOB_CHUNK_MAX.
    job_import_wait: float = 10.0
    job_chunk_max: int = 500
    # cli.py annotate runs its job on this Ray cluster when set ("auto", or an address); "": in the process.
    ray_address: str = ""
    data_dir: str = "data"

    @property
    def segmenter(self) -> str | None:
        """'sam', 'sam2' (SAM_MODEL_TYPE sam2.1_*), 'mobile_sam' or None (boxes only). USE_SAM wins when both
        are on."""
        if self.use_sam:
            return "sam2" if self.sam_model_type in SEGMENTERS["sam2"].files else "sam"
        return "mobile_sam" if self.use_mobile_sam else None

    @property
    def segmenter_model_type(self) -> str | None:
        """The model type the segmenter's package builds: SAM_MODEL_TYPE for SAM 1 and 2.1, vit_t for MobileSAM."""
        if self.segmenter is None:
            return None
        return next(iter(SEGMENTERS[self.segmenter].files)) if self.segmenter == "mobile_sam" else self.sam_model_type

    def checkpoints(self) -> list[Checkpoint]:
        """The model files these settings load: the detector's (Grounding DINO's, or SAM 3's checkpoint and
        tokenizer file), then the segmenter's (if any)."""
        if self.engine == "sam3":
            needed = [Checkpoint("SAM3_CHECKPOINT", self.sam3_checkpoint, SAM3_CHECKPOINT_NAME),
                      Checkpoint("SAM3_TOKENIZER", self.sam3_tokenizer, SAM3_TOKENIZER_NAME)]
        else:
            needed = [Checkpoint("GROUNDINGDINO_CHECKPOINT", self.groundingdino_checkpoint,
                                 GROUNDINGDINO_CHECKPOINT_NAME)]
        if self.segmenter is not None:
            kind = SEGMENTERS[self.segmenter]
            path = self.mobilesam_checkpoint if self.segmenter == "mobile_sam" else self.sam_checkpoint
            needed.append(Checkpoint(kind.variable, path, kind.files[self.segmenter_model_type]))
        return needed

    def checkpoint(self, variable: str) -> Checkpoint | None:
        """The model file of `checkpoints()` that `variable` names, or None when these settings load none."""
        return next((c for c in self.checkpoints() if c.variable == variable), None)

    @property
    def model_version(self) -> str:
        """Names the models in use by their checkpoint files, e.g. groundingdino_swint_ogc+mobile_sam, or
        sam3+mobile_sam (the tokenizer file is not a model)."""
        return "+".join(os.path.splitext(os.path.basename(c.path))[0] for c in self.checkpoints()
                        if c.variable != "SAM3_TOKENIZER")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        model_dir = _str(env, "MODEL_DIR", cls.model_dir)
        sam_type = _str(env, "SAM_MODEL_TYPE", cls.sam_model_type).lower()
        if sam_type not in SAM_MODEL_TYPES:
            raise ConfigError(f"SAM_MODEL_TYPE must be one of {', '.join(SAM_MODEL_TYPES)}, got {sam_type!r}")
        engine = _str(env, "ENGINE", cls.engine).lower()
        if engine not in ENGINES:
            raise ConfigError(f"ENGINE must be one of {', '.join(ENGINES)}, got {engine!r}")
        device = _str(env, "DEVICE", cls.device).lower()
        if device != "auto" and not (device == "cpu" or device.startswith("cuda")):
            raise ConfigError(f"DEVICE must be auto, cpu, cuda or cuda:N, got {device!r}")
        chunk_size = _number(env, "JOB_CHUNK_SIZE", cls.job_chunk_size, int, 1, 1000)
        chunk_max = _number(env, "JOB_CHUNK_MAX", max(cls.job_chunk_max, chunk_size), int, 1, 5000)
        if chunk_max < chunk_size:
            raise ConfigError(f"JOB_CHUNK_MAX ({chunk_max}) must be at least JOB_CHUNK_SIZE ({chunk_size})")
        return cls(
            engine=engine,
            model_dir=model_dir,
            groundingdino_config=_str(env, "GROUNDINGDINO_CONFIG", GROUNDINGDINO_PACKAGED_CONFIG),
            groundingdino_checkpoint=_str(
                env, "GROUNDINGDINO_CHECKPOINT", os.path.join(model_dir, GROUNDINGDINO_CHECKPOINT_NAME)
            ),
            groundingdino_text_encoder=_str(
                env, "GROUNDINGDINO_TEXT_ENCODER", os.path.join(model_dir, "bert-base-uncased")
            ),
            use_sam=_bool(env, "USE_SAM", cls.use_sam),
            use_mobile_sam=_bool(env, "USE_MOBILE_SAM", cls.use_mobile_sam),
            sam_model_type=sam_type,
            sam_checkpoint=_str(env, "SAM_CHECKPOINT", os.path.join(model_dir, SAM_MODEL_TYPES[sam_type])),
            mobilesam_checkpoint=_str(env, "MOBILESAM_CHECKPOINT",
                                      os.path.join(model_dir, SEGMENTERS["mobile_sam"].files["vit_t"])),
            sam3_checkpoint=_str(env, "SAM3_CHECKPOINT", os.path.join(model_dir, SAM3_CHECKPOINT_NAME)),
            sam3_tokenizer=_str(env, "SAM3_TOKENIZER", SAM3_PACKAGED_TOKENIZER),
            device=device,
            precision=_choice(env, "PRECISION", cls.precision, PRECISIONS),
            compile=_choice(env, "COMPILE", cls.compile, COMPILES),
            batch_size=_number(env, "BATCH_SIZE", cls.batch_size, int, 1, 64),
            embedding_cache_size=_number(env, "EMBEDDING_CACHE_SIZE", cls.embedding_cache_size, int, 0),
            embedding_cache_mb=_number(env, "EMBEDDING_CACHE_MB", cls.embedding_cache_mb, float, 0.0),
            image_cache_seconds=_number(env, "IMAGE_CACHE_SECONDS", cls.image_cache_seconds, float, 0.0),
            box_threshold=_number(env, "BOX_THRESHOLD", cls.box_threshold, float, 0.0, 1.0),
            text_threshold=_number(env, "TEXT_THRESHOLD", cls.text_threshold, float, 0.0, 1.0),
            sam3_score_threshold=_number(env, "SAM3_SCORE_THRESHOLD", cls.sam3_score_threshold, float, 0.0, 1.0),
            max_detections=_number(env, "MAX_DETECTIONS", cls.max_detections, int, 1, 900),
            nms_iou=_number(env, "NMS_IOU", cls.nms_iou, float, 0.0, 1.0),
            polygon_tolerance=_number(env, "POLYGON_TOLERANCE", cls.polygon_tolerance, float, 0.0, 1000.0),
            mask_min_area=_number(env, "MASK_MIN_AREA", cls.mask_min_area, int, 0, 10**8),
            mask_smooth=_number(env, "MASK_SMOOTH", cls.mask_smooth, int, 0, 100),
            everything_points_per_side=_number(env, "EVERYTHING_POINTS_PER_SIDE", cls.everything_points_per_side,
                                               int, 1, 256),
            everything_points_per_batch=_number(env, "EVERYTHING_POINTS_PER_BATCH", cls.everything_points_per_batch,
                                                int, 1, 4096),
            everything_pred_iou_thresh=_number(env, "EVERYTHING_PRED_IOU_THRESH", cls.everything_pred_iou_thresh,
                                               float, 0.0, 1.0),
            everything_stability_score_thresh=_number(env, "EVERYTHING_STABILITY_SCORE_THRESH",
                                                      cls.everything_stability_score_thresh, float, 0.0, 1.0),
            everything_box_nms_thresh=_number(env, "EVERYTHING_BOX_NMS_THRESH", cls.everything_box_nms_thresh,
                                              float, 0.0, 1.0),
            everything_crop_n_layers=_number(env, "EVERYTHING_CROP_N_LAYERS", cls.everything_crop_n_layers,
                                             int, 0, 4),
            everything_min_overlap=_number(env, "EVERYTHING_MIN_OVERLAP", cls.everything_min_overlap,
                                           float, 0.0, 1.0),
            default_prompt=env.get("DEFAULT_PROMPT"),
            label_studio_url=_str(env, "LABEL_STUDIO_URL", _str(env, "LABEL_STUDIO_HOST", "")).rstrip("/"),
            label_studio_api_key=_str(env, "LABEL_STUDIO_API_KEY", _str(env, "LABEL_STUDIO_ACCESS_TOKEN", "")),
            local_files_document_root=_str(env, "LOCAL_FILES_DOCUMENT_ROOT", ""),
            image_fetch_timeout=_number(env, "IMAGE_FETCH_TIMEOUT", cls.image_fetch_timeout, float, 0.1),
            image_max_mb=_number(env, "IMAGE_MAX_MB", cls.image_max_mb, float, 0.001),
            image_max_pixels=_number(env, "IMAGE_MAX_PIXELS", cls.image_max_pixels, int, 1),
            image_allowed_hosts=tuple(h.strip() for h in _str(env, "IMAGE_ALLOWED_HOSTS", "").split(",")
                                      if h.strip()),
            basic_auth_user=_str(env, "BASIC_AUTH_USER", ""),
            basic_auth_pass=_str(env, "BASIC_AUTH_PASS", ""),
            model_load_wait=_number(env, "MODEL_LOAD_WAIT", cls.model_load_wait, float, 0.0),
            predict_time_budget=_number(env, "PREDICT_TIME_BUDGET", cls.predict_time_budget, float, 0.0),
            background_predictions=_bool(env, "BACKGROUND_PREDICTIONS", cls.background_predictions),
            request_deadline=_number(env, "REQUEST_DEADLINE", cls.request_deadline, float, 0.0),
            model_concurrency=_number(env, "MODEL_CONCURRENCY", cls.model_concurrency, int, 1, 16),
            queue_limit=_number(env, "QUEUE_LIMIT", max(1, ServerSettings.from_env(env).threads - 4), int, 1, 1000),
            job_chunk_size=chunk_size,
            job_import_wait=_number(env, "JOB_IMPORT_WAIT", cls.job_import_wait, float, 0.0, 3600.0),
            job_chunk_max=chunk_max,
            ray_address=_str(env, "RAY_ADDRESS", ""),
            data_dir=_str(env, "DATA_DIR", cls.data_dir),
        )

    def redacted(self) -> dict:
        """The settings as a dict with secrets masked, for the startup log line."""
        secret = {"label_studio_api_key", "basic_auth_pass"}
        return {f.name: ("***" if f.name in secret and getattr(self, f.name) else getattr(self, f.name))
                for f in fields(self)}


@dataclass(frozen=True)
class ServerSettings:
    """How gunicorn serves the app (read by gunicorn.conf.py)."""

    host: str = "0.0.0.0"
    port: int = 9090
    workers: int = 1
    threads: int = 32  # most wait for the scheduler; the rest answer /health, bad input, the page at once
    timeout: int = 300
    log_level: str = "info"
    # glibc's heap in each worker (heap.py): malloc arenas (0: glibc's default, 8 per core) and how often freed
    # memory is handed back to the system (0: never).
    malloc_arena_max: int = 2
    malloc_trim_interval: float = 30.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServerSettings:
        env = os.environ if env is None else env
        return cls(
            host=_str(env, "HOST", cls.host),
            port=_number(env, "PORT", cls.port, int, 1, 65535),
            workers=_number(env, "WORKERS", cls.workers, int, 1, 64),
            threads=_number(env, "THREADS", cls.threads, int, 1, 256),
            timeout=_number(env, "TIMEOUT", cls.timeout, int, 1),
            log_level=_log_level(env),
            malloc_arena_max=_number(env, "MALLOC_ARENA_MAX", cls.malloc_arena_max, int, 0, 1024),
            malloc_trim_interval=_number(env, "MALLOC_TRIM_INTERVAL", cls.malloc_trim_interval, float, 0.0),
        )


def _log_level(env: Mapping[str, str]) -> str:
    level = _str(env, "LOG_LEVEL", ServerSettings.log_level).lower()
    if level not in ("debug", "info", "warning", "error", "critical"):
        raise ConfigError(f"LOG_LEVEL must be debug, info, warning, error or critical, got {level!r}")
    return level
