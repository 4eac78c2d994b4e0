"""Adaptive batching of one model inside the process that receives the requests.

A :class:`Batcher` owns one model thread. Requests queue their preprocessed images on the
event loop; whenever the model thread is free it takes everything queued (up to
``max_batch_size`` images) as one model call. An idle model therefore answers a lone
request at once (batch 1, no waiting), and a busy one gathers what arrived while it
computed -- the batch grows with the load, which is the whole of adaptive batching once
the model is the bottleneck. A request that has waited longer than ``max_latency_ms`` by
the time its batch starts is refused with :class:`Overloaded` (HTTP 503 / gRPC
``UNAVAILABLE``) instead of growing the queue without end: load shedding.

Every request of a process -- HTTP and gRPC alike -- goes through the same batcher, and
nothing crosses a process boundary: the images stay NumPy arrays from decoding to the
model (no pickling, no JSON of float arrays). A model may answer one array of rows or, a
multi-task model, a dict of such arrays (:data:`ModelOutput`); each request gets its own
rows of every array (:func:`output_rows`, :func:`output_slice`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias

import numpy as np

from breastscan.serving.answer import ApiError

log = logging.getLogger(__name__)

ModelOutput: TypeAlias = np.ndarray | Mapping[str, np.ndarray]
"""What one model call answers for ``n`` images: ``(n, ...)`` rows, or (a multi-task model)
such arrays by name, e.g. ``{"probabilities": (n, k), "mask": (n, H, W, 1)}``."""

OVERLOADED_MESSAGE = "the model service is at capacity: retry shortly"
"""What a client is told when its request is shed (HTTP 503, gRPC UNAVAILABLE)."""


class Overloaded(ApiError):
    """A request was refused because it waited longer than the model's latency bound.

    A temporary condition a client may retry, not a server fault: code ``overloaded``
    (HTTP 503 with ``Retry-After``, gRPC ``UNAVAILABLE``; :data:`breastscan.serving.answer.ERRORS`).
    """

    def __init__(self, message: str = OVERLOADED_MESSAGE) -> None:
        super().__init__("overloaded", message)


def output_rows(out: ModelOutput) -> int:
    """How many images a model output answers (its rows).

    Raises:
        ValueError: the arrays of a dict output disagree on their row count (or there are none).
    """
    if not isinstance(out, Mapping):
        return len(out)
    counts = {len(value) for value in out.values()}
    if len(counts) != 1:
        raise ValueError(f"the model's outputs {sorted(out)} have different row counts {sorted(counts)}")
    return counts.pop()


def output_slice(out: ModelOutput, start: int, stop: int) -> ModelOutput:
    """Rows ``start:stop`` of a model output (of every array of a dict output)."""
    if isinstance(out, Mapping):
        return {name: value[start:stop] for name, value in out.items()}
    return out[start:stop]


@dataclass
class _Waiting:
    images: np.ndarray
    future: asyncio.Future[ModelOutput]
    deadline: float


@dataclass
class BatchStats:
    """What a batcher has done since it started (for logs, tests and benchmarks).

    Attributes:
        calls: model calls made.
        images: images run through the model.
        shed: requests refused as :class:`Overloaded`.
        largest: largest batch so far.
        sizes: model calls by batch size.
    """

    calls: int = 0
    images: int = 0
    shed: int = 0
    largest: int = 0
    sizes: dict[int, int] = field(default_factory=dict)

    def record(self, n: int) -> None:
        """Count one model call of ``n`` images."""
        self.calls += 1
        self.images += n
        self.largest = max(self.largest, n)
        self.sizes[n] = self.sizes.get(n, 0) + 1


class Batcher:
    """Merges concurrent requests for one model into batched model calls.

    Args:
        run: the model call, ``(n, *input_shape) float32 ->`` a :data:`ModelOutput` of ``n``
            rows, row ``i`` answering image ``i``; it runs in this batcher's own thread (TensorFlow
            releases the GIL, so the event loop keeps serving meanwhile).
        name: the model's name (thread name, logs).
        max_batch_size: most images per model call (1: no batching, one request per call).
        max_latency_ms: longest a request may wait in the queue before it is shed.
        on_batch: called on the event loop with the size of every model call (metrics).
    """

    def __init__(self, run: Callable[[np.ndarray], ModelOutput], *, name: str, max_batch_size: int,
                 max_latency_ms: float, on_batch: Callable[[int], None] | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_latency_ms <= 0:
            raise ValueError(f"max_latency_ms must be positive, got {max_latency_ms}")
        self.name = name
        self.max_batch_size = int(max_batch_size)
        self.max_latency_s = float(max_latency_ms) / 1000.0
        self.stats = BatchStats()
        self._run = run
        self._on_batch = on_batch
        self._queue: deque[_Waiting] = deque()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"model-{name}")
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    async def submit(self, images: np.ndarray) -> ModelOutput:
        """The model's outputs for one request's images, run in a batch with others.

        Args:
            images: ``(k, *input_shape)`` float32, ``k >= 1`` (kept together in one call).

        Returns:
            The ``k`` rows of the model's output for these images (of each array of a dict).

        Raises:
            Overloaded: the request waited longer than ``max_latency_ms``.
            Exception: whatever the model call raised (every request of that batch gets it).
        """
        loop = asyncio.get_running_loop()
        self._start(loop)
        waiting = _Waiting(images, loop.create_future(), time.monotonic() + self.max_latency_s)
        self._queue.append(waiting)
        assert self._wakeup is not None
        self._wakeup.set()
        return await waiting.future

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._serve(), name=f"batcher-{self.name}")

    async def _serve(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch = self._take()
                if batch:
                    await self._call(loop, batch)

    def _take(self) -> list[_Waiting]:
        """The next batch: queued requests in order, up to ``max_batch_size`` images.

        A request larger than ``max_batch_size`` goes alone; one that has waited past its
        deadline (or whose client went away) is answered :class:`Overloaded` (or dropped).
        """
        now, size = time.monotonic(), 0
        taken: list[_Waiting] = []
        while self._queue:
            head = self._queue[0]
            if head.future.done():  # cancelled: the client went away
                self._queue.popleft()
                continue
            if now > head.deadline:
                self._queue.popleft()
                self.stats.shed += 1
                head.future.set_exception(Overloaded())
                continue
            if taken and size + len(head.images) > self.max_batch_size:
                break
            taken.append(self._queue.popleft())
            size += len(head.images)
        return taken

    async def _call(self, loop: asyncio.AbstractEventLoop, batch: list[_Waiting]) -> None:
        """One model call for ``batch``; every request of it gets its rows or the error."""
        try:
            images = batch[0].images if len(batch) == 1 else np.concatenate([w.images for w in batch])
            n = len(images)
            self.stats.record(n)
            if self._on_batch is not None:
                self._on_batch(n)
            out = await loop.run_in_executor(self._executor, self._run, images)
            if output_rows(out) != n:
                raise RuntimeError(f"model {self.name} answered {output_rows(out)} rows for {n} images")
        except asyncio.CancelledError:  # close() while the call was in flight
            _fail(batch, Overloaded("the service is shutting down: retry shortly"))
            raise
        except Exception as exc:  # noqa: BLE001 -- every request of the batch gets the error
            log.exception("model %s failed on a batch of %d requests", self.name, len(batch))
            _fail(batch, exc)
            return
        start = 0
        for w in batch:
            k = len(w.images)
            if not w.future.done():
                w.future.set_result(output_slice(out, start, start + k))
            start += k

    def close(self) -> None:
        """Stop the model thread after the call in flight (queued requests are not run)."""
        if self._task is not None:
            self._task.cancel()
        _fail(list(self._queue), Overloaded("the service is shutting down: retry shortly"))
        self._queue.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)


    async def wait_closed(self) -> None:
        """After :meth:`close`: wait until the model task and the model thread have ended (then
        nothing of this batcher runs or refers to the model)."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.to_thread(self._executor.shutdown, wait=True)


