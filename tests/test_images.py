"""Tests for images.py against loopback HTTP servers that imitate Label Studio and a third-party host."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import requests
from PIL import Image

from config import Settings
from images import ImageError, ImageLoader, decode_image, redact_url

LEGACY = "0123456789abcdef0123456789abcdef01234567"  # shaped like a Label Studio legacy token
IMAGE_PATH = "/data/upload/1/x.png"


def _b64(obj) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def make_jwt(token_type: str, exp_in: float = 3600.0, **claims) -> str:
    """An unsigned-but-well-formed JWT (the loader decodes payloads without verifying them)."""
    payload = {"token_type": token_type, "exp": int(time.time() + exp_in), "jti": _b64(time.perf_counter_ns()),
               **claims}
    return f"{_b64({'alg': 'HS256', 'typ': 'JWT'})}.{_b64(payload)}.{_b64('not-a-signature')}"


def png_bytes(width: int = 6, height: int = 4, color=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


IMAGE = png_bytes()


class FakeServer(ThreadingHTTPServer):
    """Imitates the parts of Label Studio the loader talks to; also serves as the 'third-party' host."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path, headers)
        self.refresh_calls = 0
        self.access_ttl = 300.0  # exp of the access tokens /api/token/refresh/ hands out, from now
        self.valid_access: set[str] = set()  # access JWTs accepted as Bearer (validity by issue, not by exp)
        self.lock = threading.Lock()
        self.max_bytes = 0  # set by the oversize tests
        self.refuse_refresh = False  # /api/token/refresh/ answers 401 (revoked PAT)
        self.remember_access = True  # False: hands out access tokens it then refuses
        # /tasks/<id>/resolve/: 'presign' (303 to storage_url), 'stream' (the bytes), or an error status
        self.resolve_mode: str | int = "presign"
        self.storage_url = ""  # the storage host a presigned redirect points at
        self.expired = 0  # as a storage host: answer this many requests 403 "Request has expired"

    def authorized(self, header: str | None) -> bool:
        if header == f"Token {LEGACY}":
            return True
        return bool(header and header.startswith("Bearer ") and header[7:] in self.valid_access)


