"""Adaptive batching (breastscan.serving.batching): merging, limits, shedding, errors, engine.

The model calls are fake (``time.sleep`` makes them slow) except in the last test, which
runs a tiny Keras classifier through :func:`breastscan.serving.engine.local_engine` with and
without batching and compares the answers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pytest

from breastscan.serving.batching import (
    OVERLOADED_MESSAGE,
    Batcher,
    BatchStats,
    Overloaded,
    model_batchers,
)


@dataclass(frozen=True)
class S:
    """Batching settings (the shape of breastscan.serving.config.Batching)."""

    enabled: bool = True
    max_batch_size: int = 32
    max_latency_ms: int = 5000


class SlowModel:
    """A fake model: sleeps ``delay`` s per call, answers ``x * 2`` and records each call's size."""

    def __init__(self, delay: float = 0.05, fail: Callable[[np.ndarray], bool] | None = None,
                 rows: Callable[[int], int] | None = None) -> None:
        self.delay = delay
        self.fail = fail
        self.rows = rows
        self.calls: list[int] = []
        self.seen: list[np.ndarray] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls.append(len(x))
        self.seen.append(np.array(x, copy=True))
        time.sleep(self.delay)
        if self.fail is not None and self.fail(x):
            raise RuntimeError("model exploded")
        out = x * 2
        if self.rows is not None:
            out = out[: self.rows(len(x))]
        return out


def _req(i: float, k: int = 1) -> np.ndarray:
    """A request of ``k`` images whose every value is ``i`` (so its rows are recognisable)."""
    return np.full((k, 2), i, dtype=np.float32)


def _batcher(model: SlowModel, *, max_batch_size: int = 32, max_latency_ms: float = 5000,
             on_batch: Callable[[int], None] | None = None) -> Batcher:
    return Batcher(model, name="fake", max_batch_size=max_batch_size, max_latency_ms=max_latency_ms,
                   on_batch=on_batch)


async def _staggered(batcher: Batcher, values: list[float], gap: float) -> list[np.ndarray]:
    """Submit one request per value, ``gap`` s apart, and gather the answers."""
    tasks = []
    for v in values:
        tasks.append(asyncio.create_task(batcher.submit(_req(v))))
        await asyncio.sleep(gap)
    return list(await asyncio.gather(*tasks))


# --------------------------------------------------------------------------- construction


def test_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        _batcher(SlowModel(), max_batch_size=0)
    with pytest.raises(ValueError, match="max_latency_ms"):
        _batcher(SlowModel(), max_latency_ms=0)


def test_overloaded_carries_code_and_message() -> None:
    err = Overloaded()
    assert err.code == "overloaded"
    assert err.message == OVERLOADED_MESSAGE == str(err)


def test_batch_stats_record() -> None:
    stats = BatchStats()
    for n in (1, 4, 4, 2):
        stats.record(n)
    assert (stats.calls, stats.images, stats.largest, stats.shed) == (4, 11, 4, 0)
    assert stats.sizes == {1: 1, 4: 2, 2: 1}


# --------------------------------------------------------------------------- batching


def test_lone_request_runs_at_once_as_batch_of_one() -> None:
    model = SlowModel(delay=0.05)
    batcher = _batcher(model, max_latency_ms=10_000)

    async def main() -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        out = await batcher.submit(_req(3.0))
        return out, time.perf_counter() - t0

    try:
        out, elapsed = asyncio.run(main())
    finally:
        batcher.close()
    np.testing.assert_array_equal(out, _req(6.0))
    assert model.calls == [1]
    assert elapsed < 0.5  # no waiting for company: about the run time (0.05 s)
    assert (batcher.stats.calls, batcher.stats.images, batcher.stats.largest) == (1, 1, 1)
    assert batcher.stats.sizes == {1: 1}


