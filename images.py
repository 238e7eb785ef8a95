"""Fetch and decode the images that Label Studio tasks point at.

A task's image field is one of:
  * a path served by Label Studio: ``/data/upload/<project>/<8hex>-name.png`` or
    ``/data/local-files/?d=<path>`` (relative to the Label Studio base URL, needs its API key);
  * a cloud storage URI as Label Studio stores it (``s3://bucket/key``, ``gs://``, ``azure-blob://``, any
    ``scheme://`` of a storage): fetched through the task's resolve route,
    ``/tasks/<task id>/resolve/?fileuri=<url-safe base64 of the URI>``, which needs the task id and the key;
    Label Studio answers with the bytes, or 303 to a presigned URL on the storage host, which is followed
    without the key;
  * that resolve route itself (how the task API shows a storage task), relative or absolute;
  * an absolute ``http(s)://`` URL (fetched without credentials unless it points at Label Studio itself).

Every hop of every download obeys the URL policy (urlpolicy.py: no link-local or metadata addresses, and
IMAGE_ALLOWED_HOSTS when set). Label Studio's key goes only to Label Studio's own origin: a redirect elsewhere
drops it for the rest of the download.

Which key a request to Label Studio carries, and the exchange of a personal access token, are ls_client's.

Every image comes back as an ``(H, W, 3) uint8`` RGB array in the *displayed* orientation (EXIF orientation
applied), which is the frame Label Studio's ``original_width``/``original_height`` and percent coordinates use.

Secrets never reach logs or error messages: URLs are shown only through `redact_url`, and neither keys nor
``Authorization`` headers are ever formatted into a string.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import re
import struct
import time
from pathlib import Path
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

import numpy as np
import requests
from PIL import Image, ImageOps, UnidentifiedImageError

from config import Settings
from errors import LabelStudioError, ServiceError
from ls_client import Connection, LabelStudioClient, origin
from urlpolicy import UrlPolicy, UrlRefused, guard

logger = logging.getLogger(__name__)

_CHUNK = 64 * 1024
MAX_REDIRECTS = 5
# Label Studio's route that serves (or redirects to) a storage object of a task; /presign/ is its older name.
RESOLVE_PATH = re.compile(r"/tasks/(\d+)/(?:resolve|presign)/?")
# How a presigned URL that expired or was refused answers (S3 and Azure: 403, GCS: 400): resolve it afresh once.
PRESIGN_REFUSED = (400, 401, 403)
# URL schemes that are not a cloud storage's (every other scheme:// is resolved through Label Studio).
NOT_STORAGE = ("http", "https", "file", "ftp", "data")
# What Label Studio's resolve route means by its bare error statuses (it sends no body with them).
RESOLVE_STATUS = {
    404: "Label Studio found no storage of the project that holds this URI, or could not presign it",
    424: "Label Studio could not read the object from its storage",
}


class ImageError(ServiceError):
    """An image could not be fetched or decoded; the message says what failed (URLs redacted).

    kind: what went wrong, for a task's failure record: 'unreachable' (network, HTTP errors, 404, Label Studio's
    424 for a storage read that failed), 'denied' (401/403, a refused key), 'refused' (the URL policy), 'too_large'
    (bytes or pixels over the limits), 'undecodable', 'unsupported' (a URL scheme or path the loader does not
    read). status: the HTTP status of a refused download, else None. redirected: whether that status came from a
    redirect's target (a presigned URL) rather than the URL first asked.
    """

    def __init__(self, message: str, kind: str = "unreachable", status: int | None = None,
                 redirected: bool = False):
        super().__init__(message)
        self.kind, self.status, self.redirected = kind, status, redirected


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


def _decode_fileuri(value: str) -> str:
    """A resolve route's ``fileuri`` as Label Studio reads it: url-safe base64, else URL-quoted."""
    try:
        return base64.urlsafe_b64decode(value.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return unquote(value)


def _is_storage_uri(url: str, scheme: str) -> bool:
    """Whether `url` is a cloud storage URI as Label Studio stores it: ``scheme://...`` of a storage (s3, gs,
    azure-blob, or any other a Label Studio storage uses; not http(s), file, ftp or data)."""
    return bool(scheme) and scheme not in NOT_STORAGE and url[len(scheme):len(scheme) + 3] == "://"


class ImageLoader:
    """Fetches task images over HTTP (or from LOCAL_FILES_DOCUMENT_ROOT) and decodes them with `decode_image`.

    One loader is shared by a process's request threads: it holds one `requests.Session` (its connections obey
    the URL policy), and the `LabelStudioClient` that gives requests to Label Studio their key.
    """

    def __init__(self, settings: Settings, session: requests.Session | None = None,
                 label_studio: LabelStudioClient | None = None, policy: UrlPolicy | None = None):
        self._settings = settings
        self.policy = policy or UrlPolicy(settings.image_allowed_hosts)
        self._session = guard(session if session is not None else requests.Session(), self.policy)
        self.label_studio = label_studio or LabelStudioClient(settings)

    def load(self, url: str, hostname: str | None = None, access_token: str | None = None,
             task_id: int | None = None, caller: Connection | None = None) -> np.ndarray:
        """Fetch the image a task's data field points at; return ``(H, W, 3) uint8`` RGB, displayed orientation.

        `hostname` and `access_token` are what Label Studio sent in /setup; LABEL_STUDIO_URL/HOST and
        LABEL_STUDIO_API_KEY/ACCESS_TOKEN take precedence over them. `task_id`: the task's id, which a cloud storage
        URI needs. `caller`: Label Studio with the key of whoever asks (the page's /try), used instead of all those,
        and Label Studio is asked even for a file under LOCAL_FILES_DOCUMENT_ROOT (so it checks that key).
        Raises ImageError naming what failed.
        """
        url = (url or "").strip()
        if not url:
            raise ImageError("task has an empty image URL", "unsupported")
        data = self.fetch(url, hostname, access_token, task_id, caller)
        try:
            return decode_image(data, self._settings.image_max_pixels)
        except ImageError as e:
            raise ImageError(f"{redact_url(url)}: {e}", e.kind) from None

    def cache_key(self, url: str, hostname: str | None = None, access_token: str | None = None) -> str:
        """What identifies the image `url` names across requests: the storage URI for a cloud storage object
        (``s3://...`` as /predict sends it, or decoded from the resolve route the task API shows), so both forms
        share one cache entry and a presigned URL, which expires, is never a key; else the URL itself."""
        url = (url or "").strip()
        try:
            parts = urlsplit(url)
        except ValueError:  # a malformed URL: `fetch` says so
            return url
        if parts.scheme in ("", "http", "https") and RESOLVE_PATH.fullmatch(parts.path) and (
                not parts.netloc or self.label_studio.connection(hostname, access_token).serves(url)):
            fileuri = parse_qs(parts.query).get("fileuri", [""])[0]
            return _decode_fileuri(fileuri) if fileuri else url
        return url

    def served_by_label_studio(self, url: str, connection: Connection) -> bool:
        """Whether `fetch` reads `url` from `connection`'s Label Studio (with its key): a Label Studio path, an
        absolute URL on its host, a cloud storage URI."""
        url = (url or "").strip()
        scheme = url.partition("://")[0].lower() if "://" in url else ""
        return (url.startswith(("/data/", "data/", "tasks/")) or bool(RESOLVE_PATH.fullmatch(url.split("?", 1)[0]))
                or (scheme in ("http", "https") and connection.serves(url)) or _is_storage_uri(url, scheme))

    def fetch(self, url: str, hostname: str | None = None, access_token: str | None = None,
              task_id: int | None = None, caller: Connection | None = None) -> bytes:
        """The raw bytes `url` points at (see `load`)."""
        connection = caller or self.label_studio.connection(hostname, access_token)
        if url.startswith(("data/", "tasks/")):
            url = "/" + url
        if url.startswith("/data/") or RESOLVE_PATH.fullmatch(url.split("?", 1)[0]):
            local = self._read_local_file(url) if caller is None else None
            if local is not None:
                return local
            return self._fetch_from_label_studio(self._on_label_studio(url, connection), connection)

        try:
            parts = urlsplit(url)
        except ValueError:  # e.g. an unclosed IPv6 bracket
            raise ImageError(f"malformed image URL {redact_url(url)}", "unsupported") from None
        scheme = parts.scheme.lower()
        if scheme in ("http", "https"):
            if connection.serves(url):
                # Label Studio sometimes sends absolute URLs to its own uploads.
                if parts.path.startswith("/data/") and caller is None:
                    local = self._read_local_file(url)
                    if local is not None:
                        return local
                return self._fetch_from_label_studio(url, connection)
            return self._download(url, {}, "the backend sends no credentials to hosts other than Label Studio",
                                  connection, restricted=True)
        if _is_storage_uri(url, scheme):
            if task_id is None:
                raise ImageError(
                    f"{redact_url(url)} is a cloud storage URI: the backend fetches it through Label Studio's "
                    "/tasks/<id>/resolve/ route, which needs the task's id (cli.py predict: use --project and "
                    "--task)", "unsupported")
            fileuri = base64.urlsafe_b64encode(url.encode()).decode()  # as label_studio_sdk encodes it
            route = self._on_label_studio(f"/tasks/{int(task_id)}/resolve/?fileuri={fileuri}", connection)
            return self._fetch_from_label_studio(route, connection)
        raise ImageError(
            f"unsupported image URL scheme {scheme!r} in {redact_url(url)}: the backend reads http(s):// URLs, "
            "Label Studio /data/... paths and cloud storage URIs (s3://, gs://, azure-blob://)", "unsupported"
        )

    @staticmethod
    def _on_label_studio(path: str, connection: Connection) -> str:
        """The absolute URL of a Label Studio path; ImageError when Label Studio's URL is unknown."""
        if not connection.url:
            raise ImageError(
                f"{redact_url(path)} is a Label Studio path but the Label Studio URL is unknown: set "
                "LABEL_STUDIO_URL (or LABEL_STUDIO_HOST) to the URL the backend can reach Label Studio at, "
                "e.g. http://localhost:8080", "unsupported"
            )
        return connection.url + path

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
        """GET `url` on Label Studio with the connection's key (ls_client picks the header and refreshes it).

        Label Studio may answer with a redirect to a presigned storage URL (followed without the key). Presigned
        URLs expire: one that is refused is resolved again, once, through `url`."""

        def download(headers: dict[str, str], hint: str) -> bytes:
            return self._download(url, headers, hint, connection, restricted=False)

        try:
            try:
                return self.label_studio.get(connection, url, download)
            except ImageError as e:
                if not (e.redirected and e.status in PRESIGN_REFUSED):
                    raise
                logger.info("%s: the storage refused its presigned URL (HTTP %d); resolving it again once",
                            redact_url(url), e.status)
                return self.label_studio.get(connection, url, download)
        except LabelStudioError as e:  # a personal access token that could not be exchanged
            raise ImageError(str(e), "denied") from None

    # ----------------------------------------------------------------- HTTP

    def _max_bytes(self) -> int:
        return int(self._settings.image_max_mb * 2**20)

    def _download(self, url: str, headers: dict[str, str], hint: str, connection: Connection,
                  restricted: bool) -> bytes:
        """GET `url`, streamed, at most IMAGE_MAX_MB, within IMAGE_FETCH_TIMEOUT (all hops together), following at
        most MAX_REDIRECTS redirects; `hint` is added to 401/403 errors.

        `headers` go only to `url`'s origin: a redirect elsewhere drops them for the rest of the download. Every hop
        obeys the URL policy; `restricted` (a URL the task named) also holds its hops to IMAGE_ALLOWED_HOSTS, Label
        Studio's own host excepted."""
        timeout = self._settings.image_fetch_timeout
        first, start, redirected = url, time.monotonic(), False
        try:
            for _ in range(MAX_REDIRECTS + 1):
                if urlsplit(url).scheme.lower() not in ("http", "https"):
                    raise ImageError(f"{redact_url(first)} redirected to {redact_url(url)}, not an http(s) URL",
                                     "unsupported")
                self.policy.check_url(url, restricted and not connection.serves(url))
                with self._session.get(url, headers=headers, timeout=timeout, stream=True,
                                       allow_redirects=False) as resp:
                    if not resp.is_redirect:
                        data = self._read(resp, url, hint, redirected, start)
                        break
                    target = urljoin(url, resp.headers["Location"])
                if origin(target) != origin(first):
                    headers = {}  # Label Studio's key is for Label Studio only (requests drops it the same way)
                url, redirected = target, True
            else:
                raise ImageError(f"fetching {redact_url(first)} failed: more than {MAX_REDIRECTS} redirects")
        except UrlRefused as e:
            raise ImageError(f"{redact_url(url)}: {e}", "refused") from None
        except requests.Timeout:
            raise ImageError(f"fetching {redact_url(url)} timed out after IMAGE_FETCH_TIMEOUT={timeout:g}s") from None
        except requests.RequestException as e:
            raise ImageError(f"fetching {redact_url(url)} failed: {_describe_request_error(e)}") from None
        logger.debug("fetched %s: %d bytes in %.0f ms", redact_url(url), len(data), (time.monotonic() - start) * 1000)
        return data

    def _read(self, resp: requests.Response, url: str, hint: str, redirected: bool, start: float) -> bytes:
        """The body of a final (non-redirect) answer, or ImageError for an error status or one over the limits."""
        timeout, limit, shown = self._settings.image_fetch_timeout, self._max_bytes(), redact_url(url)
        status = resp.status_code
        if not 200 <= status < 300:
            where = f"the storage URL Label Studio redirected to ({shown})" if redirected else shown
            message = f"fetching {where} failed: HTTP {status}{_detail(resp)}"
            if status in (401, 403) and not redirected:
                message += f" ({hint})"
            elif RESOLVE_PATH.fullmatch(urlsplit(url).path) and status in RESOLVE_STATUS:
                message += f" ({RESOLVE_STATUS[status]})"
            raise ImageError(message, "denied" if status in (401, 403) else "unreachable", status, redirected)
        declared = resp.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ImageError(f"{shown} is {int(declared):,} bytes (Content-Length), over the IMAGE_MAX_MB limit of "
                             f"{limit:,} bytes", "too_large")
        data = bytearray()
        for chunk in resp.iter_content(_CHUNK):
            data += chunk
            if len(data) > limit:
                raise ImageError(f"{shown} is over the IMAGE_MAX_MB limit of {limit:,} bytes; download aborted",
                                 "too_large")
            # requests' timeout bounds each read, not the whole transfer; a trickling server must not hold a
            # request thread for ever.
            if time.monotonic() - start > timeout:
                raise ImageError(f"fetching {shown} took over IMAGE_FETCH_TIMEOUT={timeout:g}s; aborted")
        return bytes(data)


def _detail(resp: requests.Response) -> str:
    """': <reason>' from an error body: Label Studio's JSON {"detail": ...}, or a storage's XML <Message> (S3,
    Google Cloud Storage and Azure Blob answer errors so); '' otherwise.

    `resp` must be a streamed response whose body is unread; at most 4 KiB of it is read.
    """
    content_type = resp.headers.get("Content-Type", "")
    if "json" not in content_type and "xml" not in content_type:
        return ""
    try:
        raw = resp.raw.read(4096, decode_content=True)
    except (OSError, requests.RequestException):
        return ""
    if "xml" in content_type:
        found = re.search(rb"<Message>([^<]{1,300})</Message>", raw)
        detail = found.group(1).decode(errors="replace") if found else None
    else:
        try:
            body = json.loads(raw)
        except ValueError:
            return ""
        detail = body.get("detail") if isinstance(body, dict) else None
    return f": {detail[:200]}" if isinstance(detail, str) and detail else ""
