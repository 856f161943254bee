"""The service's Prometheus metrics, on a registry of its own (one per app, so tests can
run several apps in one process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Requests by endpoint and code, latency, batch sizes, queue depth, shed count."""

    def __init__(self, queue_depth: Callable[[], float], drain_rate: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "kaedama_requests", "HTTP requests by endpoint and status code",
            ["endpoint", "code"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "kaedama_request_duration_seconds", "request latency, arrival to response",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "kaedama_batch_size", "images per inference batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "kaedama_batch_duration_seconds", "inference time per batch",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.shed = Counter(
            "kaedama_shed", "requests refused with 429/503 and Retry-After, by reason",
            ["reason"], registry=r,
        )  # fmt: skip
        self.images = Counter("kaedama_images", "images classified", registry=r)
        depth = Gauge("kaedama_queue_depth", "images admitted and not yet answered", registry=r)
        depth.set_function(queue_depth)
        rate = Gauge(
            "kaedama_drain_rate_images_per_second",
            "measured images per second while busy (drives Retry-After)",
            registry=r,
        )
        rate.set_function(drain_rate)
        self.ready = Gauge("kaedama_model_ready", "1 once the model is loaded and warm", registry=r)

    def observe_batch(self, n: int, seconds: float) -> None:
        """One inference batch of ``n`` images took ``seconds``."""
        self.batch_size.observe(n)
        self.batch_seconds.observe(seconds)
        self.images.inc(n)