def test_concurrent_requests_merge_and_get_their_own_rows() -> None:
    model = SlowModel(delay=0.05)
    batcher = _batcher(model, max_batch_size=32)
    values = [float(i) for i in range(12)]

    async def main() -> list[np.ndarray]:
        first = asyncio.create_task(batcher.submit(_req(values[0])))
        await asyncio.sleep(0.01)  # the model is now busy with the first request alone
        rest = await _staggered(batcher, values[1:], gap=0.008)
        return [await first, *rest]

    try:
        outs = asyncio.run(main())
    finally:
        batcher.close()
    assert model.calls[0] == 1
    assert max(model.calls[1:]) > 1
    assert sum(model.calls) == 12
    assert len(model.calls) < 12
    for v, out in zip(values, outs, strict=True):
        assert out.shape == (1, 2)
        np.testing.assert_array_equal(out, _req(2 * v))
    # every image went through exactly once, in submission order
    np.testing.assert_array_equal(np.concatenate(model.seen)[:, 0], values)
    assert batcher.stats.calls == len(model.calls)
    assert batcher.stats.images == 12
    assert batcher.stats.largest == max(model.calls)


def test_requests_queued_together_form_one_batch() -> None:
    """Requests submitted before the model thread picks any up go in one call."""
    model = SlowModel(delay=0.02)
    batcher = _batcher(model, max_batch_size=32)

    async def main() -> list[np.ndarray]:
        return list(await asyncio.gather(*(batcher.submit(_req(i, k=1 + i % 3)) for i in range(6))))

    try:
        outs = asyncio.run(main())
    finally:
        batcher.close()
    assert sum(model.calls) == sum(1 + i % 3 for i in range(6))
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out, _req(2 * i, k=1 + i % 3))


def test_max_batch_size_is_respected() -> None:
    model = SlowModel(delay=0.03)
    batcher = _batcher(model, max_batch_size=4)

    async def main() -> list[np.ndarray]:
        first = asyncio.create_task(batcher.submit(_req(0)))
        await asyncio.sleep(0.01)
        rest = await asyncio.gather(*(batcher.submit(_req(i)) for i in range(1, 20)))
        return [await first, *rest]

    try:
        outs = asyncio.run(main())
    finally:
        batcher.close()
    assert all(n <= 4 for n in model.calls), model.calls
    assert 4 in model.calls  # the queue was long enough to fill a batch
    assert sum(model.calls) == 20
    assert batcher.stats.largest == 4
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out, _req(2 * i))


def test_whole_requests_only_and_oversized_request_goes_alone() -> None:
    model = SlowModel(delay=0.1)
    batcher = _batcher(model, max_batch_size=4)

    async def main() -> list[np.ndarray]:
        first = asyncio.create_task(batcher.submit(_req(0)))
        await asyncio.sleep(0.01)
        # queued behind the first: 3 + 3 do not fit in 4, then 6 > 4 alone, then 1
        rest = await asyncio.gather(batcher.submit(_req(1, k=3)), batcher.submit(_req(2, k=3)),
                                    batcher.submit(_req(3, k=6)), batcher.submit(_req(4, k=1)))
        return [await first, *rest]

    try:
        outs = asyncio.run(main())
    finally:
        batcher.close()
    assert model.calls == [1, 3, 3, 6, 1]
    for (v, k), out in zip([(0, 1), (1, 3), (2, 3), (3, 6), (4, 1)], outs, strict=True):
        assert out.shape == (k, 2)
        np.testing.assert_array_equal(out, _req(2 * v, k=k))
    assert batcher.stats.largest == 6


def test_single_oversized_request_runs_alone() -> None:
    model = SlowModel(delay=0.01)
    batcher = _batcher(model, max_batch_size=4)
    images = np.arange(12, dtype=np.float32).reshape(6, 2)
    try:
        out = asyncio.run(batcher.submit(images))
    finally:
        batcher.close()
    assert model.calls == [6]
    np.testing.assert_array_equal(out, images * 2)


def test_model_batchers_disabled_means_one_request_per_call() -> None:
    models = {"a": SlowModel(delay=0.02), "b": SlowModel(delay=0.02)}
    batchers = model_batchers(models, settings=lambda n: S(enabled=n != "a", max_batch_size=32,
                                                            max_latency_ms=1000 if n == "a" else 2000))
    assert set(batchers) == {"a", "b"}
    assert batchers["a"].max_batch_size == 1
    assert batchers["b"].max_batch_size == 32
    assert batchers["a"].max_latency_s == pytest.approx(1.0)
    assert batchers["b"].max_latency_s == pytest.approx(2.0)
    assert batchers["a"].name == "a"

    async def main() -> list[np.ndarray]:
        first = asyncio.create_task(batchers["a"].submit(_req(0)))
        await asyncio.sleep(0.005)
        rest = await asyncio.gather(*(batchers["a"].submit(_req(i)) for i in range(1, 8)))
        return [await first, *rest]

    try:
        outs = asyncio.run(main())
    finally:
        for b in batchers.values():
            b.close()
    assert models["a"].calls == [1] * 8
    assert models["b"].calls == []
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out, _req(2 * i))