class Handler(BaseHTTPRequestHandler):
    server: FakeServer

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/octet-stream", length=True):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the loader hung up on purpose (size cap)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def do_GET(self):
        srv = self.server
        srv.requests.append(("GET", self.path, dict(self.headers)))
        path = self.path.split("?")[0]
        if path in (IMAGE_PATH, "/data/local-files/"):
            if srv.authorized(self.headers.get("Authorization")):
                self._send(200, IMAGE, "image/png")
            else:
                self._json(401, {"detail": "Authentication credentials were not provided."})
        elif re.fullmatch(r"/tasks/\d+/(resolve|presign)/", path):
            if not srv.authorized(self.headers.get("Authorization")):
                self._json(401, {"detail": "Authentication credentials were not provided."})
            elif srv.resolve_mode == "presign":  # as Label Studio with the storage's presign on
                uri = base64.urlsafe_b64decode(parse_qs(urlsplit(self.path).query)["fileuri"][0]).decode()
                self.send_response(303)
                self.send_header("Location", f"{srv.storage_url}/{uri.split('://', 1)[1]}?X-Amz-Signature=SECRET")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif srv.resolve_mode == "stream":
                self._send(200, IMAGE, "image/png")
            elif srv.resolve_mode == 424:
                self._json(424, {"error": "Storage stream failed while proxying data", "detail": "NoSuchKey"})
            else:  # Label Studio's bare 403 and 404
                self._send(srv.resolve_mode, b"")
        elif path.startswith("/bucket/"):  # as a storage host serving presigned URLs
            with srv.lock:
                expired, srv.expired = srv.expired > 0, max(srv.expired - 1, 0)
            if expired:
                self._send(403, b"<?xml version='1.0'?><Error><Code>AccessDenied</Code><Message>Request has "
                                b"expired</Message></Error>", "application/xml")
            else:
                self._send(200, IMAGE, "image/png")
        elif path == "/redirect":  # to wherever ?to= says
            self.send_response(302)
            self.send_header("Location", parse_qs(urlsplit(self.path).query)["to"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/plain.jpg":
            self._send(200, IMAGE, "image/png")
        elif path == "/big":
            self._send(200, b"\0" * (srv.max_bytes + 1))
        elif path == "/big-streamed":
            # HTTP/1.0 without Content-Length: the body ends when the connection closes.
            self._send(200, b"\0" * (srv.max_bytes * 4), length=False)
        elif path == "/garbage":
            self._send(200, b"this is not an image", "image/png")
        elif path == "/slow":
            time.sleep(1.0)
            self._send(200, IMAGE, "image/png")
        else:
            self._send(404, b"<html>not found</html>", "text/html")

    def do_POST(self):
        srv = self.server
        srv.requests.append(("POST", self.path, dict(self.headers)))
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path != "/api/token/refresh/":
            self._send(404, b"")
            return
        refresh = body.get("refresh", "")
        try:
            claims = json.loads(base64.urlsafe_b64decode(refresh.split(".")[1] + "=="))
        except (IndexError, ValueError):
            claims = {}
        if claims.get("token_type") != "refresh" or srv.refuse_refresh:
            self._json(401, {"detail": "Token is invalid or expired", "code": "token_not_valid"})
            return
        with srv.lock:
            srv.refresh_calls += 1
            access = make_jwt("access", exp_in=srv.access_ttl)
            if srv.remember_access:
                srv.valid_access.add(access)
        self._json(200, {"access": access})


def _serve():
    server = FakeServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def ls():
    """The Label Studio imitation."""
    yield from _serve()


@pytest.fixture
def third_party():
    """A second server on another port: a third-party image host that must never see credentials."""
    yield from _serve()


def loader(settings: Settings | None = None, **fields) -> ImageLoader:
    session = requests.Session()
    session.trust_env = False  # no proxy from the environment for loopback requests
    return ImageLoader(settings or Settings(**fields), session)


def auth_headers(server: FakeServer) -> list[str | None]:
    return [headers.get("Authorization") for method, _, headers in server.requests if method == "GET"]


# --------------------------------------------------------------------------- Label Studio auth


@pytest.mark.parametrize("url", [IMAGE_PATH, IMAGE_PATH.lstrip("/")])
def test_legacy_token(ls, url):
    image = loader(label_studio_url=ls.url, label_studio_api_key=LEGACY).load(url)
    assert image.shape == (4, 6, 3) and image.dtype == np.uint8
    assert tuple(image[0, 0]) == (10, 200, 30)
    assert auth_headers(ls) == [f"Token {LEGACY}"]
    assert ls.refresh_calls == 0


@pytest.mark.parametrize(
    "access_ttl, refreshes",
    [
        (300.0, 1),  # cached access token reused by the second load
        (20.0, 2),  # within the 30 s margin: refreshed before each use
        (-10.0, 2),  # already expired
    ],
)
def test_personal_access_token_exchange_and_cache(ls, access_ttl, refreshes):
    ls.access_ttl = access_ttl
    pat = make_jwt("refresh")
    images = loader(label_studio_url=ls.url, label_studio_api_key=pat)
    for _ in range(2):
        assert images.load(IMAGE_PATH).shape == (4, 6, 3)
    assert ls.refresh_calls == refreshes
    posts = [(path, headers) for method, path, headers in ls.requests if method == "POST"]
    assert [path for path, _ in posts] == ["/api/token/refresh/"] * refreshes
    # The PAT itself is never sent as a Bearer token, only exchanged.
    assert all(header.startswith("Bearer ") and header != f"Bearer {pat}" for header in auth_headers(ls))


def test_refused_cached_access_token_is_refreshed_once(ls):
    images = loader(label_studio_url=ls.url, label_studio_api_key=make_jwt("refresh"))
    images.load(IMAGE_PATH)
    ls.valid_access.clear()  # Label Studio forgets the access token (e.g. restart with a new secret)
    assert images.load(IMAGE_PATH).shape == (4, 6, 3)
    assert ls.refresh_calls == 2
    assert len(auth_headers(ls)) == 3  # ok, 401, retried ok


def test_fresh_access_token_refused_is_not_retried(ls):
    images = loader(label_studio_url=ls.url, label_studio_api_key=make_jwt("refresh"))
    ls.remember_access = False
    with pytest.raises(ImageError, match="HTTP 401"):
        images.load(IMAGE_PATH)
    assert ls.refresh_calls == 1 and len(auth_headers(ls)) == 1


def test_concurrent_loads_share_one_exchange(ls):
    images = loader(label_studio_url=ls.url, label_studio_api_key=make_jwt("refresh"))
    results, errors = [], []

    def work():
        try:
            results.append(images.load(IMAGE_PATH).shape)
        except ImageError as e:
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [(4, 6, 3)] * 8
    assert ls.refresh_calls == 1


def test_access_jwt_is_used_directly(ls):
    access = make_jwt("access")
    ls.valid_access.add(access)
    loader(label_studio_url=ls.url, label_studio_api_key=access).load(IMAGE_PATH)
    assert auth_headers(ls) == [f"Bearer {access}"]
    assert ls.refresh_calls == 0


def test_revoked_personal_access_token(ls):
    ls.refuse_refresh = True
    pat = make_jwt("refresh")
    with pytest.raises(ImageError) as info:
        loader(label_studio_url=ls.url, label_studio_api_key=pat).load(IMAGE_PATH)
    message = str(info.value)
    assert "refused the personal access token" in message and "HTTP 401: Token is invalid or expired" in message
    assert "LABEL_STUDIO_API_KEY" in message and pat not in message
    assert auth_headers(ls) == []  # no image request without an access token


@pytest.mark.parametrize("hostname", ["{url}", "{url}/", "127.0.0.1:{port}"])
def test_hostname_and_token_from_setup_when_settings_empty(ls, hostname):
    hostname = hostname.format(url=ls.url, port=ls.server_address[1])
    image = loader().load(IMAGE_PATH, hostname=hostname, access_token=LEGACY)
    assert image.shape == (4, 6, 3)
    assert auth_headers(ls) == [f"Token {LEGACY}"]


def test_personal_access_token_from_setup(ls):
    assert loader().load(IMAGE_PATH, hostname=ls.url, access_token=make_jwt("refresh")).shape == (4, 6, 3)
    assert ls.refresh_calls == 1


def test_settings_win_over_setup_arguments(ls, third_party):
    loader(label_studio_url=ls.url, label_studio_api_key=LEGACY).load(
        IMAGE_PATH, hostname=third_party.url, access_token="other"
    )
    assert auth_headers(ls) == [f"Token {LEGACY}"] and third_party.requests == []


def test_settings_without_scheme_get_http(ls):
    settings = Settings(label_studio_url=f"127.0.0.1:{ls.server_address[1]}", label_studio_api_key=LEGACY)
    assert loader(settings).load(IMAGE_PATH).shape == (4, 6, 3)


def test_missing_base_url_names_the_variable():
    with pytest.raises(ImageError, match="LABEL_STUDIO_URL.*LABEL_STUDIO_HOST"):
        loader(label_studio_api_key=LEGACY).load(IMAGE_PATH)


@pytest.mark.parametrize(
    "key, hint",
    [
        ("wrong-legacy-token", "legacy token"),
        ("", "no Label Studio API key"),
    ],
)
def test_unauthorized_gives_status_and_env_hint(ls, key, hint):
    with pytest.raises(ImageError) as info:
        loader(label_studio_url=ls.url, label_studio_api_key=key).load(IMAGE_PATH)
    message = str(info.value)
    assert "HTTP 401" in message and IMAGE_PATH in message and hint in message
    assert "LABEL_STUDIO_API_KEY" in message
    assert key == "" or key not in message


def test_dotted_non_jwt_is_a_legacy_token(ls):
    not_a_pat = "a.b.c"  # three parts but no JSON payload
    with pytest.raises(ImageError, match="HTTP 401"):
        loader(label_studio_url=ls.url, label_studio_api_key=not_a_pat).load(IMAGE_PATH)
    assert auth_headers(ls) == ["Token a.b.c"]


# --------------------------------------------------------------------------- who gets credentials


def test_plain_url_gets_no_authorization(ls, third_party):
    images = loader(label_studio_url=ls.url, label_studio_api_key=LEGACY)
    assert images.load(third_party.url + "/plain.jpg?sig=1").shape == (4, 6, 3)
    # Even a path that looks like a Label Studio upload gets no credentials on another host.
    with pytest.raises(ImageError, match="HTTP 401.*no credentials to hosts other than Label Studio"):
        images.load(third_party.url + IMAGE_PATH)
    assert [path for _, path, _ in third_party.requests] == ["/plain.jpg?sig=1", IMAGE_PATH]
    assert auth_headers(third_party) == [None, None]
    assert ls.requests == []


def test_plain_url_with_pat_gets_no_authorization_and_no_exchange(ls, third_party):
    loader(label_studio_url=ls.url, label_studio_api_key=make_jwt("refresh")).load(third_party.url + "/plain.jpg")
    assert auth_headers(third_party) == [None] and ls.refresh_calls == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "LOCALHOST"])
