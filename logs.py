"""Logging set-up for the service and the command line: format, level, and the third-party warnings we silence.

`configure_logging(level)` gives the root logger the service's format and level and, once per process, silences
exactly the warnings in `SILENCED`: deprecation and housekeeping notices that the pinned libraries (and the
libraries they call) print when the models are built, loaded and first run. Each is matched by its category, the
start of its message and the module it is attributed to, so any other warning, ours included, still shows.
pyproject.toml's pytest `filterwarnings` lists the same entries (tests/test_logs.py checks that they agree).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Silenced:
    """One third-party warning: `message` is a regex matched at the start of its text (case-insensitive, as the
    warnings module does), `module` a regex matched at the start of the module it is attributed to."""

    library: str  # who causes it (named in the start-up log line)
    category: type[Warning]
    message: str
    module: str


SILENCED: tuple[Silenced, ...] = (
    # groundingdino and mobile_sam import timm's old module paths.
    Silenced("timm", FutureWarning, r"Importing from timm\.models\.(layers|registry) is deprecated",
             r"timm\.models\.(layers|registry)"),
    # mobile_sam registers TinyViT models under names timm already has (5 warnings).
    Silenced("mobile_sam", UserWarning, r"Overwriting tiny_vit_\w+ in registry", r"mobile_sam\."),
    # groundingdino's Swin backbone calls torch.meshgrid without indexing=.
    Silenced("torch", UserWarning, r"torch\.meshgrid. in an upcoming release", r"torch\.functional"),
    # groundingdino's activation checkpointing (use_checkpoint in the published config), also at inference.
    Silenced("torch", UserWarning, r"torch\.utils\.checkpoint. the use_reentrant parameter should be passed",
             r"torch\."),
    Silenced("torch", UserWarning, r"None of the inputs have requires_grad=True", r"torch\.utils\.checkpoint"),
    # groundingdino's BERT wrapper passes device= to get_extended_attention_mask.
    Silenced("transformers", FutureWarning, r"The `device` argument is deprecated and will be removed in v5",
             r"transformers\.modeling_utils"),
    Silenced("groundingdino", FutureWarning, r"`torch\.cuda\.amp\.autocast\(args\.\.\.\)` is deprecated",
             r"groundingdino\."),
    # sam2's SAM2Transforms scripts its resize and normalisation with torch.jit.script.
    Silenced("sam2", FutureWarning, r"`torch\.jit\.script` is deprecated", r"torch\.jit"),
    # label_studio_sdk's personal access token exchange (pydantic's PydanticDeprecatedSince20, a DeprecationWarning).
    Silenced("label_studio_sdk", DeprecationWarning, r"The `parse_obj` method is deprecated", r"label_studio_sdk\."),
)

_silenced = False


def silence_third_party_warnings() -> bool:
    """Install the filters of `SILENCED` (once per process). True when this call installed them."""
    global _silenced
    if _silenced:
        return False
    for entry in SILENCED:
        warnings.filterwarnings("ignore", message=entry.message, category=entry.category, module=entry.module)
    _silenced = True
    return True


def silenced_libraries() -> list[str]:
    return sorted({entry.library for entry in SILENCED})


def configure_logging(level: str) -> None:
    """The root logger's format (also when logging was configured before: the level is set anyway) and `level`;
    the third-party warnings of `SILENCED` off, said once in the log."""
    logging.basicConfig(format=FORMAT)
    logging.getLogger().setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request to Label Studio: only failures
    if silence_third_party_warnings():
        logger.info("silencing %d known warnings of %s (listed in logs.py)", len(SILENCED),
                    ", ".join(silenced_libraries()))


def pytest_filters() -> list[str]:
    """`SILENCED` as pytest `filterwarnings` lines ("ignore:message:category:module"; no ':' may appear in them)."""
    lines = []
    for entry in SILENCED:
        assert ":" not in entry.message + entry.module, entry  # pytest splits the line on ':'
        lines.append(f"ignore:{entry.message}:{entry.category.__name__}:{entry.module}")
    return lines