def test_model_batchers_all_disabled() -> None:
    model = SlowModel(delay=0.02)
    batchers = model_batchers({"m": model},
                              settings=lambda n: S(enabled=False, max_batch_size=32, max_latency_ms=1000))

    async def main() -> None:
        await asyncio.gather(*(batchers["m"].submit(_req(i)) for i in range(6)))

    try:
        asyncio.run(main())
    finally:
        batchers["m"].close()
    assert model.calls == [1] * 6


def test_model_batchers_on_batch_gets_model_name() -> None:
    seen: list[tuple[str, int]] = []
    models = {"x": SlowModel(delay=0.0), "y": SlowModel(delay=0.0)}
    batchers = model_batchers(models, settings=lambda n: S(),
                              on_batch=lambda name, n: seen.append((name, n)))

    async def main() -> None:
        await batchers["x"].submit(_req(1, k=2))
        await batchers["y"].submit(_req(1, k=3))

    try:
        asyncio.run(main())
    finally:
        for b in batchers.values():
            b.close()
    assert seen == [("x", 2), ("y", 3)]


# --------------------------------------------------------------------------- shedding


def test_requests_waiting_too_long_are_shed_and_batcher_keeps_serving() -> None:
    model = SlowModel(delay=0.3)
    batcher = _batcher(model, max_latency_ms=50)

    async def main() -> tuple[Any, list[Any], np.ndarray]:
        first = asyncio.create_task(batcher.submit(_req(1)))
        await asyncio.sleep(0.05)  # the model is busy with the first for 0.3 s
        late = await asyncio.gather(*(batcher.submit(_req(i)) for i in (2, 3, 4)), return_exceptions=True)
        after = await batcher.submit(_req(5))
        return await first, late, after

    try:
        first, late, after = asyncio.run(main())
    finally:
        batcher.close()
    np.testing.assert_array_equal(first, _req(2))
    assert all(isinstance(r, Overloaded) for r in late), late
    assert all(r.code == "overloaded" for r in late)
    assert batcher.stats.shed == 3
    np.testing.assert_array_equal(after, _req(10))
    assert model.calls == [1, 1]  # the shed requests never reached the model
    assert batcher.stats.images == 2


def test_request_within_latency_bound_is_not_shed() -> None:
    model = SlowModel(delay=0.1)
    batcher = _batcher(model, max_latency_ms=5000)

    async def main() -> list[np.ndarray]:
        first = asyncio.create_task(batcher.submit(_req(1)))
        await asyncio.sleep(0.02)
        rest = await asyncio.gather(*(batcher.submit(_req(i)) for i in (2, 3)))
        return [await first, *rest]

    try:
        outs = asyncio.run(main())
    finally:
        batcher.close()
    assert batcher.stats.shed == 0
    assert model.calls == [1, 2]
    for i, out in zip((1, 2, 3), outs, strict=True):
        np.testing.assert_array_equal(out, _req(2 * i))


# --------------------------------------------------------------------------- errors


def test_model_error_reaches_every_request_of_the_batch() -> None:
    model = SlowModel(delay=0.1, fail=lambda x: bool((x == -1).any()))
    batcher = _batcher(model)

    async def main() -> tuple[Any, list[Any], np.ndarray]:
        first = asyncio.create_task(batcher.submit(_req(1)))
        await asyncio.sleep(0.01)
        # one batch of three, one of which is "bad": all three get the error
        batch = await asyncio.gather(batcher.submit(_req(2)), batcher.submit(_req(-1)),
                                     batcher.submit(_req(3)), return_exceptions=True)
        after = await batcher.submit(_req(4))
        return await first, batch, after

    try:
        first, batch, after = asyncio.run(main())
    finally:
        batcher.close()
    np.testing.assert_array_equal(first, _req(2))
    assert model.calls == [1, 3, 1]
    assert all(isinstance(r, RuntimeError) and "model exploded" in str(r) for r in batch), batch
    np.testing.assert_array_equal(after, _req(8))


