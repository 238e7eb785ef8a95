"""Fetch and decode the images that Label Studio tasks point at.

A task's image field is one of:
  * a path served by Label Studio: ``/data/upload/<project>/<8hex>-name.png`` or
    ``/data/local-files/?d=<path>`` (relative to the Label Studio base URL, needs its API key);
  * an absolute ``http(s)://`` URL (fetched without credentials unless it points at Label Studio itself).

Which key a request to Label Studio carries, and the exchange of a personal access token, are ls_client's.

Every image comes back as an ``(H, W, 3) uint8`` RGB array in the *displayed* orientation (EXIF orientation
applied), which is the frame Label Studio's ``original_width``/``original_height`` and percent coordinates use.

Secrets never reach logs or error messages: URLs are shown only through `redact_url`, and neither keys nor
``Authorization`` headers are ever formatted into a string.
"""

from __future__ import annotations

import io
import json
import logging
import re
import struct
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import requests
from PIL import Image, ImageOps, UnidentifiedImageError

from config import Settings
from errors import LabelStudioError, ServiceError
from ls_client import Connection, LabelStudioClient

logger = logging.getLogger(__name__)

_CHUNK = 64 * 1024


class ImageError(ServiceError):
    """An image could not be fetched or decoded; the message says what failed (URLs redacted).

    kind: what went wrong, for a task's failure record: 'unreachable' (network, HTTP errors), 'denied' (401/403,
    a refused key), 'too_large' (bytes or pixels over the limits), 'undecodable', 'unsupported' (a URL scheme or
    path the loader does not read). status: the HTTP status of a refused download, else None.
    """

    def __init__(self, message: str, kind: str = "unreachable", status: int | None = None):
        super().__init__(message)
        self.kind, self.status = kind, status


# --------------------------------------------------------------------------- decoding


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode image bytes (PNG, JPEG, WebP, GIF, TIFF, ...) to an ``(H, W, 3) uint8`` RGB array.

    The array is in the *displayed* orientation: EXIF orientation is applied with `PIL.ImageOps.exif_transpose`,
    as browsers and Label Studio show the image, so H and W are the displayed height and width.
    ``width * height`` is checked against `max_pixels` (IMAGE_MAX_PIXELS) from the header, before any pixel is
    decoded (`Image.open` is lazy). Palette, L, LA, RGBA, 1-bit, 16-bit grayscale, CMYK, ... are converted to RGB;
    transparent pixels are composited onto white (what a page behind the image shows). Animated images give
    their first frame.

    Raises ImageError for empty, unrecognised, truncated or oversized images.
    """
    if not data:
        raise ImageError("empty image data (0 bytes)", "undecodable")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        # Pillow's own guard (about 179 Mpx) fires inside open() before we can read the size.
        raise ImageError(f"image rejected by Pillow's decompression-bomb guard (not IMAGE_MAX_PIXELS): {e}",
                         "too_large") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        # Pillow's message here only repeats "cannot identify image file <BytesIO ...>".
        raise ImageError(f"could not decode image ({len(data)} bytes): not a recognised image format",
                         "undecodable") from None
    with im:
        width, height = im.size
        if width * height > max_pixels:
            raise ImageError(
                f"image is {width}x{height} = {width * height:,} pixels, over the IMAGE_MAX_PIXELS limit of "
                f"{max_pixels:,}", "too_large"
            )
        if width == 0 or height == 0:
            raise ImageError(f"image has no pixels ({width}x{height})", "undecodable")
        try:
            oriented = _exif_transpose(im)
            return _to_rgb_array(oriented)
        except (OSError, ValueError, SyntaxError, EOFError, struct.error) as e:
            raise ImageError(f"could not decode {im.format or 'image'} {width}x{height}: {e}", "undecodable") from None


def _exif_transpose(im: Image.Image) -> Image.Image:
    """`im` rotated/flipped to its displayed orientation; unchanged when its EXIF block is unreadable."""
    try:
        return ImageOps.exif_transpose(im)
    except (KeyError, TypeError, SyntaxError, struct.error) as e:
        # A malformed EXIF block should not cost the whole image; show it as stored.
        logger.warning("ignoring unreadable EXIF orientation: %s", e)
        return im


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> (H, W, 3) uint8 RGB (a new, writable array)."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        # Pillow's convert() clips 16-bit values at 255; scale the 0..65535 range down instead.
        gray = np.asarray(im).astype(np.int64)
        gray = (np.clip(gray, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        im = im.convert("L")
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        # Includes palette and RGB/L PNGs with a tRNS chunk, which browsers show as transparent.
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.array(im, dtype=np.uint8)


# --------------------------------------------------------------------------- URLs and keys


def redact_url(url: str) -> str:
    """``scheme://host[:port]/path`` of `url`, without userinfo, query or fragment, for logs and messages.

    Relative URLs keep only their path. Very long paths (data URIs) are cut to 200 characters.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    path = parts.path if len(parts.path) <= 200 else parts.path[:200] + "..."
    if not parts.netloc:
        return f"{parts.scheme}:{path}" if parts.scheme else path
    host = parts.netloc.rpartition("@")[2]  # drop user:password@
    return f"{parts.scheme}://{host}{path}" if parts.scheme else f"//{host}{path}"


