"""GCS emulator fixtures: a real GCS JSON API on loopback for google-cloud-storage and Beam.

``gcs_emulator`` (session) runs ``gcp-storage-emulator`` in a subprocess on 127.0.0.1
with a free port and in-memory storage, waits until it answers, points
``STORAGE_EMULATOR_HOST`` at it for the session (restored afterwards) and stops it at
the end. ``gcs_bucket`` gives each test a fresh, empty bucket as ``"gs://<name>"`` and
empties and deletes it afterwards.

The subprocess is this module run from the repo root (``python -m tests.plugins.gcs --port N``):
the in-memory emulator re-serialises ALL its metadata to JSON after every write, which
makes N uploads cost O(N^2) (2,000 uploads: ~60 s instead of ~4 s). That snapshot is
only ever read back when a disk-backed emulator restarts, so the script turns it off
for the in-memory server; requests and responses are the emulator's own.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.processes import stop_process

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
_PROJECT = "kaedama-test"
_START_TIMEOUT_S = 30.0
_START_TRIES = 3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/", timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _start_emulator() -> tuple[subprocess.Popen, str, Path]:
    """Start the emulator subprocess on a free port; retry if the port was taken meanwhile."""
    repo = Path(__file__).resolve().parents[2]
    failures = []
    for _ in range(_START_TRIES):
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log = Path(tempfile.mkstemp(prefix="gcs-emulator-", suffix=".log")[1])
        with open(log, "wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.plugins.gcs", "--port", str(port)],
                cwd=repo,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            if _answers(url):
                return proc, url, log
            time.sleep(0.05)
        stop_process(proc)
        failures.append(f"port {port}: {log.read_text(errors='replace')[-2000:]}")
        log.unlink(missing_ok=True)
    raise RuntimeError("gcp-storage-emulator did not start:\n" + "\n".join(failures))


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[str]:
    """A running in-memory GCS emulator; ``STORAGE_EMULATOR_HOST`` points at it.

    Yields the emulator's base URL, e.g. ``http://127.0.0.1:40123``.
    """
    proc, url, log = _start_emulator()
    previous = os.environ.get(EMULATOR_ENV)
    os.environ[EMULATOR_ENV] = url
    try:
        yield url
    finally:
        if previous is None:
            os.environ.pop(EMULATOR_ENV, None)
        else:
            os.environ[EMULATOR_ENV] = previous
        stop_process(proc)
        log.unlink(missing_ok=True)


def emulator_client():
    """A google-cloud-storage client for the emulator in ``STORAGE_EMULATOR_HOST``."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(
        project=_PROJECT,
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": os.environ[EMULATOR_ENV]},
    )


def upload_many(bucket_uri: str, objects: dict[str, bytes], *, threads: int = 8) -> None:
    """Upload ``{object name: data}`` into ``gs://bucket`` concurrently (test set-up)."""
    client = emulator_client()
    bucket = client.bucket(bucket_uri.removeprefix("gs://"))

    def put(item: tuple[str, bytes]) -> None:
        bucket.blob(item[0]).upload_from_string(item[1])

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, objects.items()))


def _empty_and_delete(client, name: str) -> None:
    bucket = client.bucket(name)
    blobs = list(client.list_blobs(name))
    # The JSON batch API takes at most 100 calls per request.
    for start in range(0, len(blobs), 100):
        with client.batch():
            for blob in blobs[start : start + 100]:
                blob.delete()
    bucket.delete()


@pytest.fixture
def gcs_bucket(gcs_emulator: str) -> Iterator[str]:
    """A fresh empty bucket in the emulator, as ``"gs://<name>"``; deleted after the test."""
    from google.api_core.exceptions import NotFound

    client = emulator_client()
    name = f"kaedama-test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(name)
    yield f"gs://{name}"
    with contextlib.suppress(NotFound):  # a test may have deleted the bucket itself
        _empty_and_delete(client, name)


def _serve(port: int) -> None:
    """Run the in-memory emulator on 127.0.0.1:port until terminated."""
    import signal

    from gcp_storage_emulator.server import create_server
    from gcp_storage_emulator.storage import Storage

    # See the module docstring: skip the O(all objects) JSON snapshot on every write.
    Storage._write_config_to_file = lambda self: None
    logging.basicConfig(level=logging.CRITICAL)
    server = create_server("127.0.0.1", port, in_memory=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    parent = os.getppid()
    server.start()
    try:
        # Also stop when the test run dies without tearing down (killed, crashed):
        # the emulator is then re-parented and must not linger.
        while os.getppid() == parent:
            time.sleep(0.5)
    finally:
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="in-memory GCS emulator for the test suite")
    parser.add_argument("--port", type=int, required=True)
    _serve(parser.parse_args().port)
