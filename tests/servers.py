"""Loopback HTTP servers for tests: the shared start/stop plumbing, and one that serves images the way Label Studio
does (for protocol tests)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LoopbackServer:
    """`handler` (a BaseHTTPRequestHandler class) served on 127.0.0.1 at a free port from a daemon thread;
    `with server:` runs it, `close()` stops it."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], poll_interval: float = 0.5):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": poll_interval},
                                       daemon=True)

    def start(self):
        self.thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


class ImageServer(LoopbackServer):
    """Serves `files` (path -> bytes) on 127.0.0.1. Paths under /data/upload/ need
    `Authorization: Token <token>`, like Label Studio uploads; others are public."""

    def __init__(self, files: dict[str, bytes], token: str = "ls-token"):
        self.files, self.token, self.requests = files, token, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Authorization")))
                body = server.files.get(self.path)
                if self.path.startswith("/data/upload/") and self.headers.get("Authorization") != f"Token {token}":
                    self.send_response(401)
                    self.end_headers()
                    return
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args):
                pass

        super().__init__(Handler)
