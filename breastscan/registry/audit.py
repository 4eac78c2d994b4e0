"""The audit trail of the registry: who moved which stage, when, why, and on what numbers.

Every promotion, refused promotion, rollback (and refused rollback) and every live swap of a
running service is one :class:`Event`. Each event is **one MLflow run** of the experiment
``breastscan-audit`` (:data:`AUDIT_EXPERIMENT`), written once and never edited: its tags hold
the fields (``audit.model``, ``audit.kind``, ``audit.who`` ...) for searching and for the
MLflow UI, and the whole event as JSON (``audit.event.0``, ``audit.event.1`` ... : MLflow
cuts a run tag at 8000 characters, so long events are split). Nothing goes to the artifact
store, so the trail works wherever runs do (SQLite, a tracking server, PostgreSQL) and a
process that has only ``MLFLOW_TRACKING_URI`` (a service) can write it.

Who (:func:`actor`) is ``$BREASTSCAN_ACTOR`` when set (a release job sets it to the identity
that triggered it), else the OS user. Unlike the other runs of the project, which carry no
names of people or machines, an audit event names both: that is what it is for.

An event with an ``event_id`` already in the trail is not written again (:func:`write_event`),
so an interrupted promotion finished later (:func:`breastscan.registry.promotion.finish_pending`)
records its event exactly once.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from breastscan.jsonable import finite_float, fmt_number

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

log = logging.getLogger(__name__)

AUDIT_EXPERIMENT = "breastscan-audit"
"""The MLflow experiment holding one run per audit event."""
ACTOR_ENV = "BREASTSCAN_ACTOR"
"""Environment variable naming who acts (a release job's identity); else the OS user."""
KINDS = ("promote", "refuse", "rollback", "rollback_refused", "swap", "swap_refused")
"""Event kinds: a promotion, a refused promotion, a rollback, a refused rollback, a running
service swapping the version it serves, a service refusing to swap."""
STAGE_KINDS = ("promote", "rollback")
"""Kinds that move a stage (alias) onto ``to_version``."""
TAG_PREFIX = "audit."
MAX_REASON = 1000
"""Most characters of a reason (it travels in registry tags, which MLflow limits)."""
_EVENT_CHUNK = 7000
"""Characters of the event's JSON per run tag (MLflow truncates a run tag beyond 8000)."""
_REGISTERED_PREFIX = "breastscan-"


@dataclass(frozen=True)
class GateResult:
    """One gate of a promotion or rollback, with its numbers.

    Attributes:
        name: ``floor:macro_auc``, ``regression:accuracy``, ``same_split`` ...
        passed: whether it passed.
        value: the candidate's value (``None`` for a gate without numbers).
        threshold: the value it had to reach (``None`` likewise).
        detail: the sentence :mod:`breastscan.registry.promotion` printed for it.
    """

    name: str
    passed: bool
    value: float | None = None
    threshold: float | None = None
    detail: str = ""

    def text(self) -> str:
        """``floor:macro_auc 0.610 < 0.700 FAIL`` (or ``same_split ok``)."""
        verdict = "ok" if self.passed else "FAIL"
        if self.value is None or self.threshold is None:
            return f"{self.name} {verdict}"
        sign = ">=" if self.value >= self.threshold else "<"
        return f"{self.name} {fmt_number(self.value)} {sign} {fmt_number(self.threshold)} {verdict}"


@dataclass(frozen=True)
class Event:
    """One audit event.

    Attributes:
        model: registered model name (``breastscan-tumor``).
        kind: one of :data:`KINDS`.
        stage: the stage (alias) concerned, e.g. ``production``.
        from_version: the version holding (or served at) the stage before; ``None`` if none.
        to_version: the version moved to (promote, rollback, swap), or refused (refuse,
            rollback_refused, swap_refused).
        when: UTC ISO time with milliseconds.
        who: :func:`actor` of the process that acted.
        host: the host name of that process.
        git_commit: the code version that acted (``unknown`` outside a git checkout).
        gates: each gate's result with its numbers (empty where none ran).
        reason: free text (required for a rollback).
        forced: failed gates were overridden (``--force``).
        event_id: unique id (a promotion finished after an interruption reuses it).
        run_id: the MLflow run holding the event (``None`` until written).
    """

    model: str
    kind: str
    stage: str
    from_version: int | None
    to_version: int | None
    when: str
    who: str
    host: str
    git_commit: str
    gates: tuple[GateResult, ...] = ()
    reason: str | None = None
    forced: bool = False
    event_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (gates as a list of dicts)."""
        out = asdict(self)
        out["gates"] = [asdict(g) for g in self.gates]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Event:
        """The inverse of :meth:`to_dict` (unknown keys are ignored)."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        gates = tuple(_gate_result(g["name"], g["passed"], g.get("value"), g.get("threshold"),
                                   g.get("detail")) for g in data.get("gates") or ())
        return cls(**{**known, "gates": gates})

    @property
    def failed(self) -> list[GateResult]:
        """The gates that failed."""
        return [g for g in self.gates if not g.passed]

    def gates_text(self) -> str:
        """Every gate with its numbers, ``; ``-separated (empty when no gate ran)."""
        return "; ".join(g.text() for g in self.gates)

    def short(self) -> str:
        """``promote by alice at 2026-01-02T03:04:05Z``: the version tag ``audit.last``."""
        forced = " (forced)" if self.forced else ""
        return f"{self.kind}{forced} by {self.who} at {self.when[:19]}Z"


