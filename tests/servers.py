"""A loopback HTTP server that serves test images the way Label Studio does (for protocol tests)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ImageServer:
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

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ImageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