def test_absolute_url_to_label_studio_gets_authorization(ls, host):
    port = ls.server_address[1]
    base = f"http://{host.lower()}:{port}"
    images = loader(label_studio_url=base, label_studio_api_key=LEGACY)
    assert images.load(f"http://{host}:{port}{IMAGE_PATH}").shape == (4, 6, 3)
    assert auth_headers(ls) == [f"Token {LEGACY}"]


# --------------------------------------------------------------------------- transfer limits and errors


@pytest.mark.parametrize("path, match", [("/big", "Content-Length"), ("/big-streamed", "download aborted")])
def test_size_cap(ls, path, match):
    settings = Settings(image_max_mb=0.01)
    ls.max_bytes = int(settings.image_max_mb * 2**20)
    with pytest.raises(ImageError, match=f"{match}.*IMAGE_MAX_MB|IMAGE_MAX_MB.*{match}"):
        loader(settings).load(ls.url + path)


def test_timeout(ls):
    start = time.monotonic()
    with pytest.raises(ImageError, match="timed out.*IMAGE_FETCH_TIMEOUT"):
        loader(image_fetch_timeout=0.2).load(ls.url + "/slow")
    assert time.monotonic() - start < 0.9


def test_404_names_status_and_redacted_url(ls):
    with pytest.raises(ImageError) as info:
        loader().load(ls.url + "/missing.png?X-Amz-Signature=SECRET#frag")
    message = str(info.value)
    assert "HTTP 404" in message and f"{ls.url}/missing.png" in message
    assert "SECRET" not in message and "?" not in message