def _fail(batch: list[_Waiting], exc: BaseException) -> None:
    for w in batch:
        if not w.future.done():
            w.future.set_exception(exc)


class BatchSettings(Protocol):
    """How one model is batched (:class:`breastscan.serving.config.Batching` is one)."""

    @property
    def enabled(self) -> bool: ...
    @property
    def max_batch_size(self) -> int: ...
    @property
    def max_latency_ms(self) -> int: ...


def model_batchers(models: Mapping[str, Callable[[np.ndarray], ModelOutput]],
                   settings: Callable[[str], BatchSettings],
                   on_batch: Callable[[str, int], None] | None = None) -> dict[str, Batcher]:
    """One :class:`Batcher` per model; batching turned off means one request per model call.

    Args:
        models: each model's call (e.g. ``ModelBundle.predict``) by name.
        settings: the batching of a model, by name.
        on_batch: called with ``(model name, batch size)`` for every model call.
    """
    return {name: model_batcher(name, run, settings(name), on_batch) for name, run in models.items()}


def model_batcher(name: str, run: Callable[[np.ndarray], ModelOutput], settings: BatchSettings,
                  on_batch: Callable[[str, int], None] | None = None) -> Batcher:
    """The :class:`Batcher` of one model; batching turned off means one request per model call.

    Args:
        name: the model's name.
        run: its call (e.g. ``ModelBundle.predict``).
        settings: its batching.
        on_batch: called with ``(name, batch size)`` for every model call.
    """
    hook = None if on_batch is None else functools.partial(on_batch, name)
    return Batcher(run, name=name, max_batch_size=settings.max_batch_size if settings.enabled else 1,
                   max_latency_ms=settings.max_latency_ms, on_batch=hook)
