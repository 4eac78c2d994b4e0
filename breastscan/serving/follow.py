"""A running service follows the registry stage: a version promoted (or rolled back) is swapped in live.

With ``models: auto`` outside a Bento (``follow:`` in ``services/serving.yaml``), every
worker runs one :class:`StageFollower` on its event loop. Every ``poll_s`` seconds it reads
which version holds ``@<stage>`` of every breastscan model (one registry call,
:meth:`MlflowRegistry.holders`); for a served model whose alias moved it

1. downloads that version **by number** and loads it off the event loop, with one warm-up
   prediction (:meth:`MlflowRegistry.load`, through :func:`breastscan.registry.resolver.fetch`);
2. checks its contract against the served one (:func:`contract_change`: same task, modality
   and classes, since clients branch on them); a change is refused -- the served version goes
   on serving -- logged, counted (``breastscan_model_swaps_total{outcome="refused"}``) and
   recorded in the audit trail (``swap_refused``), once per version;
3. builds the version's slot (its own batcher and explainer) and serves it with one
   assignment (:meth:`breastscan.serving.engine.Engine.replace`): a request admitted before
   finishes on the old version, one admitted after runs on the new, no batch mixes them, and
   the old batcher closes once its requests are done (:meth:`~breastscan.serving.engine.Engine.retire`);
4. records an audit ``swap`` event (who: :data:`SERVICE_ACTOR`; the host; the worker's pid in
   the reason).

A served model whose alias is removed is withdrawn: its requests are answered
``model_withdrawn`` until a version holds the stage again. A model that gets the stage for
the first time is not served until the service restarts (its routes are fixed when the
service is built): logged once. Registry errors are logged and the worker goes on serving
what it has; a version that failed to load is tried again after :data:`RETRY_POLLS` polls.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from breastscan.serving.engine import Engine, ModelSlot, ServedModel, warm_up
from breastscan.serving.store import PREFIX, store_name

if TYPE_CHECKING:
    from breastscan.bundle import ModelBundle, ModelContract
    from breastscan.serving.metrics import ServiceMetrics

log = logging.getLogger(__name__)

SERVICE_ACTOR = "breastscan-service"
"""Who the audit trail names for a swap a service made (the event also names its host)."""
RETRY_POLLS = 6
"""Polls to wait before trying again a version that failed to download or load."""


@dataclass(frozen=True)
class Candidate:
    """A registry version downloaded, loaded and warmed, not served yet.

    Attributes:
        served: what the engine would know of it (spec, contract, version, stage).
        bundle: the loaded model (:class:`breastscan.bundle.ModelBundle` in the service).
    """

    served: ServedModel
    bundle: Any


class Registry(Protocol):
    """Where a follower reads the stage and gets versions (:class:`MlflowRegistry` in the service)."""

    def connect(self) -> str:
        """Point at the registry and name it; raises ``LookupError`` when there is none."""
        ...

    def holders(self, stage: str) -> Mapping[str, int | None]:
        """Every registered breastscan model: the version holding ``@stage``, ``None`` when none does."""
        ...

    def load(self, model: str, version: int, stage: str) -> Candidate:
        """Download, load and warm one version (blocking: called on a thread)."""
        ...

    def record(self, model: str, kind: str, *, stage: str, from_version: int | None,
               to_version: int | None, reason: str) -> None:
        """Add one event to the audit trail (blocking: called on a thread)."""
        ...


class MlflowRegistry:
    """The MLflow registry of ``$MLFLOW_TRACKING_URI``, else the project store in the working directory.

    Args:
        root: the project directory whose ``mlflow.db`` is used without ``$MLFLOW_TRACKING_URI``.
        runtime: which runtime runs a downloaded version (``auto``: its export when it has one;
            :meth:`breastscan.bundle.ModelBundle.load`).
    """

    def __init__(self, root: Path | None = None, runtime: str = "auto") -> None:
        self.root = Path.cwd() if root is None else root
        self.runtime = runtime

    def connect(self) -> str:
        """Point MLflow (this process) at the registry and name it.

        Raises:
            LookupError: no tracking URI is set and the project has no store, or a local
                store's file is missing (MLflow would create an empty one).
        """
        from breastscan.registry import tracking

        uri = tracking.tracking_uri(self.root)
        local = _local_path(uri) if tracking.is_local_store(uri) else None
        if local is not None and not local.exists():
            raise LookupError(f"no registry: {uri} does not exist (set MLFLOW_TRACKING_URI)")
        return tracking.configure(self.root)

    def holders(self, stage: str) -> dict[str, int | None]:
        """Every ``breastscan-*`` registered model: the version holding ``@stage`` (``None``: none)."""
        from mlflow import MlflowClient

        models = MlflowClient().search_registered_models(filter_string=f"name LIKE '{PREFIX}%'",
                                                         max_results=1000)
        out: dict[str, int | None] = {}
        for m in models:
            held = (m.aliases or {}).get(stage)
            out[m.name[len(PREFIX):]] = None if held is None else int(held)
        return out

    def load(self, model: str, version: int, stage: str) -> Candidate:
        """Download version ``version`` of ``model`` (by number), load it and predict once.

        Raises:
            breastscan.registry.resolver.RegistryError: no such version.
            FileNotFoundError: it holds no breastscan bundle.
        """
        from breastscan.registry.resolver import ModelRef, fetch_and_load

        ref = ModelRef(name=model, registered_name=store_name(model), version=version, alias=None)
        bundle: ModelBundle = fetch_and_load(ref, runtime=self.runtime)[1]
        warm_up(bundle)
        served = ServedModel(name=model, spec=bundle.spec, contract=bundle.contract, version=str(version),
                             stage=stage, source=f"models:/{store_name(model)}@{stage}")
        return Candidate(served, bundle)

    def record(self, model: str, kind: str, *, stage: str, from_version: int | None,
               to_version: int | None, reason: str) -> None:
        """One audit event by :data:`SERVICE_ACTOR` (:func:`breastscan.registry.audit.record_event`)."""
        from breastscan.registry import audit

        audit.record_event(model, kind, stage=stage, from_version=from_version, to_version=to_version,
                           reason=reason, who=SERVICE_ACTOR)


def _local_path(uri: str) -> Path:
    """The file or directory of a local store's URI (``sqlite:///...``, ``file://...`` or a path)."""
    for scheme in ("sqlite:///", "file://", "file:"):
        if uri.startswith(scheme):
            return Path(uri[len(scheme):])
    return Path(uri)