def registered_name(model: str) -> str:
    """``tumor`` or ``breastscan-tumor`` -> ``breastscan-tumor``."""
    return model if model.startswith(_REGISTERED_PREFIX) else _REGISTERED_PREFIX + model


def actor() -> str:
    """Who acts: ``$BREASTSCAN_ACTOR`` when set and not empty, else the OS user (else ``uid N``)."""
    named = os.environ.get(ACTOR_ENV, "").strip()
    if named:
        return named
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry or login name
        return f"uid {os.getuid()}"


@lru_cache(maxsize=1)
def code_commit() -> str:
    """The git commit of the checkout this ``breastscan`` package runs from (``unknown``: none)."""
    from breastscan.provenance import git_state

    commit, _ = git_state(Path(__file__).resolve().parent)
    return commit or "unknown"


def gates_from_checks(checks: Iterable[Mapping[str, Any]]) -> tuple[GateResult, ...]:
    """Gate results from the ``checks`` of a :class:`~breastscan.registry.promotion.PromotionResult`
    (``gate``, ``candidate``, ``threshold``, ``ok``, ``detail``)."""
    return tuple(_gate_result(c["gate"], c["ok"], c.get("candidate"), c.get("threshold"), c.get("detail"))
                 for c in checks)


def _gate_result(name: Any, passed: Any, value: Any, threshold: Any, detail: Any) -> GateResult:
    return GateResult(name=str(name), passed=bool(passed), value=finite_float(value),
                      threshold=finite_float(threshold), detail=str(detail or ""))


def clean_reason(reason: str | None, *, required: bool = False) -> str | None:
    """A reason stripped of surrounding blanks (``None`` when empty).

    Raises:
        ValueError: empty while ``required``, or longer than :data:`MAX_REASON`.
    """
    text = (reason or "").strip() or None
    if required and text is None:
        raise ValueError("a rollback needs a reason")
    if text is not None and len(text) > MAX_REASON:
        raise ValueError(f"a reason of {len(text)} characters is too long for the audit trail (at most "
                         f"{MAX_REASON}): point to a ticket or document instead")
    return text


