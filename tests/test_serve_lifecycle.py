"""The service's lifecycle: ready only after load, auth, load failures, SIGTERM draining,
and no torch in the serving process."""

from __future__ import annotations

import io
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
from PIL import Image

from kaedama.client import Client, ClientConfig
from tests.plugins.serving import REPO, run_server


def test_ready_only_after_load_and_warm_up(serving_model, serving_images):
    # Many warm-up batches keep the model loading long enough to look at it.
    with run_server(
        serving_model, wait_ready=False, warmup_batches=40, max_batch_size=32
    ) as server:
        server.wait_live()
        ready = httpx.get(server.url + "/v2/health/ready")
        assert ready.status_code == 503 and "Retry-After" in ready.headers
        assert ready.json()["reason"] == "loading"
        r = httpx.post(server.url + "/predict", content=serving_images[0])
        assert r.status_code == 503 and r.headers["X-Kaedama-Shed-Reason"] == "loading"
        r = httpx.post(server.url + "/v2/models/tiny/infer", content=b"{}")
        assert r.status_code == 503
        server.wait_ready()
        assert httpx.get(server.url + "/v2/models/tiny/ready").status_code == 200
        assert httpx.post(server.url + "/predict", content=serving_images[0]).status_code == 200


def test_bearer_token_auth(serving_model, serving_images, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    with run_server(serving_model, auth_token_file=str(token_file)) as server:
        assert httpx.get(server.url + "/v2/health/ready").status_code == 200
        r = httpx.post(server.url + "/predict", content=serving_images[0])
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        assert "token" in r.json()["error"]
        wrong = {"Authorization": "Bearer s3cret-tokeX"}
        assert httpx.post(server.url + "/predict", content=b"x", headers=wrong).status_code == 401
        assert httpx.get(server.url + "/metrics").status_code == 401
        with Client(server.url, ClientConfig(token_file=str(token_file))) as client:
            assert client.predict(serving_images[0]).model == "tiny"


def test_altered_artifact_stops_the_server(serving_model, tmp_path):
    copy = tmp_path / "altered"
    shutil.copytree(serving_model, copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with run_server(copy, wait_ready=False) as server:
        assert server.proc.wait(timeout=60) == 1
        assert "sha256" in server.log() and "Re-export" in server.log()
    result = subprocess.run(
        [sys.executable, "-m", "kaedama", "serve", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 1 and "kaedama export" in result.stderr


def _big_png(seed: int) -> bytes:
    """A smooth 1200 px PNG: small to send, slow to decode (no reduced decode for PNG)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))
    buf = io.BytesIO()
    coarse.resize((1200, 1200), Image.Resampling.BICUBIC).save(buf, "PNG")
    return buf.getvalue()


def _queue_depth(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("kaedama_queue_depth"):
            return float(line.split()[-1])
    raise AssertionError("no kaedama_queue_depth in /metrics")


def test_sigterm_finishes_every_accepted_request(serving_model):
    n = 32
    images = [_big_png(i) for i in range(4)]
    with run_server(serving_model, max_batch_size=4, max_queue=64, decode_threads=1) as server:
        results: list[int | str] = [0] * n

        def call(i: int) -> None:
            try:
                r = httpx.post(server.url + "/predict", content=images[i % 4], timeout=120)
                results[i] = r.status_code
            except httpx.TransportError as exc:  # never reached the app: not accepted
                results[i] = type(exc).__name__

        threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        depth = 0.0
        while time.monotonic() < deadline and depth < 10:
            depth = _queue_depth(server.url)
        assert depth >= 10, "the server never got busy"
        server.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=120)
        code = server.proc.wait(timeout=60)
        log = server.log()
        admitted = int(log.split("draining: ")[1].split()[0])
        # Every image admitted when SIGTERM came was answered 200; later arrivals were
        # refused (503 + Retry-After, or no connection), never failed with a 5xx.
        assert results.count(200) >= admitted >= depth, (results, admitted)
        assert all(r == 200 or r == 503 or isinstance(r, str) for r in results), results
        assert code in (0, -signal.SIGTERM), log


def test_serving_process_imports_no_torch(serving_model):
    code = (
        "import sys, asyncio\n"
        "from kaedama.serve.app import create_app\n"
        "from kaedama.serve.config import ServeConfig\n"
        "import kaedama.client, kaedama.serve.server, kaedama.commands.serve\n"
        f"app = create_app({str(serving_model)!r}, ServeConfig(threads=1, warmup_batches=1))\n"
        "app.state.service.model.load()\n"
        "print(','.join(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"the serving process imported {result.stdout.strip()}"
