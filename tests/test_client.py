"""The client's retry behaviour against a real scripted HTTP server on loopback.

The server (Starlette on uvicorn in a thread) answers each key's requests from a
plan: a list of ``(status, headers)``, the last one repeating. A 200 names the
request body's length as its label, so results can be matched to inputs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from kaedama.client import (
    AsyncClient,
    Client,
    ClientConfig,
    PredictError,
    Prediction,
    RetryBudget,
    _Attempts,
    retry_after_seconds,
)
from tests.plugins.serving import free_port

FAST = {"backoff_base_s": 0.01, "backoff_cap_s": 0.05, "deadline_s": 20.0}


class Script:
    """Plans per key and the arrival times of each key's requests."""

    def __init__(self) -> None:
        self.plans: dict[str, list[tuple[int, dict]]] = {}
        self.hits: dict[str, list[float]] = defaultdict(list)

    async def handle(self, request: Request) -> JSONResponse:
        key = request.path_params["key"]
        body = await request.body()
        hits = self.hits[key]
        hits.append(time.monotonic())
        plan = self.plans.get(key, [(200, {})])
        status, headers = plan[min(len(hits) - 1, len(plan) - 1)]
        if status == 200:
            payload = {
                "model": "m",
                "model_version": "1",
                "predictions": [{"label": str(len(body)), "score": 1.0}],
            }
        else:
            payload = {"error": f"scripted {status}", "reason": "scripted"}
        return JSONResponse(payload, status_code=status, headers=headers)


@pytest.fixture(scope="module")
def scripted():
    script = Script()
    app = Starlette(routes=[Route("/s/{key}/predict", script.handle, methods=["POST"])])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    yield script, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def _url(base: str, key: str) -> str:
    return f"{base}/s/{key}/predict"


def test_retries_503_and_429_and_honours_retry_after(scripted):
    script, base = scripted
    script.plans["a"] = [(503, {}), (429, {"Retry-After-Ms": "300"}), (200, {})]
    with Client(_url(base, "a"), ClientConfig(**FAST)) as client:
        result = client.predict(b"12345")
    assert isinstance(result, Prediction) and result.label == "5" and result.attempts == 3
    gaps = [b - a for a, b in zip(script.hits["a"], script.hits["a"][1:], strict=False)]
    assert gaps[0] < 0.2  # backoff ceiling 0.01 s after the first 503
    assert 0.3 <= gaps[1] < 0.3 * 1.1 + 0.2  # the server's hint, plus at most 10 % jitter


def test_retry_after_seconds_and_http_dates():
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "1"}) == 0.25
    assert retry_after_seconds({"retry-after": "garbage"}) is None
    from email.utils import formatdate

    when = retry_after_seconds({"retry-after": formatdate(time.time() + 30, usegmt=True)})
    assert 25 < when <= 31


@pytest.mark.parametrize("status", [400, 404, 413, 415, 500, 501])
def test_client_errors_and_500_are_not_retried(scripted, status):
    script, base = scripted
    key = f"no-retry-{status}"
    script.plans[key] = [(status, {}), (200, {})]
    with (
        Client(_url(base, key), ClientConfig(**FAST)) as client,
        pytest.raises(PredictError) as info,
    ):
        client.predict(b"x")
    assert info.value.status == status and info.value.attempts == 1
    assert f"scripted {status}" in str(info.value)
    assert len(script.hits[key]) == 1


def test_retry_after_is_capped(scripted):
    script, base = scripted
    script.plans["cap"] = [(503, {"Retry-After": "3600"}), (200, {})]
    with Client(_url(base, "cap"), ClientConfig(max_retry_after_s=0.2, **FAST)) as client:
        started = time.monotonic()
        assert client.predict(b"x").attempts == 2
    assert time.monotonic() - started < 2