def _describe_request_error(exc: requests.RequestException) -> str:
    """A short cause for a failed request, without the URL (requests puts the query string in its messages)."""
    reason = exc.args[0] if exc.args else None
    reason = getattr(reason, "reason", reason)  # urllib3 MaxRetryError wraps the real cause
    if isinstance(reason, BaseException):
        text = str(reason)
    else:
        text = type(exc).__name__
    # urllib3 prefixes "<urllib3.connection.HTTPConnection object at 0x...>: "
    text = re.sub(r"<[^>]* object at 0x[0-9a-f]+>:\s*", "", text)
    return text if len(text) <= 300 else text[:300] + "..."


# --------------------------------------------------------------------------- loading


class ImageLoader:
    """Fetches task images over HTTP (or from LOCAL_FILES_DOCUMENT_ROOT) and decodes them with `decode_image`.

    One loader is shared by a process's request threads: it holds one `requests.Session`, and the
    `LabelStudioClient` that gives requests to Label Studio their key.
    """

    def __init__(self, settings: Settings, session: requests.Session | None = None,
                 label_studio: LabelStudioClient | None = None):
        self._settings = settings
        self._session = session if session is not None else requests.Session()
        self.label_studio = label_studio or LabelStudioClient(settings)

    def load(self, url: str, hostname: str | None = None, access_token: str | None = None) -> np.ndarray:
        """Fetch the image a task's data field points at; return ``(H, W, 3) uint8`` RGB, displayed orientation.

        `hostname` and `access_token` are what Label Studio sent in /setup; LABEL_STUDIO_URL/HOST and
        LABEL_STUDIO_API_KEY/ACCESS_TOKEN take precedence over them. Raises ImageError naming what failed.
        """
        url = (url or "").strip()
        if not url:
            raise ImageError("task has an empty image URL", "unsupported")
        data = self.fetch(url, hostname, access_token)
        try:
            return decode_image(data, self._settings.image_max_pixels)
        except ImageError as e:
            raise ImageError(f"{redact_url(url)}: {e}", e.kind) from None

    def fetch(self, url: str, hostname: str | None = None, access_token: str | None = None) -> bytes:
        """The raw bytes `url` points at (see `load`)."""
        connection = self.label_studio.connection(hostname, access_token)
        if url.startswith("data/"):
            url = "/" + url
        if url.startswith("/data/"):
            local = self._read_local_file(url)
            if local is not None:
                return local
            if not connection.url:
                raise ImageError(
                    f"{redact_url(url)} is a Label Studio path but the Label Studio URL is unknown: set "
                    "LABEL_STUDIO_URL (or LABEL_STUDIO_HOST) to the URL the backend can reach Label Studio at, "
                    "e.g. http://localhost:8080", "unsupported"
                )
            return self._fetch_from_label_studio(connection.url + url, connection)

        try:
            parts = urlsplit(url)
        except ValueError:  # e.g. an unclosed IPv6 bracket
            raise ImageError(f"malformed image URL {redact_url(url)}", "unsupported") from None
        scheme = parts.scheme.lower()
        if scheme in ("http", "https"):
            if connection.serves(url):
                # Label Studio sometimes sends absolute URLs to its own uploads.
                if parts.path.startswith("/data/"):
                    local = self._read_local_file(url)
                    if local is not None:
                        return local
                return self._fetch_from_label_studio(url, connection)
            return self._download(url, {}, hint="the backend sends no credentials to hosts other than Label Studio")
        raise ImageError(
            f"unsupported image URL scheme {scheme!r} in {redact_url(url)}: the backend reads http(s):// URLs and "
            "Label Studio /data/... paths (let Label Studio serve cloud storage, or use presigned URLs)", "unsupported"
        )

    # ----------------------------------------------------------------- local files

    def _read_local_file(self, url: str) -> bytes | None:
        """Bytes of a /data/local-files/?d=<path> file under LOCAL_FILES_DOCUMENT_ROOT; None to fetch it instead."""
        root_setting = self._settings.local_files_document_root
        parts = urlsplit(url)
        if not root_setting or parts.path.rstrip("/") != "/data/local-files":
            return None
        rel = parse_qs(parts.query).get("d", [""])[0]
        if not rel:
            raise ImageError(f"{redact_url(url)}: local-files URL without a d=<path> parameter", "unsupported")
        root = Path(root_setting).resolve()
        # resolve() follows symlinks, so a link pointing outside the root is caught here too.
        try:
            target = (root / rel).resolve()
        except (OSError, ValueError):  # a NUL byte, a symlink loop
            raise ImageError("local-files d= parameter is not a usable path", "unsupported") from None
        if not target.is_relative_to(root):
            raise ImageError(
                f"local file path escapes LOCAL_FILES_DOCUMENT_ROOT ({len(rel)}-character d= parameter rejected)",
                "unsupported",
            )
        if not target.is_file():
            logger.debug("local file not found under LOCAL_FILES_DOCUMENT_ROOT, fetching it from Label Studio")
            return None
        limit = self._max_bytes()
        size = target.stat().st_size
        if size > limit:
            raise ImageError(f"local file is {size:,} bytes, over the IMAGE_MAX_MB limit of {limit:,} bytes",
                             "too_large")
        try:
            data = target.read_bytes()
        except OSError as e:
            raise ImageError(f"could not read local file under LOCAL_FILES_DOCUMENT_ROOT: {e.strerror}") from None
        logger.debug("read local file for %s: %d bytes", redact_url(url), len(data))
        return data

    # ----------------------------------------------------------------- Label Studio auth

    def _fetch_from_label_studio(self, url: str, connection: Connection) -> bytes:
        """GET `url` on Label Studio with the connection's key (ls_client picks the header and refreshes it)."""
        try:
            return self.label_studio.get(connection, url, lambda headers, hint: self._download(url, headers, hint))
        except LabelStudioError as e:  # a personal access token that could not be exchanged
            raise ImageError(str(e), "denied") from None

    # ----------------------------------------------------------------- HTTP

    def _max_bytes(self) -> int:
        return int(self._settings.image_max_mb * 2**20)

    def _download(self, url: str, headers: dict[str, str], hint: str) -> bytes:
        """GET `url`, streamed, at most IMAGE_MAX_MB, within IMAGE_FETCH_TIMEOUT; `hint` is added to 401/403 errors."""
        timeout = self._settings.image_fetch_timeout
        limit = self._max_bytes()
        shown = redact_url(url)
        start = time.monotonic()
        try:
            with self._session.get(url, headers=headers, timeout=timeout, stream=True) as resp:
                if not 200 <= resp.status_code < 300:
                    message = f"fetching {shown} failed: HTTP {resp.status_code}{_detail(resp)}"
                    if resp.status_code in (401, 403):
                        message += f" ({hint})"
                    raise ImageError(message, "denied" if resp.status_code in (401, 403) else "unreachable",
                                     resp.status_code)
                declared = resp.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise ImageError(
                        f"{shown} is {int(declared):,} bytes (Content-Length), over the IMAGE_MAX_MB limit of "
                        f"{limit:,} bytes", "too_large"
                    )
                data = bytearray()
                for chunk in resp.iter_content(_CHUNK):
                    data += chunk
                    if len(data) > limit:
                        raise ImageError(f"{shown} is over the IMAGE_MAX_MB limit of {limit:,} bytes; download aborted",
                                         "too_large")
                    # requests' timeout bounds each read, not the whole transfer; a trickling server must not
                    # hold a request thread for ever.
                    if time.monotonic() - start > timeout:
                        raise ImageError(f"fetching {shown} took over IMAGE_FETCH_TIMEOUT={timeout:g}s; aborted")
        except requests.Timeout:
            raise ImageError(f"fetching {shown} timed out after IMAGE_FETCH_TIMEOUT={timeout:g}s") from None
        except requests.RequestException as e:
            raise ImageError(f"fetching {shown} failed: {_describe_request_error(e)}") from None
        logger.debug("fetched %s: %d bytes in %.0f ms", shown, len(data), (time.monotonic() - start) * 1000)
        return bytes(data)


def _detail(resp: requests.Response) -> str:
    """': <detail>' from a JSON error body such as Label Studio's {"detail": ...}; '' otherwise.

    `resp` must be a streamed response whose body is unread; at most 4 KiB of it is read.
    """
    if "json" not in resp.headers.get("Content-Type", ""):
        return ""
    try:
        body = json.loads(resp.raw.read(4096, decode_content=True))
    except (ValueError, OSError, requests.RequestException):
        return ""
    detail = body.get("detail") if isinstance(body, dict) else None
    return f": {detail[:200]}" if isinstance(detail, str) and detail else ""