def test_lone_model_error_is_raised_to_its_request() -> None:
    model = SlowModel(delay=0.0, fail=lambda x: bool((x == -1).any()))
    batcher = _batcher(model)

    async def main() -> np.ndarray:
        with pytest.raises(RuntimeError, match="model exploded"):
            await batcher.submit(_req(-1))
        return await batcher.submit(_req(1))

    try:
        out = asyncio.run(main())
    finally:
        batcher.close()
    np.testing.assert_array_equal(out, _req(2))


def test_wrong_row_count_is_an_error_not_a_misassignment() -> None:
    model = SlowModel(delay=0.1, rows=lambda n: n - 1)
    batcher = _batcher(model)

    async def main() -> tuple[Any, list[Any]]:
        first = asyncio.create_task(batcher.submit(_req(1, k=2)))
        await asyncio.sleep(0.01)
        batch = await asyncio.gather(*(batcher.submit(_req(i)) for i in (2, 3, 4)), return_exceptions=True)
        first_result = await asyncio.gather(first, return_exceptions=True)
        return first_result[0], batch

    try:
        first, batch = asyncio.run(main())
    finally:
        batcher.close()
    assert model.calls == [2, 3]
    for r in (first, *batch):
        assert isinstance(r, RuntimeError), r
        assert "rows" in str(r)


class TwoOutputModel(SlowModel):
    """A fake multi-task model: ``{"probabilities": x * 2, "mask": (n, 3, 3, 1) filled with x}``
    (``short`` drops the mask's last row: outputs that disagree on their rows)."""

    def __init__(self, delay: float = 0.05, short: bool = False) -> None:
        super().__init__(delay)
        self.short = short

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:  # type: ignore[override]
        mask = np.broadcast_to(x[:, :1, None, None], (len(x), 3, 3, 1)).copy()
        return {"probabilities": super().__call__(x), "mask": mask[:-1] if self.short else mask}


def test_dict_outputs_are_split_per_request() -> None:
    """A multi-task model's call answers every request of the batch its own rows of each output."""
    model = TwoOutputModel(delay=0.05)
    batcher = _batcher(model)
    sizes = [1, 3, 2, 1]

    async def main() -> list[Any]:
        first = asyncio.create_task(batcher.submit(_req(0.0, k=sizes[0])))
        await asyncio.sleep(0.01)  # the model is busy: the others queue and go in one call
        rest = await asyncio.gather(*(batcher.submit(_req(float(i), k=k))
                                      for i, k in enumerate(sizes[1:], 1)))
        return [await first, *rest]

    try:
        outs = asyncio.run(main())
    finally:
        batcher.close()
    assert model.calls == [1, 6]  # one call for the three queued requests
    for i, (k, out) in enumerate(zip(sizes, outs, strict=True)):
        assert set(out) == {"probabilities", "mask"}
        np.testing.assert_array_equal(out["probabilities"], _req(2.0 * i, k=k))
        assert out["mask"].shape == (k, 3, 3, 1) and np.all(out["mask"] == i)


def test_dict_outputs_with_different_row_counts_fail_every_request() -> None:
    model = TwoOutputModel(delay=0.05, short=True)
    batcher = _batcher(model)

    async def main() -> list[Any]:
        return list(await asyncio.gather(*(batcher.submit(_req(i)) for i in (1, 2)), return_exceptions=True))

    try:
        outs = asyncio.run(main())
    finally:
        batcher.close()
    assert model.calls == [2]
    assert all(isinstance(r, ValueError) and "row counts" in str(r) for r in outs), outs


# --------------------------------------------------------------------------- cancellation


def test_cancelled_request_is_not_run_and_others_are_unaffected() -> None:
    model = SlowModel(delay=0.1)
    batcher = _batcher(model)

    async def main() -> tuple[list[Any], bool]:
        first = asyncio.create_task(batcher.submit(_req(1)))
        await asyncio.sleep(0.02)  # the model is busy with the first
        gone = asyncio.create_task(batcher.submit(_req(-7, k=3)))
        kept = [asyncio.create_task(batcher.submit(_req(i))) for i in (2, 3)]
        await asyncio.sleep(0.01)  # all queued
        gone.cancel()
        outs = await asyncio.gather(first, *kept)
        return list(outs), gone.cancelled()

    try:
        outs, cancelled = asyncio.run(main())
    finally:
        batcher.close()
    assert cancelled
    assert model.calls == [1, 2]  # the cancelled request's 3 images were never run
    assert not any((x == -7).any() for x in model.seen)
    assert batcher.stats.images == 3
    assert batcher.stats.shed == 0
    for i, out in zip((1, 2, 3), outs, strict=True):
        np.testing.assert_array_equal(out, _req(2 * i))


