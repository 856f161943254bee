"""The smoke test of a freshly deployed model: ready, then one real inference.

The request is an Open Inference Protocol (v2) call with one small generated PNG as a
BYTES input, the way a client sends a photo; a 2xx answer with ``outputs`` passes.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable
from typing import Any

import urllib3

from kaedama.errors import KaedamaError

# Answers that say "not yet" rather than "broken": retried with backoff.
_RETRY_STATUSES = {429, 502, 503, 504}
Request = Callable[[str, str, Any], tuple[int, Any]]


class SmokeTestFailed(KaedamaError):
    """The new version answered, but not correctly."""


def sample_image() -> bytes:
    """A small, valid RGB PNG (a gradient: not constant, so preprocessing is exercised)."""
    from PIL import Image

    image = Image.new("RGB", (64, 48))
    image.putdata([(x * 4, y * 5, (x + y) * 2) for y in range(48) for x in range(64)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def infer_request() -> dict[str, Any]:
    """The OIP request body: one image as base64 BYTES."""
    data = base64.b64encode(sample_image()).decode("ascii")
    return {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [data]}]}


def http_requester(base_url: str, timeout: float = 30.0) -> Request:
    """Requests straight to ``base_url`` (in-cluster addresses, an ingress, a port-forward)."""
    pool = urllib3.PoolManager(timeout=urllib3.Timeout(total=timeout), retries=False)
    base = base_url.rstrip("/")

    def request(method: str, path: str, body: Any = None) -> tuple[int, Any]:
        try:
            response = pool.request(
                method,
                base + path,
                body=None if body is None else json.dumps(body).encode(),
                headers={"Content-Type": "application/json", "Accept": "application/json"},
            )
        except urllib3.exceptions.HTTPError as exc:
            return 503, f"cannot reach {base}: {exc}"
        text = response.data.decode("utf-8", "replace")
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text

    return request


def _with_retries(request: Request, method: str, path: str, body: Any, tries: int, backoff: float):
    status, answer = 0, None
    for attempt in range(tries):
        status, answer = request(method, path, body)
        if status not in _RETRY_STATUSES:
            break
        if attempt + 1 < tries:
            time.sleep(backoff * 2**attempt)
    return status, answer


def smoke_test(
    request: Request, model_name: str, *, tries: int = 5, backoff: float = 1.0
) -> dict[str, Any]:
    """Check /v2/health/ready, the model's ready endpoint and one inference; return the answer."""
    checks = [
        ("GET", "/v2/health/ready", None),
        ("GET", f"/v2/models/{model_name}/ready", None),
    ]
    for method, path, body in checks:
        status, answer = _with_retries(request, method, path, body, tries, backoff)
        if not 200 <= status < 300:
            raise SmokeTestFailed(f"{method} {path} answered {status}: {str(answer)[:300]}")
    path = f"/v2/models/{model_name}/infer"
    status, answer = _with_retries(request, "POST", path, infer_request(), tries, backoff)
    if not 200 <= status < 300:
        raise SmokeTestFailed(f"POST {path} answered {status}: {str(answer)[:300]}")
    if not isinstance(answer, dict) or not answer.get("outputs"):
        raise SmokeTestFailed(f"POST {path} answered without outputs: {str(answer)[:300]}")
    return answer