def test_connection_refused():
    server = FakeServer()
    url = server.url + "/x.png?token=SECRET"
    server.server_close()  # the port is now closed
    with pytest.raises(ImageError, match="fetching http://127.0.0.1:\\d+/x.png failed") as info:
        loader().load(url)
    assert "SECRET" not in str(info.value)


@pytest.mark.parametrize(
    "url, scheme",
    [
        ("file:///etc/passwd", "file"),
        ("ftp://example.com/x.png", "ftp"),
        ("static/x.png", ""),
    ],
)
def test_unsupported_scheme(url, scheme):
    with pytest.raises(ImageError, match=f"unsupported image URL scheme '{scheme}'") as info:
        loader().load(url)
    assert "SECRET" not in str(info.value)


def test_decode_error_names_the_url(ls):
    with pytest.raises(ImageError, match=r"^http://127\.0\.0\.1:\d+/garbage: could not decode image"):
        loader().load(ls.url + "/garbage?sig=1")


# --------------------------------------------------------------------------- local files


@pytest.fixture
def document_root(tmp_path):
    root = tmp_path / "root"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "x.png").write_bytes(png_bytes(3, 2, (1, 2, 3)))
    (tmp_path / "secret.png").write_bytes(png_bytes())
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    return root


@pytest.mark.parametrize("url", ["/data/local-files/?d=dir/x.png", "/data/local-files/?d=dir%2Fx.png"])
def test_local_file_read_from_document_root(document_root, url):
    image = loader(local_files_document_root=str(document_root)).load(url)  # no LS URL: must not fetch
    assert image.shape == (2, 3, 3) and tuple(image[0, 0]) == (1, 2, 3)


