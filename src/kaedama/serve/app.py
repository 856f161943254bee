"""The prediction service's HTTP routes (Starlette), admission control and lifecycle.

Routes:

* Open Inference Protocol (KServe v2): ``GET /v2/health/live``, ``/v2/health/ready``,
  ``/v2``, ``/v2/models/{name}[/versions/{v}]``, ``.../ready``; ``POST .../infer``
  (JSON with base64 images, or raw bytes with the binary data extension).
* Plain: ``POST /v1/models/{name}:predict`` and ``/predict`` take one image as the
  raw body (``application/octet-stream``, ``image/*``) or as a multipart file;
  the answer lists every class's probability, sorted, cut by ``top_k`` and
  ``threshold`` (Vertex AI's ``maxPredictions`` / ``confidenceThreshold``).
* ``POST /v1/models/{name}:explain`` and ``/explain``: a CAM heatmap (PNG, or the
  grid as JSON with ``format=json``) for the top class or ``class=LABEL``.
* ``GET /metrics``: Prometheus.

Errors are JSON ``{"error": ..., "reason": ...}``: 400/415/413 for bad input with
the decoder's reason, 404 for an unknown model, 408 for a body that does not
arrive in time, 429 + Retry-After when the queue is full, 503 + Retry-After while
loading or draining, 501 for explain without a CAM output. A 500 means a bug.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import signal
import threading
import time
import urllib.parse
import weakref
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kaedama import __version__
from kaedama.images import ImageError
from kaedama.serve import protocol
from kaedama.serve.batching import Admission, DrainMeter, MicroBatcher, Shed
from kaedama.serve.config import ServeConfig
from kaedama.serve.metrics import Metrics
from kaedama.serve.model import ImageClassifier

log = logging.getLogger(__name__)

RAW_TYPES = ("application/octet-stream", "image/")
MULTIPART = "multipart/form-data"
# Decoder reasons -> HTTP status: not an image at all is an unsupported media type,
# a decompression bomb a payload too large, everything else a bad request.
REASON_STATUS = {"not_an_image": 415, "too_large": 413}
# Shed requests whose bodies are at most this large are read before the 429, so the
# client's keep-alive connection survives; larger ones are answered unread.
DRAIN_BODY_BYTES = 256 * 1024

# Every live service in this process, so a SIGTERM can mark them all draining.
_SERVICES: weakref.WeakSet[Service] = weakref.WeakSet()


class HTTPError(Exception):
    """An error answered as JSON with ``status``."""

    def __init__(self, status: int, message: str, reason: str = "", headers=None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
        self.headers = headers or {}


def error_response(status: int, message: str, reason: str = "", headers=None) -> JSONResponse:
    """The JSON error body every failure uses."""
    body = {"error": message}
    if reason:
        body["reason"] = reason
    return JSONResponse(body, status_code=status, headers=headers)


def _query_number(request: Request, key: str, cast, default, low, high):
    raw = request.query_params.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = cast(raw)
    except ValueError:
        raise HTTPError(400, f"{key} must be a number, got {raw!r}", "bad_parameter") from None
    if not low <= value <= high:
        raise HTTPError(400, f"{key} must be in [{low}, {high}], got {raw}", "bad_parameter")
    return value


def ranked(
    classes: tuple[str, ...], probabilities: np.ndarray, top_k: int = 0, threshold: float = 0.0
) -> list[dict]:
    """Classes sorted by probability, at most ``top_k`` (0 = all), at least ``threshold``."""
    order = np.argsort(-probabilities, kind="stable")
    out = [
        {"label": classes[i], "score": float(probabilities[i])}
        for i in order
        if probabilities[i] >= threshold
    ]
    return out[:top_k] if top_k else out


class Service:
    """One model behind the routes: load, admission, batching, metrics, auth, drain."""

    def __init__(self, model_dir: str, config: ServeConfig) -> None:
        self.config = config
        self.model = ImageClassifier(model_dir, config)
        self.meter = DrainMeter(0.01)
        self.metrics = Metrics(lambda: self.admission.pending, lambda: self.meter.images_per_second)
        self.admission = Admission(
            capacity=config.capacity,
            meter=self.meter,
            max_retry_after_s=config.max_retry_after_s,
            on_shed=lambda reason: self.metrics.shed.labels(reason).inc(),
        )
        self.batcher: MicroBatcher | None = None
        self.decode_pool = ThreadPoolExecutor(
            config.preprocess_threads, thread_name_prefix="kaedama-decode"
        )
        self.token = self._read_token(config.auth_token_file)
        self.load_error: str | None = None
        self._load_task: asyncio.Task | None = None
        # What a failed load does; the single-process runner stops its uvicorn server.
        self.on_fatal: Callable[[], None] = lambda: signal.raise_signal(signal.SIGTERM)
        _SERVICES.add(self)

    @staticmethod
    def _read_token(path: str) -> bytes | None:
        if not path:
            return None
        from kaedama import storage

        token = storage.read_text(path).strip()
        if not token:
            from kaedama.config import ConfigError

            raise ConfigError(f"auth token file {path} is empty")
        return token.encode("utf-8")

    # ------------------------------------------------------------------ lifecycle

    async def startup(self) -> None:
        """Start listening at once; load and warm the model in the background."""
        _chain_drain_on_signals()
        self._load_task = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self.model.load)
        except Exception as exc:  # noqa: BLE001 - any load failure must stop the process
            self.load_error = str(exc)
            log.error("cannot load the model from %s: %s", self.model.model_dir, exc)
            self.admission.state = "failed"
            self.on_fatal()
            return
        self.meter.seconds_per_image = self.model.seconds_per_image
        self.batcher = MicroBatcher(
            self.model.predict,
            max_batch_size=self.config.max_batch_size,
            max_wait_s=self.config.max_batch_wait_ms / 1000.0,
            meter=self.meter,
            on_batch=self.metrics.observe_batch,
        )
        self.batcher.start()
        if self.admission.state == "loading":
            self.admission.state = "ready"
            self.metrics.ready.set(1)

    def begin_drain(self) -> None:
        """Stop admitting (503 + Retry-After) and report not ready; accepted work continues."""
        if self.admission.state != "draining":
            log.info("draining: %d images still admitted", self.admission.pending)
        self.admission.state = "draining"
        self.metrics.ready.set(0)

    async def shutdown(self) -> None:
        """Finish every admitted image, then release the threads."""
        self.begin_drain()
        while self.admission.pending:
            await asyncio.sleep(0.01)
        if self.batcher is not None:
            await self.batcher.stop()
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ helpers

    def _check_auth(self, request: Request) -> None:
        if self.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("utf-8"), self.token
        ):
            raise HTTPError(
                401,
                "missing or wrong bearer token (send 'Authorization: Bearer TOKEN')",
                "unauthorized",
                {"WWW-Authenticate": 'Bearer realm="kaedama"'},
            )

    def _check_model(self, name: str, version: str | None = None) -> None:
        if self.model.artifact is None:  # the name is not known before the load
            self.admission.check(1)
        if name != self.model.name:
            raise HTTPError(
                404, f"model {name!r} not found; this server serves {self.model.name!r}", "no_model"
            )
        if version is not None and self.model.artifact and version != self.model.version:
            raise HTTPError(
                404,
                f"version {version!r} of {name!r} not found; serving {self.model.version!r}",
                "no_version",
            )

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HTTPError(413, f"the body has {declared} bytes; the limit is {limit}", "too_big")
        chunks, size = [], 0
        request.state.body_read = True

        async def read() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise HTTPError(413, f"the body exceeds the limit of {limit} bytes", "too_big")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), self.config.read_timeout_s or None)
        except asyncio.TimeoutError:
            raise HTTPError(
                408,
                f"the request body did not arrive within {self.config.read_timeout_s} s",
                "timeout",
                {"Connection": "close"},
            ) from None
        return b"".join(chunks)

    async def _drain_small_body(self, request: Request) -> None:
        if getattr(request.state, "body_read", False):
            return
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) <= DRAIN_BODY_BYTES:
            with contextlib.suppress(ClientDisconnect, asyncio.TimeoutError):
                await asyncio.wait_for(request.body(), 1.0)

    async def _preprocess(self, data: bytes, what: str = "the image") -> np.ndarray:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.decode_pool, self.model.preprocess, data)
        except ImageError as exc:
            status = REASON_STATUS.get(exc.reason, 400)
            raise HTTPError(status, f"{what}: {exc}", exc.reason) from None

    async def _classify(
        self, images: list[bytes], *, features: bool = False
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """Admit, preprocess and run ``images``; ``[(input, logits, features)]`` in order."""
        n = len(images)
        try:
            self.admission.admit(n)
        except ValueError as exc:
            raise HTTPError(413, str(exc), "too_many_images") from None
        admitted = time.monotonic()
        try:
            names = ["the image"] if n == 1 else [f"input element {i}" for i in range(n)]
            # Every decode finishes (none outlives its admission), then the first error wins.
            decoded = await asyncio.gather(
                *(self._preprocess(data, name) for data, name in zip(images, names, strict=True)),
                return_exceptions=True,
            )
            for item in decoded:
                if isinstance(item, BaseException):
                    raise item
            arrays: list[np.ndarray] = list(decoded)  # type: ignore[arg-type]
            assert self.batcher is not None
            outs = await asyncio.gather(
                *(self.batcher.submit(a, features=features, admitted=admitted) for a in arrays)
            )
        finally:
            self.admission.release(n)
        return [(a, logits, feats) for a, (logits, feats) in zip(arrays, outs, strict=True)]

    async def _image_from_request(self, request: Request) -> bytes:
        content_type = request.headers.get("content-type", "application/octet-stream").lower()
        body = await self._read_body(request)
        if content_type.startswith(MULTIPART):
            return await self._multipart_image(request, body)
        if not content_type.startswith(RAW_TYPES):
            raise HTTPError(
                415,
                f"Content-Type {content_type!r} is not accepted: send the image file as the raw "
                "body (application/octet-stream or image/*) or as a multipart/form-data file",
                "content_type",
            )
        if not body:
            raise HTTPError(400, "the request body is empty: send an image file", "empty")
        return body

    async def _multipart_image(self, request: Request, body: bytes) -> bytes:
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(
                max_files=1, max_fields=8, max_part_size=self.config.max_body_bytes
            )
        except HTTPException as exc:  # the multipart parser's own 400s
            raise HTTPError(400, f"bad multipart body: {exc.detail}", "multipart") from None
        files = [v for v in form.values() if hasattr(v, "read")]
        if len(files) != 1:
            raise HTTPError(
                400, "multipart body must hold exactly one image file field", "multipart"
            )
        data = await files[0].read()
        await form.close()
        if not data:
            raise HTTPError(400, "the uploaded file is empty", "empty")
        return data

    # ------------------------------------------------------------------ endpoints

    async def live(self, request: Request) -> Response:
        if self.admission.state == "failed":
            return error_response(503, f"model failed to load: {self.load_error}", "failed")
        return JSONResponse({"live": True})

    def _not_ready(self) -> Response:
        state = self.admission.state
        message = {"loading": "the model is loading", "draining": "the server is shutting down"}
        return error_response(
            503,
            message.get(state, f"model failed to load: {self.load_error}"),
            state,
            {"Retry-After": "1"},
        )

    async def ready(self, request: Request) -> Response:
        if self.admission.state != "ready":
            return self._not_ready()
        return JSONResponse({"ready": True})

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse(
            {"name": "kaedama", "version": __version__, "extensions": ["binary_tensor_data"]}
        )

    async def model_metadata(self, request: Request) -> Response:
        self._check_model(request.path_params["name"], request.path_params.get("version"))
        if self.model.artifact is None:
            return self._not_ready()
        return JSONResponse(self.model.metadata())

    async def model_ready(self, request: Request) -> Response:
        self._check_model(request.path_params["name"], request.path_params.get("version"))
        if self.admission.state != "ready":
            return self._not_ready()
        return JSONResponse({"name": self.model.name, "ready": True})

    async def v1_model(self, request: Request) -> Response:
        self._check_model(request.path_params["name"])
        return JSONResponse(
            {"name": self.model.name, "ready": self.admission.state == "ready"},
            status_code=200 if self.admission.state == "ready" else 503,
        )

    async def infer(self, request: Request) -> Response:
        self._check_model(request.path_params["name"], request.path_params.get("version"))
        self.admission.check(1)
        body = await self._read_body(request)
        try:
            req = protocol.parse_request(body, request.headers.get(protocol.HEADER_LENGTH))
        except protocol.ProtocolError as exc:
            raise HTTPError(400, str(exc), "protocol") from None
        if not req.images:
            raise HTTPError(400, "the input holds no images", "protocol")
        if len(req.images) > self.config.max_images_per_request:
            raise HTTPError(
                413,
                f"{len(req.images)} images in one request; the limit is "
                f"{self.config.max_images_per_request}",
                "too_many_images",
            )
        results = await self._classify(req.images)
        probs = self.model.probabilities(np.stack([logits for _, logits, _ in results]))
        labels = [self.model.classes[i] for i in probs.argmax(axis=1)]
        body, headers = protocol.encode_response(
            req,
            model_name=self.model.name,
            model_version=self.model.version,
            probabilities=probs,
            labels=labels,
        )
        return Response(body, headers=headers)

    def _model_from_path(self, request: Request) -> None:
        name = request.path_params.get("name")
        if name is not None:
            self._check_model(name)

    async def predict(self, request: Request) -> Response:
        self._model_from_path(request)
        top_k = _query_number(request, "top_k", int, 0, 0, 1 << 30)
        threshold = _query_number(request, "threshold", float, 0.0, 0.0, 1.0)
        self.admission.check(1)
        data = await self._image_from_request(request)
        [(_, logits, _)] = await self._classify([data])
        probs = self.model.probabilities(logits[None])[0]
        return JSONResponse(
            {
                "model": self.model.name,
                "model_version": self.model.version,
                "predictions": ranked(self.model.classes, probs, top_k, threshold),
            }
        )

    async def explain(self, request: Request) -> Response:
        self._model_from_path(request)
        if self.model.artifact is not None and not self.model.has_cam:
            raise HTTPError(
                501,
                f"model {self.model.name!r} has no CAM output: its head is not global-average-"
                "pool + linear (e.g. a ViT), so this server cannot compute a heatmap for it",
                "no_cam",
            )
        fmt = request.query_params.get("format", "png")
        if fmt not in ("png", "json"):
            raise HTTPError(400, f"format must be png or json, got {fmt!r}", "bad_parameter")
        wanted = request.query_params.get("class")
        if wanted is not None and self.model.artifact and wanted not in self.model.classes:
            raise HTTPError(
                400,
                f"unknown class {wanted!r}; classes: {', '.join(self.model.classes)}",
                "bad_parameter",
            )
        self.admission.check(1)
        data = await self._image_from_request(request)
        [(array, logits, feats)] = await self._classify([data], features=True)
        probs = self.model.probabilities(logits[None])[0]
        index = self.model.classes.index(wanted) if wanted is not None else int(probs.argmax())
        loop = asyncio.get_running_loop()
        grid, png = await loop.run_in_executor(
            self.decode_pool, self.model.explain, array, feats, index
        )
        label = self.model.classes[index]
        if fmt == "json":
            return JSONResponse(
                {
                    "model": self.model.name,
                    "model_version": self.model.version,
                    "class": label,
                    "score": float(probs[index]),
                    "grid": np.round(grid, 4).tolist(),
                    "input_size": list(self.model.input_size[1:]),
                }
            )
        return Response(
            png,
            media_type="image/png",
            headers={
                "X-Kaedama-Class": urllib.parse.quote(label),
                "X-Kaedama-Score": f"{probs[index]:.6f}",
                "X-Kaedama-Model-Version": self.model.version,
            },
        )

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(
            generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )


def _observed(
    service: Service, endpoint: str, handler: Callable[[Request], Awaitable[Response]], public: bool
) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a handler with auth, error mapping and metrics."""

    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        started = time.perf_counter()
        try:
            if not public:
                service._check_auth(request)
            response = await handler(request)
        except HTTPError as exc:
            response = error_response(exc.status, exc.message, exc.reason, exc.headers)
        except Shed as exc:
            if exc.status == 429:
                await service._drain_small_body(request)
            response = error_response(exc.status, exc.message, exc.reason, exc.headers)
        except ClientDisconnect:
            response = error_response(499, "the client closed the connection", "disconnect")
        service.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        service.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    return wrapped