def test_cancelled_request_in_flight_does_not_break_its_batch() -> None:
    model = SlowModel(delay=0.1)
    batcher = _batcher(model)

    async def main() -> tuple[list[Any], bool]:
        first = asyncio.create_task(batcher.submit(_req(1)))
        await asyncio.sleep(0.02)
        gone = asyncio.create_task(batcher.submit(_req(5)))
        kept = asyncio.create_task(batcher.submit(_req(2)))
        while len(model.calls) < 2:  # wait until the second batch (gone + kept) is running
            await asyncio.sleep(0.005)
        gone.cancel()
        outs = await asyncio.gather(first, kept)
        after = await batcher.submit(_req(3))
        return [*outs, after], gone.cancelled()

    try:
        outs, cancelled = asyncio.run(main())
    finally:
        batcher.close()
    assert cancelled
    assert model.calls == [1, 2, 1]
    for i, out in zip((1, 2, 3), outs, strict=True):
        np.testing.assert_array_equal(out, _req(2 * i))


# --------------------------------------------------------------------------- hooks, lifecycle


def test_on_batch_sees_every_batch_size() -> None:
    sizes: list[int] = []
    model = SlowModel(delay=0.04)
    batcher = _batcher(model, max_batch_size=5, on_batch=sizes.append)

    async def main() -> None:
        first = asyncio.create_task(batcher.submit(_req(0, k=2)))
        await asyncio.sleep(0.01)
        await asyncio.gather(*(batcher.submit(_req(i, k=1 + i % 2)) for i in range(1, 9)))
        await first

    try:
        asyncio.run(main())
    finally:
        batcher.close()
    assert sizes == model.calls
    assert sum(sizes) == batcher.stats.images == 2 + sum(1 + i % 2 for i in range(1, 9))
    assert len(sizes) == batcher.stats.calls


def test_batcher_serves_again_under_a_new_event_loop() -> None:
    """asyncio.run ends its loop (and the batcher's task); the next loop gets a new one."""
    model = SlowModel(delay=0.0)
    batcher = _batcher(model)
    try:
        first = asyncio.run(batcher.submit(_req(1)))
        second = asyncio.run(batcher.submit(_req(2)))
    finally:
        batcher.close()
    np.testing.assert_array_equal(first, _req(2))
    np.testing.assert_array_equal(second, _req(4))
    assert model.calls == [1, 1]


def test_close_refuses_queued_requests() -> None:
    model = SlowModel(delay=0.2)
    batcher = _batcher(model)

    async def main() -> list[Any]:
        first = asyncio.create_task(batcher.submit(_req(1)))
        await asyncio.sleep(0.02)
        queued = [asyncio.create_task(batcher.submit(_req(i))) for i in (2, 3)]
        await asyncio.sleep(0.01)
        batcher.close()
        outs = await asyncio.wait_for(asyncio.gather(*queued, return_exceptions=True), 2.0)
        first.cancel()
        return list(outs)

    outs = asyncio.run(main())
    assert all(isinstance(r, Overloaded) for r in outs), outs
    assert model.calls == [1]  # the queued requests were never run


def test_close_answers_the_request_in_flight() -> None:
    """A request whose batch is running when the batcher closes must not wait forever."""
    model = SlowModel(delay=0.2)
    batcher = _batcher(model)

    async def main() -> Any:
        first = asyncio.create_task(batcher.submit(_req(1)))
        await asyncio.sleep(0.05)  # its batch is running
        batcher.close()
        try:
            return (await asyncio.wait_for(asyncio.gather(first, return_exceptions=True), 2.0))[0]
        except asyncio.TimeoutError:
            return "hung"

    result = asyncio.run(main())
    assert not (isinstance(result, str) and result == "hung"), \
        "the request in flight when close() was called never got an answer"