def new_event(model: str, kind: str, *, stage: str, from_version: int | None, to_version: int | None,
              gates: Sequence[GateResult] = (), reason: str | None = None, forced: bool = False,
              who: str | None = None, git_commit: str | None = None) -> Event:
    """An event of this process, now (not written yet; see :func:`write_event`).

    Raises:
        ValueError: an unknown kind, a rollback without a reason, a reason over :data:`MAX_REASON`.
    """
    if kind not in KINDS:
        raise ValueError(f"audit event kind {kind!r} is not one of {', '.join(KINDS)}")
    reason = clean_reason(reason, required=kind == "rollback")
    return Event(model=registered_name(model), kind=kind, stage=stage,
                 from_version=None if from_version is None else int(from_version),
                 to_version=None if to_version is None else int(to_version),
                 when=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                 who=who or actor(), host=socket.gethostname(), git_commit=git_commit or code_commit(),
                 gates=tuple(gates), reason=reason, forced=bool(forced))


def record_event(model: str, kind: str, *, stage: str = "production", from_version: int | None = None,
                 to_version: int | None = None, gates: Sequence[GateResult] = (), reason: str | None = None,
                 forced: bool = False, who: str | None = None, git_commit: str | None = None,
                 client: MlflowClient | None = None) -> Event:
    """Record one event in the audit trail of the tracking store MLflow is configured with.

    Needs nothing but ``MLFLOW_TRACKING_URI`` (or :func:`breastscan.registry.tracking.configure`):
    a running service records its live swaps with
    ``record_event("tumor", "swap", from_version=3, to_version=4, reason="...")``.

    Args:
        model: ``tumor`` or ``breastscan-tumor``.
        kind: one of :data:`KINDS`.
        stage: the stage (alias) concerned.
        from_version: the version before (``None``: none).
        to_version: the version after, or the one refused.
        gates: the gates that ran, with their numbers.
        reason: free text (required for ``rollback``).
        forced: failed gates were overridden.
        who: default :func:`actor`.
        git_commit: default :func:`code_commit`.
        client: an MLflow client (default: a new one).

    Returns:
        The event as written (``run_id`` set).

    Raises:
        ValueError: an unknown kind, a rollback without a reason, a reason over :data:`MAX_REASON`.
        mlflow.exceptions.MlflowException: the store refused the write (nothing is retried).
    """
    event = new_event(model, kind, stage=stage, from_version=from_version, to_version=to_version,
                      gates=gates, reason=reason, forced=forced, who=who, git_commit=git_commit)
    return write_event(event, client)


def _client(client: MlflowClient | None) -> MlflowClient:
    from mlflow import MlflowClient

    return client or MlflowClient()


def audit_experiment_id(client: MlflowClient | None = None, *, create: bool = True) -> str | None:
    """The id of :data:`AUDIT_EXPERIMENT` (created, or restored if deleted, when ``create``).

    Returns:
        The id, or ``None`` when it does not exist and ``create`` is false.
    """
    from mlflow.exceptions import MlflowException

    client = _client(client)
    exp = client.get_experiment_by_name(AUDIT_EXPERIMENT)
    if exp is None and create:
        try:
            return str(client.create_experiment(AUDIT_EXPERIMENT))
        except MlflowException as exc:  # created meanwhile by another process
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
            exp = client.get_experiment_by_name(AUDIT_EXPERIMENT)
    if exp is None:
        return None
    if exp.lifecycle_stage == "deleted" and create:
        log.warning("the audit experiment %s was deleted; restoring it", AUDIT_EXPERIMENT)
        client.restore_experiment(exp.experiment_id)
    return str(exp.experiment_id)


