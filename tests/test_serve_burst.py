"""The burst: 300 concurrent requests against a small server (batch 8, queue 16).

Single-attempt callers see 429 with Retry-After (the shedding is real); the retrying
client gets every one of the 300 classified, equal to in-process inference.
"""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from kaedama.client import AsyncClient, ClientConfig, Prediction
from tests.plugins.serving import CLASSES, run_server

BURST = 300


@pytest.fixture(scope="module")
def small_server(serving_model):
    with run_server(serving_model, max_batch_size=8, max_queue=16, max_batch_wait_ms=2) as proc:
        yield proc


async def _single_attempts(url: str, images: list[bytes]) -> list[tuple]:
    """One POST per image, all at once: ``(status, headers, JSON body)`` each."""
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=BURST)) as http:

        async def one(data: bytes):
            async with http.post(url + "/predict", data=data) as r:
                return r.status, r.headers.copy(), await r.json()

        return await asyncio.gather(*(one(b) for b in images))


def test_single_attempts_are_shed_with_retry_after(small_server, serving_images):
    images = [serving_images[i % len(serving_images)] for i in range(BURST)]
    responses = asyncio.run(_single_attempts(small_server.url, images))
    codes = [status for status, _, _ in responses]
    assert set(codes) <= {200, 429}, sorted(set(codes))
    shed = [(headers, body) for status, headers, body in responses if status == 429]
    assert len(shed) > BURST // 3, f"only {len(shed)} of {BURST} shed by a queue of 16"
    assert codes.count(200) >= 24  # at least one batch plus the queue got through
    hints = []
    for headers, body in shed:
        assert headers["X-Kaedama-Shed-Reason"] == "queue_full"
        assert int(headers["Retry-After"]) >= 1
        hints.append(int(headers["Retry-After-Ms"]))
        assert body["reason"] == "queue_full" and "retry after" in body["error"]
    # Retry-After follows the load: callers shed later are told to wait longer.
    assert max(hints) > 2 * min(hints)
    metrics = httpx.get(small_server.url + "/metrics").text
    assert 'kaedama_shed_total{reason="queue_full"}' in metrics


def test_retrying_client_gets_all_300(small_server, serving_images, serving_expected):
    order = [i % len(serving_images) for i in range(BURST)]
    config = ClientConfig(concurrency=BURST, deadline_s=120)

    async def burst():
        async with AsyncClient(small_server.url, config) as client:
            return await client.predict_many([serving_images[i] for i in order])

    results = asyncio.run(burst())
    failures = [r for r in results if not isinstance(r, Prediction)]
    assert not failures, failures[:3]
    for result, i in zip(results, order, strict=True):
        probs = {p["label"]: p["score"] for p in result.predictions}
        np.testing.assert_allclose([probs[c] for c in CLASSES], serving_expected[i], atol=1e-5)
    assert max(r.attempts for r in results) > 1  # the server did shed; the client rode it out