# --------------------------------------------------------------------------- with a real model


def _png(arr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


class _Delayed:
    """A bundle whose model calls take at least ``delay`` s longer (so requests queue up)."""

    def __init__(self, bundle: Any, delay: float) -> None:
        self._bundle = bundle
        self.delay = delay
        self.model, self.spec, self.contract = bundle.model, bundle.spec, bundle.contract
        self.runtime = bundle.runtime

    def predict(self, batch: np.ndarray) -> np.ndarray:
        time.sleep(self.delay)
        return self._bundle.predict(batch)


def test_local_engine_batched_answers_equal_unbatched() -> None:
    from breastscan.bundle import ModelBundle, ModelContract
    from breastscan.imaging.preprocessing import PreprocessSpec
    from breastscan.serving.answer import to_dict
    from breastscan.serving.engine import local_engine
    from breastscan.serving.request import ImageInput, predict_request
    from tests.conftest import tiny_model

    spec = PreprocessSpec(height=32, width=32)
    contract = ModelContract(name="tumor", task="classification", label="pathology",
                             classes=("benign", "malignant", "normal"),
                             class_names=("benign", "malignant", "normal"), input_shape=(32, 32, 1),
                             dataset="mammography", modality="mammography", temperature=1.5,
                             spec_id=spec.spec_id)
    bundle = ModelBundle(tiny_model("classification", 3, seed=11), spec, contract)
    rng = np.random.default_rng(0)
    pngs = [_png((rng.random((40 + 4 * i, 36 + 2 * i)) * 255 * (0.3 + 0.1 * i)).astype(np.uint8))
            for i in range(8)]

    plain = local_engine({"tumor": bundle})
    assert plain.batchers == {}
    batched = local_engine({"tumor": bundle}, batching=S(enabled=True, max_batch_size=8, max_latency_ms=5000))
    assert set(batched.batchers) == {"tumor"}
    assert batched.batchers["tumor"].max_batch_size == 8
    slow = local_engine({"tumor": _Delayed(bundle, 0.1)},
                        batching=S(enabled=True, max_batch_size=8, max_latency_ms=5000))

    async def sequential(engine: Any) -> list[dict[str, Any]]:
        return [to_dict(await engine.predict(predict_request("tumor", ImageInput(data=p)))) for p in pngs]

    async def concurrent(engine: Any) -> list[dict[str, Any]]:
        answers = await asyncio.gather(*(engine.predict(predict_request("tumor", ImageInput(data=p)))
                                         for p in pngs))
        return [to_dict(a) for a in answers]

    try:
        expected = asyncio.run(sequential(plain))
        one_by_one = asyncio.run(sequential(batched))
        sequential_stats = dataclasses.replace(batched.batchers["tumor"].stats)
        together_fast = asyncio.run(concurrent(batched))
        together = asyncio.run(concurrent(slow))
    finally:
        for engine in (batched, slow):
            for b in engine.batchers.values():
                b.close()

    # one request at a time: a batch of one, the same call, the same bits
    assert one_by_one == expected
    assert (sequential_stats.calls, sequential_stats.images, sequential_stats.largest) == (8, 8, 1)
    assert batched.batchers["tumor"].stats.images == 16
    # the images differ enough that a mixed-up row would show
    first_probs = [tuple(a["probabilities"].values()) for a in expected]
    assert len(set(first_probs)) == len(first_probs)

    # concurrent requests (batched when the model is busy, certainly so behind the slowed
    # model): the same answers up to float rounding of a different batch size
    stats = slow.batchers["tumor"].stats
    assert stats.largest > 1, stats
    assert stats.images == 8
    assert stats.calls < 8
    for got, want in [*zip(together, expected, strict=True), *zip(together_fast, expected, strict=True)]:
        assert got["predicted"] == want["predicted"]
        assert got["probabilities"].keys() == want["probabilities"].keys()
        for cls, p in want["probabilities"].items():
            assert got["probabilities"][cls] == pytest.approx(p, abs=1e-5)
        assert got["confidence"] == pytest.approx(want["confidence"], abs=1e-5)
        assert (got["width"], got["height"]) == (want["width"], want["height"])
        assert {k: v for k, v in got.items() if k not in ("probabilities", "confidence")} == \
            {k: v for k, v in want.items() if k not in ("probabilities", "confidence")}
