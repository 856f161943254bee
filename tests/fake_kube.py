"""A Kubernetes API server stand-in on loopback for deploy tests.

A real HTTP server (ThreadingHTTPServer) that stores objects by path, answers GET,
server-side-apply PATCH, PUT, POST and DELETE the way the API server does (404/409,
generation bumps on spec changes, resourceVersion checks), records every request, and
plays scripted answers: a ``status`` function gives each object's status from its
spec and the number of reads since the last write (not-ready-then-ready, a failed
rollout), and ``model`` answers the HTTP requests that reach the served model (through
the service proxy path or a direct address).
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import yaml

TOKEN = "test-token-kaedama"
StatusFn = Callable[[dict[str, Any], int], dict[str, Any]]
ModelFn = Callable[[str, str, Any], tuple[int, Any]]


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


def ready_model(method: str, path: str, body: Any) -> tuple[int, Any]:
    """A healthy model server: ready, and one output per inference."""
    if path.endswith("/infer"):
        return 200, {"model_name": "kaedama", "outputs": [{"name": "probabilities"}]}
    return 200, {"ready": True}


def _status_for(obj: dict[str, Any], reads: int) -> dict[str, Any]:
    return {}


@dataclass
class FakeApiServer:
    status: StatusFn = _status_for
    model: ModelFn = ready_model
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    reads: dict[str, int] = field(default_factory=dict)
    # (method, path) -> HTTP status to refuse that request with (e.g. 403 for RBAC).
    refuse: dict[tuple[str, str], int] = field(default_factory=dict)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._version = 100
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeApiServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def kubeconfig(self, folder: Path) -> Path:
        """A kubeconfig that points at this server with a bearer token."""
        path = folder / "kubeconfig"
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "deployer", "user": {"token": TOKEN}}],
                    "contexts": [
                        {"name": "fake", "context": {"cluster": "fake", "user": "deployer"}}
                    ],
                    "current-context": "fake",
                }
            )
        )
        return path

    # -- helpers for tests -------------------------------------------------------------
    def put(self, path: str, obj: dict[str, Any]) -> None:
        """Store an object as if it had been there before the test."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("generation", 1)
        meta["resourceVersion"] = self._next_version()
        meta.setdefault("uid", f"uid-{meta['resourceVersion']}")
        self.objects[path] = obj

    def calls(self, method: str, fragment: str = "") -> list[Recorded]:
        return [r for r in self.requests if r.method == method and fragment in r.path]

    # -- the server ----------------------------------------------------------------------
    def _next_version(self) -> str:
        self._version += 1
        return str(self._version)

    def _with_status(self, path: str) -> dict[str, Any]:
        obj = copy.deepcopy(self.objects[path])
        self.reads[path] = self.reads.get(path, 0) + 1
        status = self.status(obj, self.reads[path])
        if status:
            obj["status"] = status
        return obj

    def _write(self, path: str, obj: dict[str, Any], before: dict[str, Any] | None) -> None:
        meta = obj["metadata"]
        if before is None:
            meta["generation"] = 1
            meta["uid"] = f"uid-{self._version}"
        else:
            meta["uid"] = before["metadata"]["uid"]
            changed = obj.get("spec") != before.get("spec")
            meta["generation"] = before["metadata"]["generation"] + int(changed)
        meta["resourceVersion"] = self._next_version()
        obj.pop("status", None)
        self.objects[path] = obj
        self.reads[path] = 0

    def handle(self, method: str, raw_path: str, headers, body: Any) -> tuple[int, Any]:
        parts = urlsplit(raw_path)
        path, query = parts.path, dict(parse_qsl(parts.query))
        with self._lock:
            lowered = {k.lower(): v for k, v in headers.items()}
            self.requests.append(Recorded(method, path, query, lowered, body))
            if headers.get("Authorization") != f"Bearer {TOKEN}" and not path.startswith(
                "/direct/"
            ):
                return 401, _status(401, "Unauthorized")
            if (method, path) in self.refuse:
                code = self.refuse[(method, path)]
                return code, _status(code, f"{method} {path} is refused (scripted)")
            if "/proxy/" in path or path.startswith("/direct/"):
                sub = "/" + path.split("/proxy/", 1)[-1] if "/proxy/" in path else path[7:]
                return self.model(method, sub, body)
            before = self.objects.get(path)
            if method == "GET":
                if before is None:
                    return 404, _status(404, f"{path} not found")
                return 200, self._with_status(path)
            if method == "PATCH":
                if headers.get("Content-Type") != "application/apply-patch+yaml":
                    return 415, _status(415, "this fake speaks server-side apply only")
                obj = copy.deepcopy(body)
                if before is not None:
                    merged = copy.deepcopy(before)
                    merged.update({k: v for k, v in obj.items() if k != "metadata"})
                    merged["metadata"].update(
                        {k: v for k, v in obj["metadata"].items() if k in ("labels", "annotations")}
                    )
                    obj = merged
                if query.get("dryRun") == "All":
                    return (201 if before is None else 200), obj
                self._write(path, obj, before)
                return (201 if before is None else 200), self.objects[path]
            if method == "PUT":
                if before is None:
                    return 404, _status(404, f"{path} not found")
                if body["metadata"].get("resourceVersion") != before["metadata"]["resourceVersion"]:
                    return 409, _status(409, "the object has been modified")
                self._write(path, copy.deepcopy(body), before)
                return 200, self.objects[path]
            if method == "POST":
                target = f"{path}/{body['metadata']['name']}"
                if target in self.objects:
                    return 409, _status(409, "already exists")
                if query.get("dryRun") == "All":
                    return 201, body
                self._write(target, copy.deepcopy(body), None)
                return 201, self.objects[target]
            if method == "DELETE":
                if before is None:
                    return 404, _status(404, f"{path} not found")
                del self.objects[path]
                return 200, _status(200, "deleted")
        return 405, _status(405, method)

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                status, answer = server.handle(self.command, self.path, self.headers, body)
                data = (
                    json.dumps(answer).encode() if not isinstance(answer, str) else answer.encode()
                )
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

            def log_message(self, *args):  # keep pytest output clean
                return

        return Handler


def _status(code: int, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": code,
        "message": message,
    }