@pytest.mark.parametrize("rel", ["../secret.png", "dir/../../secret.png", "link.png", "{abs}", "%00x"])
def test_local_file_outside_root_rejected(document_root, ls, rel):
    rel = rel.format(abs=document_root.parent / "secret.png")
    images = loader(local_files_document_root=str(document_root), label_studio_url=ls.url, label_studio_api_key=LEGACY)
    with pytest.raises(ImageError, match="escapes LOCAL_FILES_DOCUMENT_ROOT|not a usable path"):
        images.load(f"/data/local-files/?d={rel}")
    assert ls.requests == []


def test_local_file_missing_on_disk_is_fetched_from_label_studio(document_root, ls):
    images = loader(local_files_document_root=str(document_root), label_studio_url=ls.url, label_studio_api_key=LEGACY)
    assert images.load("/data/local-files/?d=dir/elsewhere.png").shape == (4, 6, 3)
    assert [(path, headers.get("Authorization")) for _, path, headers in ls.requests] == [
        ("/data/local-files/?d=dir/elsewhere.png", f"Token {LEGACY}")
    ]


def test_local_files_without_document_root_are_fetched(ls):
    loader(label_studio_url=ls.url, label_studio_api_key=LEGACY).load("/data/local-files/?d=dir/x.png")
    assert auth_headers(ls) == [f"Token {LEGACY}"]


# --------------------------------------------------------------------------- decode_image


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def test_exif_orientation_6_is_applied():
    # Stored 40 wide x 20 tall, red block in the stored top-left; orientation 6 = "rotate 90 degrees clockwise
    # to display", so a browser shows a 20 x 40 portrait with the red block at the top-right.
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    image = decode_image(encode(stored, "JPEG", exif=exif, quality=95), max_pixels=10_000)
    assert image.shape == (40, 20, 3)
    top_right, top_left = image[3, 16].astype(int), image[3, 3].astype(int)
    assert top_right[0] > 200 and top_right[2] < 60  # red
    assert top_left[2] > 200 and top_left[0] < 60  # blue


def test_no_exif_keeps_stored_orientation():
    assert decode_image(encode(Image.new("RGB", (40, 20)), "JPEG"), max_pixels=10_000).shape == (20, 40, 3)


def _palette() -> Image.Image:
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((1, 0), 1)
    return image


def _rgba() -> Image.Image:
    image = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    image.putpixel((1, 0), (0, 0, 0, 0))  # fully transparent black shows the white page behind it
    return image


def _gray16() -> Image.Image:
    return Image.fromarray(np.array([[65535, 100 * 256]], dtype=np.uint16))


