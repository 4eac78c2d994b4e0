"""Promotion under concurrency and interruption (breastscan.registry.promotion) on a real SQLite store.

Two promotions of one model race round after round; a promotion fails at each of its registry
writes in turn; a promoting process is SIGKILLed while it holds the lock, its alias moved and
not yet recorded. Versions are registered with
:func:`breastscan.registry.versions.register` (the helpers of ``tests/unit/test_registry.py``)
on a tiny artifact directory: promotion never opens the model, so no Keras model is built.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from breastscan.config import ModelConfig
from breastscan.registry import promotion
from breastscan.registry.resolver import RegistryError
from tests.conftest import sqlite_mlflow
from tests.unit.test_registry import GOOD, make_cfg, reg

REPO = Path(__file__).resolve().parents[2]
PENDING = promotion.PENDING_TAG_PREFIX + "production"
WRITES = ("set_registered_model_tag", "set_registered_model_alias", "set_model_version_tag",
          "delete_registered_model_tag")
"""The registry writes of a promotion (the classic-stage mirror is best effort and never raises)."""
ROUNDS = 3


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A SQLite store and a tiny model artifact every version is registered from (``reg``'s store)."""
    root = tmp_path_factory.mktemp("promotion")
    artifact = root / "artifact"
    artifact.mkdir()
    (artifact / "MLmodel").write_text("flavors: {}\n")
    with sqlite_mlflow(root):
        yield {"root": root, "model_uri": str(artifact), "run_id": None}


def auc(value: float) -> dict[str, Any]:
    """A report whose headline (and only gated metric with ``floors={}``) is ``value``."""
    return {**GOOD, "macro_auc": value, "headline_value": value}


def registry_state(name: str, alias: str = "production") -> dict[str, Any]:
    """What a reader sees: alias holder, pending tag, classic Production stage, promotion tags."""
    client = MlflowClient()
    model = client.get_registered_model(name)
    found = client.search_model_versions(f"name = '{name}'")
    existing = {int(v.version) for v in found}
    assert {int(v) for v in (model.aliases or {}).values()} <= existing, "an alias names a missing version"
    holder = (model.aliases or {}).get(alias)
    return {"holder": int(holder) if holder is not None else None,
            "pending": (model.tags or {}).get(PENDING),
            "stage": sorted(int(v.version) for v in found if v.current_stage == "Production"),
            "from": {int(v.version): (v.tags or {}).get("promoted_from") for v in found}}


def assert_promoted(name: str, holder: int, previous: int | None, pending_ok: bool = False) -> None:
    """``holder`` holds @production with its bookkeeping: promoted from ``previous``, the classic stage."""
    state = registry_state(name)
    assert state["holder"] == holder, state
    assert state["stage"] == [holder], state
    assert state["from"][holder] == (str(previous) if previous else "none"), state
    assert pending_ok or state["pending"] is None, state


# --------------------------------------------------------------------------- two racing promotions


def race(cfg: ModelConfig, sides: dict[str, list[int]]) -> dict[str, list[dict[str, Any]]]:
    """Promote the versions of each side in its own thread, round by round, both sides at once.

    Each thread holds its own descriptor of the lock file, so the ``flock`` is contended just as
    between processes (that case is the SIGKILL test's).
    """
    barrier = threading.Barrier(len(sides), timeout=60)
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    errors: list[BaseException] = []

    def run(side: str) -> None:
        try:
            for version in sides[side]:
                barrier.wait()
                results[side].append(promotion.promote(cfg, version=version).to_dict())
        except BaseException as exc:  # reported by the test
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(side,)) for side in sides]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    return results