def _tags(event: Event) -> dict[str, str]:
    """The run tags of an event: its fields, then its JSON in chunks."""
    fields = {"model": event.model, "kind": event.kind, "stage": event.stage, "who": event.who,
              "when": event.when, "host": event.host, "git_commit": event.git_commit,
              "from_version": str(event.from_version or ""), "to_version": str(event.to_version or ""),
              "forced": str(event.forced).lower(), "reason": event.reason or "",
              "gates_failed": ", ".join(g.name for g in event.failed), "event_id": event.event_id}
    tags = {TAG_PREFIX + k: v for k, v in fields.items()}
    text = json.dumps({**event.to_dict(), "run_id": None}, separators=(",", ":"))
    chunks = [text[i:i + _EVENT_CHUNK] for i in range(0, len(text), _EVENT_CHUNK)]
    tags.update({f"{TAG_PREFIX}event.{i}": chunk for i, chunk in enumerate(chunks)})
    tags[TAG_PREFIX + "event.parts"] = str(len(chunks))
    return tags


def write_event(event: Event, client: MlflowClient | None = None) -> Event:
    """Write an event as a new run of the audit experiment, unless its ``event_id`` is there already.

    Returns:
        The event with ``run_id`` set (the existing run's when it was written before).
    """
    client = _client(client)
    experiment_id = audit_experiment_id(client)
    assert experiment_id is not None
    found = _search(client, experiment_id, f"tags.`{TAG_PREFIX}event_id` = '{_quote(event.event_id)}'")
    if found:
        log.info("audit event %s is in the trail already (run %s)", event.event_id, found[0].info.run_id)
        return replace(event, run_id=found[0].info.run_id)
    when = datetime.fromisoformat(event.when)
    run = client.create_run(experiment_id, start_time=int(when.timestamp() * 1000), tags=_tags(event),
                            run_name=f"{event.kind} {event.model} v{event.to_version or '-'} @{event.stage}")
    try:
        client.set_terminated(run.info.run_id, "FINISHED")
    except Exception as exc:  # the event is written; a RUNNING status is cosmetic
        log.warning("audit run %s not marked finished (%s)", run.info.run_id, exc)
    log.info("audit: %s %s %s -> %s @%s by %s", event.kind, event.model, event.from_version,
             event.to_version, event.stage, event.who)
    return replace(event, run_id=run.info.run_id)


def read_events(model: str, *, stage: str | None = None, client: MlflowClient | None = None) -> list[Event]:
    """Every audit event of a model, oldest first (one indexed search of the audit experiment).

    Args:
        model: ``tumor`` or ``breastscan-tumor``.
        stage: only the events of this stage (default: all).
        client: an MLflow client (default: a new one).

    Returns:
        The events, in time order (``run_id`` set); ``[]`` when there is no trail yet.
    """
    client = _client(client)
    experiment_id = audit_experiment_id(client, create=False)
    if experiment_id is None:
        return []
    query = f"tags.`{TAG_PREFIX}model` = '{_quote(registered_name(model))}'"
    if stage is not None:
        query += f" and tags.`{TAG_PREFIX}stage` = '{_quote(stage)}'"
    events = [e for e in (_event_of(run) for run in _search(client, experiment_id, query)) if e is not None]
    return sorted(events, key=lambda e: datetime.fromisoformat(e.when))


def _event_of(run: Run) -> Event | None:
    """The event a run holds, or ``None`` (logged) when its JSON is missing or unreadable."""
    tags = run.data.tags
    try:
        parts = int(tags[TAG_PREFIX + "event.parts"])
        text = "".join(tags[f"{TAG_PREFIX}event.{i}"] for i in range(parts))
        return replace(Event.from_dict(json.loads(text)), run_id=run.info.run_id)
    except (KeyError, ValueError, TypeError) as exc:
        log.warning("audit run %s holds no readable event (%s); skipped", run.info.run_id, exc)
        return None


def _search(client: MlflowClient, experiment_id: str, query: str) -> list[Run]:
    """Every run of the experiment matching ``query`` (all pages)."""
    runs: list[Run] = []
    token: str | None = None
    while True:
        page = client.search_runs([experiment_id], filter_string=query, max_results=1000,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _quote(text: str) -> str:
    return text.replace("'", "''")