def _chain_drain_on_signals() -> None:
    """Mark every service draining on SIGTERM/SIGINT, then run uvicorn's own handler.

    uvicorn (single process or each worker) installs its handlers before the app
    starts; this wraps them so readiness turns 503 at the moment shutdown begins.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if getattr(previous, "_kaedama_drain", False):
            continue

        def handler(signum, frame, previous=previous):
            for service in list(_SERVICES):
                service.begin_drain()
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                raise SystemExit(128 + signum)

        handler._kaedama_drain = True  # type: ignore[attr-defined]
        signal.signal(sig, handler)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"no route {request.url.path}; see /v2 and /v2/models/NAME for the API"
        return error_response(404, message, "no_route")
    return error_response(exc.status_code, str(exc.detail), "http")


def create_app(model_dir: str, config: ServeConfig) -> Starlette:
    """The ASGI app serving the artifact in ``model_dir``."""
    service = Service(model_dir, config)

    def route(path: str, handler, methods: list[str], endpoint: str, public: bool = False):
        return Route(path, _observed(service, endpoint, handler, public), methods=methods)

    get, post = ["GET"], ["POST"]
    routes = [
        route("/v2/health/live", service.live, get, "live", public=True),
        route("/v2/health/ready", service.ready, get, "ready", public=True),
        route("/v2", service.server_metadata, get, "metadata"),
        route("/v2/models/{name}", service.model_metadata, get, "metadata"),
        route("/v2/models/{name}/ready", service.model_ready, get, "ready"),
        route("/v2/models/{name}/versions/{version}", service.model_metadata, get, "metadata"),
        route("/v2/models/{name}/versions/{version}/ready", service.model_ready, get, "ready"),
        route("/v2/models/{name}/infer", service.infer, post, "infer"),
        route("/v2/models/{name}/versions/{version}/infer", service.infer, post, "infer"),
        route("/v1/models/{name}", service.v1_model, get, "metadata"),
        route("/v1/models/{name}:predict", service.predict, post, "predict"),
        route("/v1/models/{name}:explain", service.explain, post, "explain"),
        route("/predict", service.predict, post, "predict"),
        route("/explain", service.explain, post, "explain"),
        route("/metrics", service.metrics_endpoint, get, "metrics"),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await service.startup()
        yield
        await service.shutdown()

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error},
    )
    app.state.service = service
    return app


def app_from_environment() -> Starlette:
    """The app for uvicorn worker processes: model folder and config from the environment."""
    import os

    from kaedama.config import build_config

    fields = json.loads(os.environ["KAEDAMA_SERVE_CONFIG"])
    return create_app(os.environ["KAEDAMA_SERVE_MODEL_DIR"], build_config(ServeConfig, **fields))
