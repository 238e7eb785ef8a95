"""A loopback imitation of the parts of Label Studio's REST API the bulk job uses, for unit tests and benchmarks:
a project's label config, its tasks paged (`GET /api/tasks/`, with `selectedItems` queries and 404 past the last
page, as Label Studio answers), the bulk prediction import, predictions by task and their delete. It can fail on purpose
(`fail_next` answers 503 to that many requests) and counts what it was asked. The real Label Studio is
tests/test_label_studio.py's."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

from servers import LoopbackServer


class FakeLabelStudio(LoopbackServer):
    def __init__(self, label_config: str, tasks: dict[int, dict] | None = None, token: str = "fake-ls-token",
                 task_source=None):
        """tasks: id -> task data ({"image": url}); task_source(page, page_size) -> list of tasks instead (a
        project too large to hold)."""
        self.label_config, self.token = label_config, token
        self.tasks = tasks or {}
        self.task_source = task_source
        self.predictions: list[dict] = []  # those a test adds itself take ids below 1000
        self.annotations: dict[int, list[dict]] = {}  # task id -> its annotations, as a test writes them
        self.ml_backends: list[dict] = []  # the project's model connections ({"id", "extra_params"})
        self.next_id = 1000
        self.requests: list[tuple[str, str]] = []
        self.fail_next = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _guard(self) -> bool:
                with server.lock:
                    server.requests.append((self.command, self.path))
                    if server.fail_next:
                        server.fail_next -= 1
                        self._send(503, {"detail": "unavailable"})
                        return False
                if self.headers.get("Authorization") != f"Token {server.token}":
                    self._send(401, {"detail": "Authentication credentials were not provided."})
                    return False
                return True

            def do_GET(self):
                if not self._guard():
                    return
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path == "/api/projects/1/":
                    self._send(200, {"id": 1, "title": "fake", "label_config": server.label_config})
                elif url.path.startswith("/api/projects/"):
                    self._send(404, {"detail": "Not found."})
                elif url.path == "/api/tasks/":
                    self._send(*server.page(query))
                elif url.path == "/api/ml/":
                    self._send(200, [{"project": 1, "url": "http://127.0.0.1:9", **b} for b in server.ml_backends])
                elif url.path == "/api/predictions/":
                    task = int(query["task"])
                    self._send(200, [p for p in server.predictions if p["task"] == task])
                else:
                    self._send(404, {"detail": "Not found."})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
                if not self._guard():
                    return
                if self.path == "/api/projects/1/import/predictions":
                    now = datetime.now(UTC).isoformat()
                    with server.lock:
                        for p in body:
                            server.predictions.append({"id": server.next_id, "created_at": now, **p})
                            server.next_id += 1
                    self._send(201, {"created": len(body)})
                else:
                    self._send(404, {"detail": "Not found."})

            def do_PATCH(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
                if not self._guard():
                    return
                parts = self.path.strip("/").split("/")
                found = [b for b in server.ml_backends if parts[:2] == ["api", "ml"] and str(b["id"]) == parts[-1]]
                if not found:
                    self._send(404, {"detail": "Not found."})
                    return
                found[0].update(body)
                self._send(200, {"project": 1, "url": "http://127.0.0.1:9", **found[0]})

            def do_DELETE(self):
                if not self._guard():
                    return
                parts = self.path.strip("/").split("/")
                if parts[:2] == ["api", "predictions"] and len(parts) == 3 and parts[2].isdigit():
                    with server.lock:
                        found = [p for p in server.predictions if p["id"] == int(parts[2])]
                        for p in found:
                            server.predictions.remove(p)
                    if found:
                        self.send_response(204)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                self._send(404, {"detail": "Not found."})

        super().__init__(Handler, poll_interval=0.05)

    def task_json(self, task_id: int, data: dict) -> dict:
        predictions = [p for p in self.predictions if p["task"] == task_id]
        return {"id": task_id, "data": data, "project": 1, "annotations": self.annotations.get(task_id, []),
                "predictions": predictions,
                "predictions_model_versions": ",".join(dict.fromkeys(p["model_version"] for p in predictions))}

    def page(self, query: dict) -> tuple[int, dict]:
        page, size = int(query.get("page", 1)), int(query.get("page_size", 100))
        if self.task_source is not None:
            tasks = self.task_source(page, size)
        else:
            ids = sorted(self.tasks)
            if "query" in query:
                included = set(json.loads(query["query"])["selectedItems"]["included"])
                ids = [i for i in ids if i in included]
            tasks = [self.task_json(i, self.tasks[i]) for i in ids[(page - 1) * size: page * size]]
        if not tasks and page > 1:
            return 404, {"detail": "Invalid page."}
        return 200, {"tasks": tasks, "total": len(self.tasks), "total_annotations": 0, "total_predictions": 0}

    def predictions_of(self, task_id: int) -> list[dict]:
        return [p for p in self.predictions if p["task"] == task_id]