def test_connection_errors_back_off_until_max_attempts():
    url = f"http://127.0.0.1:{free_port()}/predict"  # nothing listens there
    config = ClientConfig(max_attempts=4, backoff_base_s=0.02, backoff_cap_s=0.1, deadline_s=20)
    with Client(url, config) as client, pytest.raises(PredictError) as info:
        client.predict(b"x")
    assert info.value.attempts == 4 and "gave up after 4 attempts" in str(info.value)
    assert "ConnectError" in str(info.value)


def test_deadline_bounds_all_attempts(scripted):
    script, base = scripted
    script.plans["slow"] = [(503, {"Retry-After-Ms": "400"})]
    with Client(_url(base, "slow"), ClientConfig(deadline_s=1.0)) as client:
        started = time.monotonic()
        with pytest.raises(PredictError) as info:
            client.predict(b"x")
    assert time.monotonic() - started < 1.5
    assert "deadline" in str(info.value) and info.value.status == 503


def test_retry_budget_stops_retry_storms(scripted):
    script, base = scripted
    script.plans["down"] = [(502, {})]
    config = ClientConfig(retry_budget=10, retry_cost=5, max_attempts=10, **FAST)
    with Client(_url(base, "down"), config) as client:
        with pytest.raises(PredictError) as first:
            client.predict(b"x")
        assert first.value.attempts == 3 and "budget" in str(first.value)  # 2 retries x 5
        with pytest.raises(PredictError) as second:
            client.predict(b"x")
        assert second.value.attempts == 1  # the bucket is empty: no retry at all
    assert len(script.hits["down"]) == 4


def test_budget_refills_on_success():
    budget = RetryBudget(10)
    assert budget.acquire(5) and budget.acquire(5) and not budget.acquire(1)
    budget.succeeded(5)  # a success after a retry returns its cost
    budget.succeeded(0)  # a first-try success adds one token
    assert budget.tokens == 6
    assert RetryBudget(0).acquire(10**6)  # 0 = no budget


def test_backoff_is_full_jitter_under_a_growing_capped_ceiling():
    config = ClientConfig(backoff_base_s=0.1, backoff_multiplier=2.0, backoff_cap_s=0.5)
    attempts = _Attempts(config, RetryBudget(0), "x")
    for attempt, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (9, 0.5)]:
        attempts.attempt = attempt
        draws = [attempts._backoff() for _ in range(400)]
        assert min(draws) >= 0 and max(draws) <= ceiling
        assert max(draws) > 0.8 * ceiling and min(draws) < 0.2 * ceiling  # the whole range


def test_predict_many_keeps_order_and_per_file_errors(scripted, tmp_path):
    script, base = scripted
    script.plans["many"] = [(429, {"Retry-After-Ms": "20"}), (200, {})]
    files = []
    for i in range(6):
        path = tmp_path / f"{i}.bin"
        path.write_bytes(b"x" * (i + 1))
        files.append(str(path))
    files.insert(3, str(tmp_path / "missing.jpg"))
    with Client(_url(base, "many"), ClientConfig(concurrency=3, **FAST)) as client:
        results = client.predict_many(files, progress=True)
    assert isinstance(results[3], PredictError) and "missing.jpg" in str(results[3])
    labels = [r.label for r in results if isinstance(r, Prediction)]
    assert labels == ["1", "2", "3", "4", "5", "6"]


def test_async_client_predict_many(scripted):
    script, base = scripted
    script.plans["async"] = [(503, {}), (200, {})]
    script.plans["async-bad"] = [(400, {})]

    async def run():
        async with AsyncClient(_url(base, "async"), ClientConfig(concurrency=4, **FAST)) as c:
            many = await c.predict_many([b"a" * n for n in range(1, 9)])
        async with AsyncClient(_url(base, "async-bad"), ClientConfig(**FAST)) as c:
            bad = await c.predict_many([b"x"])
        return many, bad

    many, bad = asyncio.run(run())
    assert [r.label for r in many] == [str(n) for n in range(1, 9)]
    assert isinstance(bad[0], PredictError) and bad[0].status == 400