@pytest.mark.parametrize(
    "make, fmt, expected",
    [
        (_palette, "PNG", [(255, 0, 0), (0, 0, 255)]),
        (_rgba, "PNG", [(255, 0, 0), (255, 255, 255)]),
        (lambda: Image.new("LA", (2, 1), (50, 255)), "PNG", [(50, 50, 50)] * 2),
        (_gray16, "PNG", [(255, 255, 255), (100, 100, 100)]),
        (lambda: Image.new("1", (2, 1), 1), "PNG", [(255, 255, 255)] * 2),
        (lambda: Image.new("L", (2, 1), 77), "PNG", [(77, 77, 77)] * 2),
        (lambda: Image.new("CMYK", (2, 1), (0, 0, 0, 0)), "TIFF", [(255, 255, 255)] * 2),
        (lambda: Image.new("RGB", (2, 1), (1, 2, 3)), "WEBP", None),
    ],
    ids=["palette", "rgba", "la", "gray16", "1bit", "gray8", "cmyk", "webp"],
)
def test_modes_become_rgb(make, fmt, expected):
    source = make()
    params = {"lossless": True} if fmt == "WEBP" else {}
    image = decode_image(encode(source, fmt, **params), max_pixels=100)
    assert image.shape == (1, 2, 3) and image.dtype == np.uint8 and image.flags.writeable
    if expected is not None:
        assert [tuple(int(v) for v in px) for px in image[0]] == expected


def test_pixel_cap_checked_before_decoding():
    data = encode(Image.new("RGB", (100, 100)))
    with pytest.raises(ImageError, match="100x100 = 10,000 pixels.*IMAGE_MAX_PIXELS limit of 9,999"):
        decode_image(data, max_pixels=9_999)
    assert decode_image(data, max_pixels=10_000).shape == (100, 100, 3)
    # Only the header is present: the cap must fire before any pixel is read, decoding must fail after it.
    truncated = data[: data.index(b"IDAT") + 8]
    with pytest.raises(ImageError, match="IMAGE_MAX_PIXELS"):
        decode_image(truncated, max_pixels=9_999)
    with pytest.raises(ImageError, match="could not decode PNG 100x100"):
        decode_image(truncated, max_pixels=10_000)


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk claiming width x height, RGB 8-bit, with no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


@pytest.mark.parametrize(
    "width, height, max_pixels, match",
    [
        (10_000, 8_000, 79_999_999, "10000x8000 = 80,000,000 pixels, over the IMAGE_MAX_PIXELS limit of 79,999,999"),
        (30_000, 30_000, 10**10, "decompression-bomb"),  # Pillow's own guard (about 179 Mpx) fires in open()
    ],
    ids=["IMAGE_MAX_PIXELS", "pillow-guard"],
)
def test_huge_dimensions_rejected_from_header(width, height, max_pixels, match):
    # The data is a header only: a rejection here cannot have come from decoding (or allocating) pixels.
    with pytest.raises(ImageError, match=match):
        decode_image(_png_header(width, height), max_pixels=max_pixels)


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 20])
def test_garbage_bytes(data):
    with pytest.raises(ImageError, match="image"):
        decode_image(data, max_pixels=1_000_000)


# ------------------------------------------------------------- cloud storage (Label Studio's resolve route)


def fileuri(uri: str) -> str:
    return base64.urlsafe_b64encode(uri.encode()).decode()


@pytest.fixture
def storage(ls, third_party):
    """Label Studio (`ls`) whose resolve route redirects to presigned URLs on `third_party`, the storage host."""
    ls.storage_url = third_party.url
    return third_party


def gets(server: FakeServer) -> list[str]:
    return [path for method, path, _ in server.requests if method == "GET"]


@pytest.mark.parametrize("uri", ["s3://bucket/a/img.png", "gs://bucket/img.png", "azure-blob://bucket/img.png"])
def test_storage_uri_is_fetched_through_the_tasks_resolve_route_and_the_storage_never_sees_the_key(
        ls, storage, uri):
    image = loader(label_studio_url=ls.url, label_studio_api_key=LEGACY).load(uri, task_id=7)
    assert image.shape == (4, 6, 3)
    assert gets(ls) == [f"/tasks/7/resolve/?fileuri={fileuri(uri)}"] and auth_headers(ls) == [f"Token {LEGACY}"]
    assert gets(storage) == [f"/{uri.split('://')[1]}?X-Amz-Signature=SECRET"]
    assert auth_headers(storage) == [None]


