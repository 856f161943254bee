"""Prediction-service fixtures: a small exported model and real server processes.

* ``serving_checkpoint`` (session): a random-init timm resnet18 with three classes
  (one unicode label) at 64 px, saved as a kaedama ``best.pt``.
* ``serving_model`` (session): that checkpoint exported to ONNX with CAM output.
* ``serving_images`` (session): a few generated JPEG/PNG photos of varied sizes;
  ``serving_expected`` their probabilities from torch in-process.
* ``start_server(model_dir, **config_fields)``: a context manager running
  ``python -m kaedama serve`` on a free loopback port; yields a :class:`ServerProcess`
  once it is ready (or at once with ``wait_ready=False``) and stops it after.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.processes import stop_process

CLASSES = ("ants", "bees", "三田本店")
IMG_SIZE = 64
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def photo(w: int, h: int, seed: int, fmt: str = "JPEG") -> bytes:
    """A smooth random colour picture, encoded."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_checkpoint(path: Path, model_name: str = "resnet18", img_size: int = IMG_SIZE) -> Path:
    """A random-init ``model_name`` checkpoint with :data:`CLASSES`."""
    import timm
    import torch

    from kaedama.train.checkpoint import save_checkpoint
    from kaedama.train.model import resolve_data_config

    torch.manual_seed(0)
    kwargs = {"img_size": img_size} if model_name.startswith("vit") else {}
    model = timm.create_model(model_name, num_classes=len(CLASSES), **kwargs).eval()
    with torch.no_grad():  # a sharper head, so images get clearly different top classes
        model.get_classifier().weight.mul_(30.0)
    save_checkpoint(
        str(path),
        {
            "model": model.state_dict(),
            "model_name": model_name,
            "classes": list(CLASSES),
            "data_config": resolve_data_config(model, img_size),
            "config": {},
        },
    )
    return path


@pytest.fixture(scope="session")
def serving_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet18 ``best.pt`` (random weights, 3 classes, 64 px)."""
    return make_checkpoint(tmp_path_factory.mktemp("serving") / "best.pt")


@pytest.fixture(scope="session")
def serving_model(serving_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``serving_checkpoint`` exported to ONNX (with CAM output) as model ``tiny``."""
    from kaedama.serve.config import ExportConfig
    from kaedama.serve.export import export_checkpoint

    out = tmp_path_factory.mktemp("serving") / "tiny"
    export_checkpoint(str(serving_checkpoint), str(out), ExportConfig(name="tiny", version="7"))
    return out


@pytest.fixture(scope="session")
def serving_images() -> list[bytes]:
    """Six photos: JPEG and PNG, landscape, portrait and small."""
    shapes = [(160, 120), (90, 200), (64, 64), (300, 180), (75, 100), (128, 96)]
    return [photo(w, h, i, "PNG" if i % 3 == 2 else "JPEG") for i, (w, h) in enumerate(shapes)]


@pytest.fixture(scope="session")
def serving_expected(serving_checkpoint: Path, serving_images: list[bytes]) -> np.ndarray:
    """All-class probabilities of ``serving_images`` from torch in this process.

    Preprocessed by the checkpoint's own :class:`~kaedama.preprocess.Preprocess`, the
    object the service uses, so training-side and serving-side inference must agree.
    """
    import torch

    from kaedama.preprocess import Preprocess
    from kaedama.train.model import load_trained

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    trained = load_trained(str(serving_checkpoint))
    pre = Preprocess.from_data_config(trained.data_config)
    with torch.inference_mode():
        logits = trained.model(torch.from_numpy(pre.batch(serving_images)))
    torch.set_num_threads(before)
    return torch.softmax(logits.double(), dim=1).numpy()


@dataclass
class ServerProcess:
    """A running ``kaedama serve`` subprocess."""

    proc: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        """What the server printed so far."""
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Poll readiness until 200; fail with the server's log otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + "/v2/health/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        pytest.fail(f"server not ready after {timeout} s:\n{self.log()}")

    def wait_live(self, timeout: float = 60.0) -> None:
        """Poll liveness until the port answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.TransportError):
                httpx.get(self.url + "/v2/health/live", timeout=2)
                return
            time.sleep(0.02)
        pytest.fail(f"server not listening after {timeout} s:\n{self.log()}")


def serve_command(model_dir: Path | str, port: int, **fields) -> list[str]:
    """``python -m kaedama serve MODEL_DIR --host 127.0.0.1 --port N --field value...``."""
    cmd = [sys.executable, "-m", "kaedama", "serve", str(model_dir)]
    fields = {"host": "127.0.0.1", "port": port, "threads": 1, "decode_threads": 2, **fields}
    for key, value in fields.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            cmd.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            cmd += [flag, str(value)]
    return cmd


@contextlib.contextmanager
def run_server(
    model_dir: Path | str, *, wait_ready: bool = True, **fields
) -> Iterator[ServerProcess]:
    """Run ``kaedama serve`` on a free loopback port for the block."""
    port = free_port()
    with tempfile.NamedTemporaryFile("wb", suffix=".log", delete=False) as log_file:
        log_path = Path(log_file.name)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            serve_command(model_dir, port, **fields),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        if wait_ready:
            server.wait_ready()
        yield server
    finally:
        stop_process(proc, timeout=30)
        log_path.unlink(missing_ok=True)


@pytest.fixture
def start_server():
    """``with start_server(model_dir, max_queue=4) as server: ...`` (see :func:`run_server`)."""
    return run_server
