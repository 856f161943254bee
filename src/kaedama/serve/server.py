"""Run the prediction service on uvicorn, one process or several.

uvicorn listens before the model is loaded (liveness answers, readiness says 503
until load and warm-up end). On SIGTERM each process stops accepting, answers
every admitted request, then exits; ``drain_timeout_s`` bounds the wait.
"""

from __future__ import annotations

import json
import logging
import os

import uvicorn

from kaedama.config import config_to_dict
from kaedama.serve.app import create_app
from kaedama.serve.config import ServeConfig

log = logging.getLogger(__name__)


def uvicorn_config(model_dir: str, config: ServeConfig) -> uvicorn.Config:
    """The uvicorn settings that follow from ``config``."""
    common = dict(
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        access_log=config.access_log,
        timeout_keep_alive=int(config.keep_alive_s),
        timeout_graceful_shutdown=int(config.drain_timeout_s) or None,
        # The bounded queue, not uvicorn, decides what to refuse; this only caps
        # connections far above any sane queue so a flood cannot exhaust descriptors.
        limit_concurrency=max(1024, 8 * config.capacity),
        backlog=2048,
        lifespan="on",
    )
    if config.workers == 1:
        return uvicorn.Config(create_app(model_dir, config), **common)
    os.environ["KAEDAMA_SERVE_MODEL_DIR"] = model_dir
    os.environ["KAEDAMA_SERVE_CONFIG"] = json.dumps(config_to_dict(config))
    return uvicorn.Config(
        "kaedama.serve.app:app_from_environment", factory=True, workers=config.workers, **common
    )


def serve(model_dir: str, config: ServeConfig) -> int:
    """Serve until SIGTERM/SIGINT; returns 1 when the model failed to load, else 0."""
    uv = uvicorn_config(model_dir, config)
    if config.workers > 1:
        _multi(uv)
        return 0
    server = uvicorn.Server(uv)
    service = uv.app.state.service
    # A model that cannot load ends the process with status 1 (Kubernetes restarts it
    # and shows the log line) instead of serving 503 forever.
    service.on_fatal = lambda: setattr(server, "should_exit", True)
    server.run()
    return 1 if service.load_error else 0


def _multi(uv: uvicorn.Config) -> None:
    from uvicorn.supervisors import Multiprocess

    sock = uv.bind_socket()
    Multiprocess(uv, sockets=[sock]).run()
