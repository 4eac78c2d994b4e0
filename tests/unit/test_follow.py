"""Live swaps of a served model's version (breastscan.serving.engine slots, breastscan.serving.follow).

Fake models (a function of the version and the image) behind real batchers, and a fake
registry: no TensorFlow, no MLflow. The real path -- a registry promotion under load against
``bentoml serve`` -- is tests/services/test_live_update.py.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from breastscan.bundle import ModelContract
from breastscan.imaging.preprocessing import PreprocessSpec
from breastscan.serving.answer import ERRORS, ApiError, Prediction
from breastscan.serving.batching import Batcher
from breastscan.serving.config import CONFIG_ENV, Follow, parse_serving_config
from breastscan.serving.engine import Engine, ModelSlot, ServedModel
from breastscan.serving.follow import Candidate, MlflowRegistry, StageFollower, contract_change
from breastscan.serving.request import ImageInput, predict_request

SPEC = PreprocessSpec(height=32, width=24)
CLASSES = ("benign", "malignant", "normal")
IMAGE = ImageInput(array=np.full((40, 30), 0.5, np.float32))


def contract(modality: str = "mammography", classes: tuple[str, ...] = CLASSES) -> ModelContract:
    return ModelContract(name="tumor", task="classification", label="x", classes=classes, class_names=classes,
                         input_shape=(32, 24, 1), dataset="d", modality=modality, spec_id=SPEC.spec_id)


def served(version: str, modality: str = "mammography", classes: tuple[str, ...] = CLASSES) -> ServedModel:
    return ServedModel("tumor", SPEC, contract(modality, classes), version, "production")


@dataclass
class FakeModel:
    """A model version behind a real :class:`Batcher`: each call records ``(version, batch size)``
    and waits for ``gate`` (set: no waiting)."""

    version: str
    calls: list[tuple[str, int]]
    gate: threading.Event = field(default_factory=threading.Event)

    def run(self, images: np.ndarray) -> np.ndarray:
        self.calls.append((self.version, len(images)))
        assert self.gate.wait(10), "the test never opened the gate"
        return np.tile(np.asarray([0.2, 0.7, 0.1], np.float32), (len(images), 1))

    def slot(self, model: ServedModel | None = None) -> ModelSlot:
        batcher = Batcher(self.run, name="tumor", max_batch_size=64, max_latency_ms=10_000)

        async def explain(batch: np.ndarray, classes: list[int]) -> np.ndarray:
            return np.ones(batch.shape[:3], np.float32)

        return ModelSlot(model or served(self.version), batcher.submit, explain, batcher)


async def _predict(engine: Engine) -> Prediction:
    return await engine.predict(predict_request("tumor", IMAGE))


async def _until(check: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


# --------------------------------------------------------------------------- the slot swap


def test_requests_admitted_before_a_swap_finish_on_the_old_version_and_batches_never_mix() -> None:
    calls: list[tuple[str, int]] = []
    old, new = FakeModel("1", calls), FakeModel("2", calls)
    new.gate.set()
    old_slot = old.slot()
    engine = Engine({"tumor": old_slot}, max_upload_bytes=1 << 20)

    async def scenario() -> tuple[list[Prediction], list[Prediction], bool, bool]:
        before = [asyncio.create_task(_predict(engine)) for _ in range(6)]
        await _until(lambda: old_slot.in_flight == 6 and calls)  # admitted; the first batch is running
        replaced = engine.replace("tumor", new.slot())
        assert replaced is old_slot
        retiring = asyncio.create_task(engine.retire(old_slot, timeout_s=10))
        after = await asyncio.gather(*(_predict(engine) for _ in range(5)))  # old ones still waiting
        still_open = not retiring.done()
        old.gate.set()
        finished = await asyncio.gather(*before)
        in_time = await retiring
        return finished, after, still_open, in_time

    before, after, waited, in_time = asyncio.run(scenario())
    assert [p.version for p in before] == ["1"] * 6 and [p.version for p in after] == ["2"] * 5
    assert waited and in_time and old_slot.in_flight == 0  # retire waited for the old requests
    assert sum(n for v, n in calls if v == "1") == 6 and sum(n for v, n in calls if v == "2") == 5
    assert old_slot.batcher is not None and old_slot.batcher._executor._shutdown  # closed after them
    assert engine.batchers["tumor"] is engine.slots["tumor"].batcher is not old_slot.batcher
    engine.close()


def test_a_request_still_preprocessing_at_the_swap_runs_on_the_version_it_was_admitted_to() -> None:
    calls: list[tuple[str, int]] = []
    old, new = FakeModel("1", calls, _open()), FakeModel("2", calls, _open())
    engine = Engine({"tumor": old.slot()}, max_upload_bytes=1 << 20)
    prepared, original = threading.Event(), engine._prepare
    waiting: list[int] = []

    def slow_prepare(served_model: ServedModel, image: Any) -> Any:
        waiting.append(1)
        assert prepared.wait(10)
        return original(served_model, image)

    engine._prepare = slow_prepare  # type: ignore[method-assign]

    async def scenario() -> list[Prediction]:
        admitted = [asyncio.create_task(_predict(engine)) for _ in range(3)]
        await _until(lambda: len(waiting) == 3)  # admitted, not at the model yet
        engine.replace("tumor", new.slot())
        later = [asyncio.create_task(_predict(engine)) for _ in range(2)]
        await _until(lambda: len(waiting) == 5)
        prepared.set()
        return list(await asyncio.gather(*admitted, *later))

    answers = asyncio.run(scenario())
    assert [p.version for p in answers] == ["1", "1", "1", "2", "2"]
    assert sorted({v for v, _ in calls}) == ["1", "2"] and sum(n for v, n in calls if v == "1") == 3
    engine.close()


def test_an_analysis_is_bound_to_the_versions_it_was_admitted_to() -> None:
    calls: list[tuple[str, int]] = []
    old, new = FakeModel("1", calls), FakeModel("2", calls)
    new.gate.set()
    engine = Engine({"tumor": old.slot()}, max_upload_bytes=1 << 20)

    async def scenario() -> Any:
        from breastscan.serving.request import Request

        task = asyncio.create_task(engine.answer(Request("analyze", image=IMAGE, modality="mammography")))
        await _until(lambda: calls)
        engine.replace("tumor", new.slot())
        old.gate.set()
        return await task, await _predict(engine)

    analysis, later = asyncio.run(scenario())
    assert analysis.models["tumor"].version == "1" and later.version == "2"
    engine.close()


def test_a_withdrawn_model_answers_model_withdrawn_until_it_is_served_again() -> None:
    model = FakeModel("1", [])
    model.gate.set()
    engine = Engine({"tumor": model.slot()}, max_upload_bytes=1 << 20)
    slot = engine.withdraw("tumor")
    assert slot is not None and engine.withdraw("tumor") is None
    with pytest.raises(ApiError) as refused:
        asyncio.run(_predict(engine))
    assert refused.value.code == "model_withdrawn" and "@production" in refused.value.message
    assert (ERRORS["model_withdrawn"].http, ERRORS["model_withdrawn"].grpc) == (404, "NOT_FOUND")
    assert engine.describe() == [] and "tumor" in engine.withdrawn
    with pytest.raises(ApiError) as unknown:
        engine.select("nope")
    assert unknown.value.code == "unknown_model"
    engine.replace("tumor", FakeModel("3", [], model.gate).slot())
    assert asyncio.run(_predict(engine)).version == "3" and not engine.withdrawn
    asyncio.run(engine.retire(slot, timeout_s=1))
    engine.close()


# --------------------------------------------------------------------------- the follower


class FakeRegistry:
    """The stage as a dict; versions as fake models; the audit trail as a list."""

    def __init__(self, contracts: Mapping[int, ServedModel]) -> None:
        self.contracts = dict(contracts)
        self.holder: dict[str, int | None] = {"tumor": 1}
        self.loaded: list[int] = []
        self.events: list[tuple[str, int | None, int | None]] = []
        self.fail: set[int] = set()
        self.readable = True

    def connect(self) -> str:
        return "fake://registry"

    def holders(self, stage: str) -> dict[str, int | None]:
        if not self.readable:
            raise ConnectionError("registry down")
        return dict(self.holder)

    def load(self, model: str, version: int, stage: str) -> Candidate:
        self.loaded.append(version)
        if version in self.fail:
            raise OSError("download failed")
        return Candidate(self.contracts[version], FakeModel(str(version), [], _open()))

    def record(self, model: str, kind: str, *, stage: str, from_version: int | None,
               to_version: int | None, reason: str) -> None:
        assert model == "tumor" and stage == "production" and reason
        self.events.append((kind, from_version, to_version))


def _open() -> threading.Event:
    gate = threading.Event()
    gate.set()
    return gate


class Counts:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def count_swap(self, model: str, outcome: str) -> None:
        self.seen.append((model, outcome))


def _follower(registry: FakeRegistry, poll_s: float = 0.01) -> tuple[StageFollower, Engine, Counts]:
    engine = Engine({"tumor": FakeModel("1", [], _open()).slot()}, max_upload_bytes=1 << 20)
    counts = Counts()
    follower = StageFollower(engine, registry, lambda c: c.bundle.slot(c.served), stage="production",
                             poll_s=poll_s, retire_s=5, metrics=counts)  # type: ignore[arg-type]
    return follower, engine, counts


def test_the_follower_swaps_to_the_version_the_stage_moves_to_and_back() -> None:
    registry = FakeRegistry({1: served("1"), 2: served("2")})
    follower, engine, counts = _follower(registry)
    first = engine.slots["tumor"]

    async def scenario() -> list[str | None]:
        seen = []
        for holder in (1, 2, 2, 1):
            registry.holder["tumor"] = holder
            assert await follower.poll()
            seen.append((await _predict(engine)).version)
        await follower.close()
        return seen

    assert asyncio.run(scenario()) == ["1", "2", "2", "1"]
    assert registry.loaded == [2, 1]  # nothing loaded while the stage stays
    assert registry.events == [("swap", 1, 2), ("swap", 2, 1)]
    assert counts.seen == [("tumor", "swapped")] * 2
    assert first.batcher is not None and first.batcher._executor._shutdown  # retired
    engine.close()


def test_a_replaced_version_is_unreachable_when_its_retirement_ends() -> None:
    registry = FakeRegistry({1: served("1"), 2: served("2")})
    follower, engine, _ = _follower(registry)
    first = weakref.ref(engine.slots["tumor"])
    alive: list[bool] = []

    def retired() -> None:  # what the service does here: one full collection (runtime._refreeze)
        gc.collect()
        alive.append(first() is not None)

    follower.on_retired = retired
    registry.holder["tumor"] = 2

    async def scenario() -> None:
        await follower.poll()
        await follower.close()

    asyncio.run(scenario())
    assert alive == [False]  # nothing of the follower's still held the old version
    engine.close()


@pytest.mark.parametrize("change", ["modality", "classes"])
def test_a_contract_change_is_refused_once_and_the_old_version_serves(change: str) -> None:
    other = served("2", modality="ultrasound") if change == "modality" else served("2", classes=("a", "b"))
    registry = FakeRegistry({1: served("1"), 2: other})
    follower, engine, counts = _follower(registry)
    registry.holder["tumor"] = 2

    async def scenario() -> str | None:
        await follower.poll()
        await follower.poll()  # the same refused version is not loaded again
        return (await _predict(engine)).version

    assert asyncio.run(scenario()) == "1"
    assert registry.loaded == [2] and registry.events == [("swap_refused", 1, 2)]
    assert counts.seen == [("tumor", "refused")]
    engine.close()


def test_contract_change_names_what_changes() -> None:
    assert contract_change(contract(), contract()) is None
    assert contract_change(contract(), replace(contract(), temperature=2.0)) is None  # calibration may change
    assert "task" in (contract_change(contract(), replace(contract(), task="multitask")) or "")
    assert "'mammography' to 'ultrasound'" in (contract_change(contract(), contract("ultrasound")) or "")


def test_a_removed_stage_withdraws_the_model_and_a_new_holder_brings_it_back() -> None:
    registry = FakeRegistry({1: served("1"), 4: served("4")})
    follower, engine, counts = _follower(registry)

    async def scenario() -> tuple[str, str | None]:
        registry.holder["tumor"] = None
        await follower.poll()
        with pytest.raises(ApiError) as refused:
            await _predict(engine)
        code = refused.value.code
        registry.holder["tumor"] = 4
        await follower.poll()
        await follower.close()
        return code, (await _predict(engine)).version

    assert asyncio.run(scenario()) == ("model_withdrawn", "4")
    assert registry.events == [("swap", 1, None), ("swap", None, 4)]
    assert counts.seen == [("tumor", "withdrawn"), ("tumor", "swapped")]
    engine.close()


def test_a_failed_load_keeps_serving_and_waits_before_trying_again(caplog: pytest.LogCaptureFixture) -> None:
    registry = FakeRegistry({1: served("1"), 2: served("2")})
    registry.fail.add(2)
    follower, engine, counts = _follower(registry, poll_s=60)
    registry.holder["tumor"] = 2

    async def scenario() -> str | None:
        await follower.poll()
        await follower.poll()  # within RETRY_POLLS polls: not tried again
        return (await _predict(engine)).version

    with caplog.at_level(logging.ERROR, logger="breastscan.serving.follow"):
        assert asyncio.run(scenario()) == "1"
    assert registry.loaded == [2] and counts.seen == [("tumor", "failed")] and registry.events == []
    assert any("could not be loaded: still serving v1" in r.getMessage() for r in caplog.records)
    engine.close()


def test_registry_outages_and_first_time_promotions_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    registry = FakeRegistry({1: served("1")})
    follower, engine, _ = _follower(registry)

    async def scenario() -> list[bool]:
        registry.readable = False
        down = [await follower.poll(), await follower.poll()]
        registry.readable = True
        registry.holder.update({"density": 3, "lesion": None})
        return [*down, await follower.poll(), await follower.poll()]

    with caplog.at_level(logging.INFO, logger="breastscan.serving.follow"):
        assert asyncio.run(scenario()) == [False, False, True, True]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot read the registry" in m for m in messages) == 1
    assert sum("density v3 holds @production but is not served" in m for m in messages) == 1
    assert not any("lesion" in m for m in messages)  # registered, not at the stage: nothing to say
    assert engine.select("tumor").version == "1"
    engine.close()


def test_following_stops_without_a_registry_or_with_one_that_lacks_the_served_models(
        caplog: pytest.LogCaptureFixture) -> None:
    registry = FakeRegistry({1: served("1")})
    follower, engine, _ = _follower(registry)
    registry.readable = False
    with caplog.at_level(logging.WARNING, logger="breastscan.serving.follow"):
        asyncio.run(asyncio.wait_for(follower.run(), 5))  # returns: no endless polling
        registry.readable, registry.holder = True, {"other": 1}
        asyncio.run(asyncio.wait_for(follower.run(), 5))
    messages = [r.getMessage() for r in caplog.records]
    assert "not following the registry stage @production: registry down" in messages
    assert any("holds none of the served models (tumor)" in m for m in messages)
    engine.close()


def test_the_mlflow_registry_refuses_a_store_that_does_not_exist(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/missing.db")
    with pytest.raises(LookupError, match="missing.db does not exist"):
        MlflowRegistry(tmp_path).connect()
    assert not (tmp_path / "missing.db").exists()  # MLflow was never asked (it would create one)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(LookupError, match="mlflow.db does not exist"):
        MlflowRegistry(tmp_path).connect()


# --------------------------------------------------------------------------- the config


def test_the_follow_section_and_when_a_service_follows(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert parse_serving_config({}).follow == Follow(enabled=True, poll_s=10.0)
    assert parse_serving_config({"follow": {"poll_s": 1}}).follow == Follow(enabled=True, poll_s=1.0)
    for bad, message in [({"poll_s": 0}, "positive"), ({"enabled": "yes"}, "true or false"),
                         ({"every": 3}, "unknown follow keys: every")]:
        with pytest.raises(ValueError, match=message):
            parse_serving_config({"follow": bad})
    from breastscan.serving.runtime import service_config

    service = tmp_path / "services" / "service.py"
    service.parent.mkdir()
    service.write_text("")
    (service.parent / "serving.yaml").write_text("models: [tumor]\nfollow: {enabled: true, poll_s: 2}\n")
    config, _ = service_config(service)
    assert config.follow == Follow(enabled=False, poll_s=2.0)  # a list serves what was imported