@pytest.mark.parametrize("form", ["/tasks/7/resolve/?fileuri={b64}", "tasks/7/presign/?fileuri={b64}",
                                  "{ls}/tasks/7/resolve/?fileuri={b64}"])
def test_the_task_apis_resolve_form_is_fetched_as_it_is(ls, storage, form):
    url = form.format(b64=fileuri("s3://bucket/img.png"), ls=ls.url)
    assert loader(label_studio_url=ls.url, label_studio_api_key=LEGACY).load(url).shape == (4, 6, 3)
    assert len(gets(ls)) == 1 and auth_headers(storage) == [None]


def test_presign_off_label_studio_streams_the_bytes(ls):
    ls.resolve_mode = "stream"
    assert loader(label_studio_url=ls.url, label_studio_api_key=LEGACY).load("s3://b/k.png", task_id=3).shape == (
        4, 6, 3)


def test_an_expired_presigned_url_is_resolved_again_once(ls, storage):
    images = loader(label_studio_url=ls.url, label_studio_api_key=LEGACY)
    storage.expired = 1
    assert images.load("s3://bucket/img.png", task_id=7).shape == (4, 6, 3)
    assert len(gets(ls)) == 2 and len(gets(storage)) == 2
    storage.expired = 5  # refused every time: resolved again once only, and the storage's reason is named
    with pytest.raises(ImageError) as info:
        images.load("s3://bucket/img.png", task_id=7)
    assert len(gets(ls)) == 4 and len(gets(storage)) == 4
    assert info.value.kind == "denied" and info.value.status == 403
    assert "redirected to" in str(info.value) and "Request has expired" in str(info.value)
    assert "SECRET" not in str(info.value)


def test_storage_downloads_keep_the_size_and_pixel_caps(ls, storage):
    """The presigned download is held to IMAGE_MAX_MB and IMAGE_MAX_PIXELS as any image URL is (the object is a
    4x6 PNG of more than 16 bytes)."""
    access = {"label_studio_url": ls.url, "label_studio_api_key": LEGACY}
    with pytest.raises(ImageError, match="IMAGE_MAX_MB"):
        loader(image_max_mb=16 / 2**20, **access).load("s3://bucket/img.png", task_id=7)
    with pytest.raises(ImageError, match="IMAGE_MAX_PIXELS"):
        loader(image_max_pixels=23, **access).load("s3://bucket/img.png", task_id=7)
    assert len(gets(storage)) == 2  # both refusals came from the storage's answer, not before fetching it
    assert loader(image_max_pixels=24, **access).load("s3://bucket/img.png", task_id=7).shape == (4, 6, 3)


@pytest.mark.parametrize("status, kind, reason", [(403, "denied", "legacy tokens may be disabled"),
                                                  (404, "unreachable", "found no storage of the project"),
                                                  (424, "unreachable", "NoSuchKey")])
def test_resolve_route_refusals_are_the_tasks_failure_with_label_studios_reason(ls, status, kind, reason):
    ls.resolve_mode = status
    with pytest.raises(ImageError) as info:
        loader(label_studio_url=ls.url, label_studio_api_key=LEGACY).load("s3://bucket/missing.png", task_id=7)
    assert info.value.kind == kind and f"HTTP {status}" in str(info.value) and reason in str(info.value)
    assert len(gets(ls)) == 1  # a refusal by Label Studio itself is not retried


def test_a_storage_uri_without_its_task_names_what_is_missing(ls):
    with pytest.raises(ImageError, match="cloud storage URI.*needs the task's id") as info:
        loader(label_studio_url=ls.url, label_studio_api_key=LEGACY).load("s3://bucket/img.png?sig=SECRET")
    assert info.value.kind == "unsupported" and "SECRET" not in str(info.value) and ls.requests == []