def test_two_promotions_racing_are_serialised_and_keep_the_bookkeeping(
        registry: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each round A (better) and B (worse than A, not than the holder) are promoted at once.

    Serialised, A always ends on @production: A first refuses B (regression against A), B first
    is then replaced by A. Unserialised, both compare against the old holder, B passes a
    regression gate it should fail and the previous-version bookkeeping lies. The gates take
    50 ms (a re-score takes minutes) so that unserialised promotions overlap.
    """
    check = promotion._check_regression

    def slow_check(*args: Any) -> None:
        time.sleep(0.05)
        check(*args)

    monkeypatch.setattr(promotion, "_check_regression", slow_check)
    cfg = make_cfg("race", floors={}, max_regression=0.0)
    holder = reg(registry, cfg, auc(0.50))
    assert promotion.promote(cfg).passed
    a_side = [reg(registry, cfg, auc(0.51 + 0.02 * r)) for r in range(ROUNDS)]
    b_side = [reg(registry, cfg, auc(0.50 + 0.02 * r)) for r in range(ROUNDS)]
    results = race(cfg, {"a": a_side, "b": b_side})

    tags = registry_state(cfg.registered_name)["from"]
    for a, b, a_version, b_version in zip(results["a"], results["b"], a_side, b_side, strict=True):
        assert a["passed"], a["failures"]  # A beats both the old holder and B
        if b["passed"]:  # B went first and A replaced it
            assert (b["previous"], a["previous"]) == (holder, b_version), (a, b)
            assert tags[b_version] == str(holder)
        else:  # A went first and B was compared with A
            assert (a["previous"], b["previous"]) == (holder, a_version), (a, b)
            assert b["failures"][0].startswith("macro_auc"), b["failures"]
            assert tags[b_version] is None
        assert tags[a_version] == str(a["previous"])
        holder = a_version
    assert_promoted(cfg.registered_name, a_side[-1], results["a"][-1]["previous"])


# --------------------------------------------------------------------------- interrupted promotions


class InjectedFailure(RuntimeError):
    """The registry write a test made fail."""


@contextmanager
def failing_write(k: int) -> Iterator[list[str]]:
    """Make the ``k``-th registry write (of :data:`WRITES`) raise; yields the writes that ran."""
    done: list[str] = []

    def wrap(method: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def write(self: MlflowClient, *args: Any, **kwargs: Any) -> Any:
            if len(done) + 1 == k:
                raise InjectedFailure(f"write {k} ({method}) failed")
            done.append(method)
            return real(self, *args, **kwargs)
        return write

    with pytest.MonkeyPatch.context() as mp:
        for method in WRITES:
            mp.setattr(MlflowClient, method, wrap(method, getattr(MlflowClient, method)))
        yield done


def test_a_promotion_failing_at_any_write_leaves_old_or_new_state_and_the_next_one_finishes_it(
        registry: dict[str, Any]) -> None:
    """Write k fails (k = 1, 2, ... until the promotion completes), promoting v2 and v1 in turn."""
    cfg = make_cfg("interrupted", floors={})
    old, new = reg(registry, cfg), reg(registry, cfg)
    assert promotion.promote(cfg, version=old).passed
    before_old: int | None = None
    k = 1
    while True:
        with failing_write(k) as done:
            try:
                completed = promotion.promote(cfg, version=new).passed
            except InjectedFailure:
                completed = False
        if completed:  # k is past the last write
            assert_promoted(cfg.registered_name, new, old)
            break
        state = registry_state(cfg.registered_name)
        if state["holder"] == old:  # the old state (perhaps with the pending tag)
            assert_promoted(cfg.registered_name, old, before_old, pending_ok=True)
        else:  # the new state, flagged as unfinished until the next promotion
            assert state["holder"] == new and state["pending"] is not None, (k, done, state)
            assert json.loads(state["pending"])["version"] == new
        again = promotion.promote(cfg, version=new)
        assert again.passed, again.failures
        assert_promoted(cfg.registered_name, new, old)
        before_old, old, new, k = old, new, old, k + 1
    assert k > 5, "expected the pending tag, the alias, three version tags, the pending tag's removal"


def hang_worker(name: str, version: str, reached: str) -> None:
    """Promote ``version`` and hang (holding the lock) at the first version tag, after the alias moved."""
    def hang(*args: Any, **kwargs: Any) -> None:
        Path(reached).touch()
        time.sleep(120)

    MlflowClient.set_model_version_tag = hang  # type: ignore[method-assign]
    promotion.promote(make_cfg(name, floors={}), version=int(version))


def spawn_hang_worker(*args: str) -> subprocess.Popen[bytes]:
    """:func:`hang_worker` in a fresh interpreter (the store comes with the environment)."""
    code = "import sys; import tests.integration.test_promotion_safety as t; t.hang_worker(*sys.argv[1:])"
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=dict(os.environ))


def test_a_promotion_killed_while_holding_the_lock_blocks_nobody_and_is_finished_next(
        registry: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_cfg("killed", floors={})
    old = reg(registry, cfg)
    assert promotion.promote(cfg).passed
    new = reg(registry, cfg)
    reached = tmp_path / "reached"
    worker = spawn_hang_worker("killed", str(new), str(reached))
    try:
        deadline = time.monotonic() + 60
        while not reached.exists():
            assert worker.poll() is None and time.monotonic() < deadline, "the worker never reached the alias"
            time.sleep(0.02)
        with pytest.raises(RegistryError, match="another promotion of breastscan-killed held"):
            with promotion.promotion_lock(cfg.registered_name, timeout=0.2):
                pass  # the live worker holds it
        state = registry_state(cfg.registered_name)
        assert state["holder"] == new and state["stage"] == [old] and state["from"][new] is None
        pending = json.loads(state["pending"])
        assert (pending["version"], pending["previous"]) == (new, old)
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    assert worker.returncode == -signal.SIGKILL
    lock_file = promotion.promotion_lock_path(f"sqlite:///{registry['root']}/store.db", cfg.registered_name)
    assert lock_file is not None and lock_file.exists()  # the file stays; its flock died with the worker
    monkeypatch.setattr(promotion, "LOCK_TIMEOUT_S", 5.0)  # a stale lock would raise RegistryError
    result = promotion.promote(cfg, version=new)
    assert result.passed and result.previous == new  # the alias had moved: only the bookkeeping was left
    assert_promoted(cfg.registered_name, new, old)


# --------------------------------------------------------------------------- remote stores: optimistic check


@pytest.mark.parametrize("when", ["gates", "after_move"])
def test_without_a_lock_file_a_concurrent_move_is_reported_not_recorded(
        registry: dict[str, Any], monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    """A remote store has no lock: an alias moved by someone else before or right after this
    promotion's move turns it into a failure, and nothing of it is recorded."""
    monkeypatch.setattr(promotion, "promotion_lock_path", lambda uri, name: None)
    cfg = make_cfg(f"remote-{when}", floors={})
    name = cfg.registered_name
    reg(registry, cfg)
    assert promotion.promote(cfg).passed
    ours, theirs = reg(registry, cfg), reg(registry, cfg)
    if when == "gates":
        check = promotion._check_regression

        def meanwhile(*args: Any) -> None:
            MlflowClient().set_registered_model_alias(name, "production", str(theirs))
            check(*args)

        monkeypatch.setattr(promotion, "_check_regression", meanwhile)
    else:
        move = MlflowClient.set_registered_model_alias

        def then_theirs(self: MlflowClient, model: str, alias: str, version: str) -> None:
            move(self, model, alias, version)
            move(self, model, alias, str(theirs))

        monkeypatch.setattr(MlflowClient, "set_registered_model_alias", then_theirs)
    result = promotion.promote(cfg, version=ours)
    assert not result.passed
    assert result.failures[-1].startswith(f"@production was moved to v{theirs} by another promotion")
    monkeypatch.undo()
    state = registry_state(name)
    assert state["holder"] == theirs and state["from"][ours] is None
    assert (state["pending"] is None) == (when == "gates")
    assert promotion.promote(cfg, version=theirs).passed  # drops a pending tag of ours, records nothing new
    assert registry_state(name)["pending"] is None


def test_lock_file_beside_a_local_store_none_for_a_remote_one(tmp_path: Path) -> None:
    name = "breastscan-x"
    assert promotion.promotion_lock_path(f"sqlite:///{tmp_path}/m.db", name) == tmp_path / "m.db.locks" / \
        "breastscan-x.lock"
    assert promotion.promotion_lock_path(f"file://{tmp_path}/mlruns", name) == tmp_path / "mlruns.locks" / \
        "breastscan-x.lock"
    assert promotion.promotion_lock_path(str(tmp_path / "mlruns"), name) == tmp_path / "mlruns.locks" / \
        "breastscan-x.lock"
    for remote in ("http://127.0.0.1:5000", "https://mlflow.example", "postgresql://u@h/db", "sqlite://",
                   "databricks"):
        assert promotion.promotion_lock_path(remote, name) is None, remote