def contract_change(served: ModelContract, candidate: ModelContract) -> str | None:
    """What clients would see change if ``candidate`` replaced ``served``: task, modality or
    classes (in order); ``None`` when nothing does (spec, weights, calibration may change)."""
    for what, old, new in (("task", served.task, candidate.task),
                           ("modality", served.modality, candidate.modality),
                           ("classes", tuple(served.class_names), tuple(candidate.class_names))):
        if old != new:
            return f"its {what} would change from {old!r} to {new!r}"
    return None


def _number(version: str | None) -> int | None:
    """A served version's registry number (``None`` when unknown)."""
    return int(version) if version and version.isdigit() else None


class StageFollower:
    """Keeps one worker's engine on the versions that hold the registry stage (see the module).

    Args:
        engine: the worker's engine.
        registry: where the stage is read and versions are loaded.
        make_slot: a loaded version's slot in this worker (its batcher, explainer); called on a thread.
        stage: the alias followed (``production``).
        poll_s: seconds between two looks at the registry.
        retire_s: longest wait for a replaced version's requests before its batcher closes.
        metrics: counts every swap, refusal, failure and withdrawal.
        on_retired: called (on the event loop) after a replaced version's batcher closed.
    """

    def __init__(self, engine: Engine, registry: Registry, make_slot: Callable[[Candidate], ModelSlot], *,
                 stage: str, poll_s: float, retire_s: float, metrics: ServiceMetrics | None = None,
                 on_retired: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self.registry = registry
        self.make_slot = make_slot
        self.stage = stage
        self.poll_s = float(poll_s)
        self.retire_s = float(retire_s)
        self.metrics = metrics
        self.on_retired = on_retired
        self._refused: dict[str, int] = {}
        self._failed: dict[str, tuple[int, float]] = {}
        self._unserved_logged: set[str] = set()
        self._down = False
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def routes(self) -> set[str]:
        """The models this worker answers for, served or withdrawn (fixed when it was built)."""
        return set(self.engine.slots) | set(self.engine.withdrawn)

    async def run(self) -> None:
        """Follow the stage until cancelled: connect, look at once, then every ``poll_s``.

        Following stops (logged) when there is no registry, it cannot be read at the first
        look, or it holds none of the served models (the wrong registry).
        """
        try:
            uri = await asyncio.to_thread(self.registry.connect)
            holders = await asyncio.to_thread(self.registry.holders, self.stage)
        except Exception as exc:  # noqa: BLE001 -- whatever the cause, serving goes on
            log.warning("not following the registry stage @%s: %s", self.stage, exc)
            return
        if not self.routes & set(holders):
            log.warning("not following @%s: the registry %s holds none of the served models (%s)",
                        self.stage, uri, ", ".join(sorted(self.routes)))
            return
        log.info("following @%s of %s in %s every %g s", self.stage, ", ".join(sorted(self.routes)), uri,
                 self.poll_s)
        await self.apply(holders)
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.poll()
            except Exception:  # noqa: BLE001 -- a fault here must not end following, nor serving
                log.exception("following @%s: this poll failed", self.stage)

    async def poll(self) -> bool:
        """One look at the registry and the changes it calls for.

        Returns:
            Whether the registry could be read (a failure is logged once per outage).
        """
        try:
            holders = await asyncio.to_thread(self.registry.holders, self.stage)
        except Exception as exc:  # noqa: BLE001 -- a registry outage must not stop serving
            if not self._down:
                log.warning("cannot read the registry (serving the versions loaded): %s", exc)
            self._down = True
            return False
        if self._down:
            log.info("the registry is readable again")
            self._down = False
        await self.apply(holders)
        return True

    async def apply(self, holders: Mapping[str, int | None]) -> None:
        """Swap, withdraw or leave each served model by ``holders`` (model -> version at the stage)."""
        self._log_unserved(holders)
        for name in sorted(self.routes):
            if name in holders:  # a model unknown to the registry is left as it is
                await self._follow(name, holders[name])

    async def close(self) -> None:
        """Wait for the retirements under way (tests; the service's shutdown closes every batcher)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # ------------------------------------------------------------------ one model
    async def _follow(self, name: str, version: int | None) -> None:
        # No slot is held across an await here: a replaced version must become unreachable.
        current = self.engine.models.get(name)  # None: withdrawn
        if version is None:
            if current is not None:
                await self._withdraw(name, current)
            return
        if current is not None and current.version == str(version):
            return
        if self._refused.get(name) == version or self._waiting(name, version):
            return
        await self._swap(name, version, current or self.engine.withdrawn[name])

    def _waiting(self, name: str, version: int) -> bool:
        """Whether ``version`` failed to load lately (tried again after :data:`RETRY_POLLS` polls)."""
        failed = self._failed.get(name)
        return failed is not None and failed[0] == version and time.monotonic() < failed[1]

    async def _swap(self, name: str, version: int, current: ServedModel) -> None:
        """Load ``version`` of ``name``, check it against ``current`` (the version served, or the
        last one before a withdrawal) and serve it."""
        before = current.version if name in self.engine.slots else None
        try:
            candidate = await asyncio.to_thread(self.registry.load, name, version, self.stage)
            change = contract_change(current.contract, candidate.served.contract)
            if change is not None:
                await self._refuse(name, version, before, change)
                return
            slot = await asyncio.to_thread(self.make_slot, candidate)
        except Exception:  # noqa: BLE001 -- the served version goes on serving
            log.exception("%s v%d (now @%s) could not be loaded: still serving v%s", name, version,
                          self.stage, before)
            self._failed[name] = (version, time.monotonic() + RETRY_POLLS * self.poll_s)
            self._count(name, "failed")
            return
        self._retire_later(self.engine.replace(name, slot))
        del slot  # the engine holds it
        self._failed.pop(name, None)
        log.info("%s: now serving v%d (was v%s): @%s moved", name, version, before, self.stage)
        self._count(name, "swapped")
        await self._record(name, "swap", before, version,
                           f"@{self.stage} moved to v{version}; worker {os.getpid()} now serves v{version}")

    async def _refuse(self, name: str, version: int, before: str | None, change: str) -> None:
        self._refused[name] = version
        serving = f"still serving v{before}" if before else "not serving it"
        log.error("%s v%d (now @%s) not served: %s; %s (a change of contract needs a new model name, or "
                  "a restart)", name, version, self.stage, change, serving)
        self._count(name, "refused")
        await self._record(name, "swap_refused", before, version,
                           f"@{self.stage} moved to v{version}, but {change}; worker {os.getpid()} {serving}")

    async def _withdraw(self, name: str, current: ServedModel) -> None:
        self._retire_later(self.engine.withdraw(name))
        version = current.version
        log.warning("%s: no version holds @%s any more: v%s withdrawn (answered model_withdrawn)", name,
                    self.stage, version)
        self._count(name, "withdrawn")
        await self._record(name, "swap", version, None,
                           f"@{self.stage} removed; worker {os.getpid()} no longer serves {name}")

    def _retire_later(self, slot: ModelSlot | None) -> None:
        """Retire a replaced or withdrawn slot in the background (nothing for ``None``)."""
        if slot is not None:
            self._spawn(self._retire(slot))

    async def _retire(self, slot: ModelSlot) -> None:
        """Close the slot's batcher after its requests, drop it, then :attr:`on_retired`."""
        served = slot.served
        if not await self.engine.retire(slot, self.retire_s):
            log.warning("%s v%s: %d requests still running after %g s; its batcher closed", served.name,
                        served.version, slot.in_flight, self.retire_s)
        del slot  # the last reference: on_retired may collect the version
        if self.on_retired is not None:
            self.on_retired()

    # ------------------------------------------------------------------ reporting
    def _log_unserved(self, holders: Mapping[str, int | None]) -> None:
        """Log once each model at the stage that this service has no route for."""
        for name in sorted(set(holders) - self.routes - self._unserved_logged):
            if holders[name] is not None:
                self._unserved_logged.add(name)
                log.warning("%s v%s holds @%s but is not served: the routes are fixed when the service "
                            "starts; restart it (`make serve` imports and serves it)", name, holders[name],
                            self.stage)

    def _count(self, name: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.count_swap(name, outcome)

    async def _record(self, name: str, kind: str, before: str | None, after: int | None, reason: str) -> None:
        """One audit event, on a thread; a registry error is logged, never raised."""
        try:
            await asyncio.to_thread(self.registry.record, name, kind, stage=self.stage,
                                    from_version=_number(before), to_version=after, reason=reason)
        except Exception as exc:  # noqa: BLE001 -- the audit trail must not stop serving
            log.warning("audit event %s of %s not recorded: %s", kind, name, exc)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