def test_the_cache_key_of_a_storage_object_is_its_stored_uri(ls, third_party):
    images = loader(label_studio_url=ls.url, label_studio_api_key=LEGACY)
    uri = "s3://bucket/a b/img.png"
    for form in (uri, f"/tasks/3/resolve/?fileuri={fileuri(uri)}", f"{ls.url}/tasks/9/presign/?fileuri={fileuri(uri)}",
                 "/tasks/3/resolve/?fileuri=s3%3A//bucket/a%20b/img.png"):  # Label Studio's unquote fallback
        assert images.cache_key(form) == uri, form
    # Another host's lookalike path is not Label Studio's word for the object.
    lookalike = f"{third_party.url}/tasks/3/resolve/?fileuri={fileuri(uri)}"
    assert images.cache_key(lookalike) == lookalike
    presigned = third_party.url + "/x.png?X-Amz-Signature=1"
    assert images.cache_key(presigned) == presigned
    assert images.cache_key("http://[::1/x.png") == "http://[::1/x.png"  # malformed: fetching it says so


def test_the_pipeline_fetches_a_storage_object_once_whichever_form_names_it(ls, storage):
    from cache import EmbeddingCache
    from loader import Models
    from pipeline import Pipeline

    settings = Settings(label_studio_url=ls.url, label_studio_api_key=LEGACY)
    pipeline = Pipeline(Models(None, None, EmbeddingCache(8, 2**26)), settings, loader(settings))
    first, _ = pipeline.load_image("s3://bucket/img.png", task_id=7)
    again, _ = pipeline.load_image(f"/tasks/7/resolve/?fileuri={fileuri('s3://bucket/img.png')}")
    assert again is first and len(gets(ls)) == 1 and len(gets(storage)) == 1


# --------------------------------------------------------------------------- redaction and logs


@pytest.mark.parametrize(
    "url, expected",
    [
        ("http://user:pw@host:8080/a/b.png?token=x#frag", "http://host:8080/a/b.png"),
        ("https://bucket.s3.amazonaws.com/k.jpg?X-Amz-Signature=abc", "https://bucket.s3.amazonaws.com/k.jpg"),
        ("/data/upload/1/x.png?x=1", "/data/upload/1/x.png"),
        ("/data/local-files/?d=dir/x.jpg", "/data/local-files/"),
        ("s3://bucket/key.jpg?sig=1", "s3://bucket/key.jpg"),
    ],
)
def test_redact_url(url, expected):
    assert redact_url(url) == expected


def test_tokens_never_logged(ls, caplog):
    caplog.set_level(logging.DEBUG)
    pat = make_jwt("refresh")
    images = loader(label_studio_url=ls.url, label_studio_api_key=pat)
    images.load(IMAGE_PATH + "?token=QUERYSECRET")
    ls.valid_access.clear()
    images.load(IMAGE_PATH)  # 401, refresh, retry
    loader(label_studio_url=ls.url, label_studio_api_key=LEGACY).load(IMAGE_PATH)
    with pytest.raises(ImageError) as info:
        loader(label_studio_url=ls.url, label_studio_api_key="BADLEGACYSECRET").load(IMAGE_PATH)
    sent = {headers["Authorization"].split(" ", 1)[1] for _, _, headers in ls.requests if "Authorization" in headers}
    assert len(sent) == 4  # legacy, bad legacy, two access tokens
    jwt_header = _b64({"alg": "HS256", "typ": "JWT"})
    secrets = {part for token in sent | {pat} for part in token.split(".")} - {jwt_header}
    text = caplog.text + str(info.value)  # every logger, urllib3 included
    for secret in secrets:
        assert secret not in text
    ours = "\n".join(record.getMessage() for record in caplog.records if record.name == "images")
    assert "fetched http://127.0.0.1" in ours  # the debug line per fetch is there, redacted
    assert "QUERYSECRET" not in ours
