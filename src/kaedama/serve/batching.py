"""Admission control, the drain-rate meter and the dynamic micro-batcher.

The service never queues without bound: at most ``capacity`` images (the running
batch plus ``max_queue``) are admitted at once. A request that does not fit is
answered 429 at once with a Retry-After computed from the server's own load: the
images ahead of it plus the callers already told to come back, times the measured
seconds per image. Each shed caller thus gets its own slot in a virtual queue, so
a burst of 300 callers comes back spread over the time the server needs for them,
instead of all at once after a fixed delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

# The shortest hint worth sending: below this a retry costs more than it saves.
MIN_RETRY_AFTER_S = 0.05


class Shed(Exception):
    """A request the service will not take now; answered with ``status`` and Retry-After."""

    def __init__(self, status: int, reason: str, retry_after_s: float, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.message = message

    @property
    def headers(self) -> dict[str, str]:
        """``Retry-After`` (whole seconds, as HTTP requires), its millisecond form and the reason."""
        return {
            "Retry-After": str(max(1, math.ceil(self.retry_after_s))),
            # The header Azure's APIs use for sub-second hints; kaedama's client reads it.
            "Retry-After-Ms": str(max(1, round(self.retry_after_s * 1000))),
            "X-Kaedama-Shed-Reason": self.reason,
        }


class DrainMeter:
    """Seconds per image when the service is saturated (an EWMA over saturated batches).

    A batch's service time runs from the later of the previous batch's end and its
    earliest image's admission to its own end: idle gaps between bursts do not
    count, decoding in parallel with inference does. Only batches run at
    saturation (full, or with images still waiting) count: a trickle of batches of
    one measures the arrival rate, not what the server can drain, and would make
    the hints longer, the trickle thinner, and the estimate worse still.
    """

    def __init__(self, seconds_per_image: float, *, alpha: float = 0.2) -> None:
        self.seconds_per_image = max(seconds_per_image, 1e-5)
        self.alpha = alpha
        self._last_done = 0.0
        self._promised = 0.0
        self._promised_at = time.monotonic()

    def observe(self, n: int, first_admitted: float, done: float, *, saturated: bool) -> None:
        """Record a batch of ``n`` images finished at ``done``."""
        start = max(self._last_done, first_admitted)
        self._last_done = done
        if saturated and n > 0 and done > start:
            sample = (done - start) / n
            self.seconds_per_image += self.alpha * (sample - self.seconds_per_image)

    @property
    def images_per_second(self) -> float:
        """The measured drain rate."""
        return 1.0 / self.seconds_per_image

    def retry_after(self, ahead: int, cap: float, headroom: int = 0) -> float:
        """The wait to promise a shed caller with ``ahead`` images admitted before it.

        Callers shed earlier hold the slots before this one; those slots free up at
        the drain rate. The caller is asked back when ``headroom`` images are still
        ahead of it rather than none: arriving into a half-full queue, callers fill
        whole batches, while a queue that runs dry between them would run batches of
        one at a fraction of the throughput.
        """
        now = time.monotonic()
        freed = (now - self._promised_at) / self.seconds_per_image
        self._promised = max(0.0, self._promised - freed)
        self._promised_at = now
        wait = (ahead + self._promised - headroom) * self.seconds_per_image
        self._promised += 1
        return min(cap, max(MIN_RETRY_AFTER_S, wait))


@dataclass
class Admission:
    """A counter of admitted images with a hard limit (all on the event loop's thread)."""

    capacity: int
    meter: DrainMeter
    max_retry_after_s: float
    on_shed: Callable[[str], None] = field(default=lambda reason: None)
    pending: int = 0
    state: str = "loading"  # loading -> ready -> draining

    def check(self, n: int = 1) -> None:
        """Raise :class:`Shed` unless ``n`` more images fit now (does not admit them)."""
        if self.state != "ready":
            self.on_shed(self.state)
            wait = 1.0 if self.state == "draining" else 2.0
            what = {
                "loading": "is loading its model",
                "draining": "is shutting down",
            }.get(self.state, "could not load its model")
            raise Shed(503, self.state, wait, f"the service {what}; retry after the hint")
        if n > self.capacity:
            raise ValueError(f"{n} images in one request; at most {self.capacity} fit the queue")
        if self.pending + n > self.capacity:
            self.on_shed("queue_full")
            wait = self.meter.retry_after(
                self.pending, self.max_retry_after_s, headroom=self.capacity // 2
            )
            raise Shed(
                429,
                "queue_full",
                wait,
                f"the queue is full ({self.pending} images admitted, capacity {self.capacity}); "
                f"retry after {wait:.2f} s",
            )

    def admit(self, n: int = 1) -> None:
        """Admit ``n`` images or raise :class:`Shed` (or ValueError for a request too large)."""
        self.check(n)
        self.pending += n

    def release(self, n: int = 1) -> None:
        """``n`` admitted images are answered."""
        self.pending -= n


@dataclass
class _Item:
    array: np.ndarray
    features: bool
    admitted: float
    future: asyncio.Future


BatchRunner = Callable[[np.ndarray, bool], tuple[np.ndarray, np.ndarray | None]]


class MicroBatcher:
    """Groups concurrent images into batches of at most ``max_batch_size``.

    A batch runs as soon as it is full, or ``max_wait_s`` after its first image
    arrived. One inference thread runs the batches (ONNX Runtime spreads each over
    its intra-op threads), so the next batch forms while the current one runs.
    """

    def __init__(
        self,
        run: BatchRunner,
        *,
        max_batch_size: int,
        max_wait_s: float,
        meter: DrainMeter,
        on_batch: Callable[[int, float], None] = lambda n, seconds: None,
    ) -> None:
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.meter = meter
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="kaedama-infer")
        self._task: asyncio.Task | None = None

    @property
    def queued(self) -> int:
        """Images waiting for a batch."""
        return self._queue.qsize()

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="kaedama-batcher")

    async def stop(self) -> None:
        """Finish every queued image, then stop."""
        while self._queue.qsize():
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    async def submit(
        self, array: np.ndarray, *, features: bool = False, admitted: float | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """One image's ``(logits, features or None)``, computed in some batch."""
        future = asyncio.get_running_loop().create_future()
        item = _Item(array, features, time.monotonic() if admitted is None else admitted, future)
        self._queue.put_nowait(item)
        return await future

    async def _collect(self) -> list[_Item]:
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            saturated = len(batch) == self.max_batch_size or self._queue.qsize() > 0
            x = np.stack([item.array for item in batch])
            want_features = any(item.features for item in batch)
            started = time.perf_counter()
            try:
                logits, feats = await loop.run_in_executor(
                    self._executor, self._run, x, want_features
                )
            except Exception as exc:  # noqa: BLE001 - the runtime's failure goes to each caller
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            done = time.monotonic()
            first = min(item.admitted for item in batch)
            self.meter.observe(len(batch), first, done, saturated=saturated)
            self._on_batch(len(batch), time.perf_counter() - started)
            for i, item in enumerate(batch):
                if not item.future.done():  # the caller may have gone away
                    item.future.set_result(
                        (logits[i], feats[i] if feats is not None and item.features else None)
                    )
