"""Promotion through quality gates: move a registry stage (alias) only when the gates pass.

Gates come from the model's declaration in params.yaml (``gates``): **floors** on the
candidate's registered metrics, and **no regression** beyond ``max_regression`` against
the version now holding the stage, compared on the same test split (the current version is
re-scored on the candidate's split when the two differ, through the one scoring core).

**Concurrency.** The whole of a promotion (read the alias holder, run the gates, move the
alias, record it) runs under one inter-process lock per registered model
(:func:`promotion_lock`): a :mod:`filelock` (``flock``) file beside a local store
(``sqlite:///<db>`` -> ``<db>.locks/<model>.lock``; a file store likewise), so concurrent
promotions of one model are serialised and each one's gates compare against the version that
really holds the alias. ``flock`` dies with its process: a killed promotion leaves no stale
lock. A remote store (``http(s)://``, a database server) has no shared file; there promotions
rely on an optimistic check only: the alias is re-read just before and just after it is moved,
and a promotion that finds it moved by someone else reports a failure (nothing of its own is
recorded; promote again). That narrows the race without closing it (MLflow has no
compare-and-set; two concurrent writes of the pending tag below can also make one promotion
raise, before its alias moves), so against a server run the promotions of one model from one
place at a time.

**Interruption.** A promotion writes, in this order (what a reader sees after each write):

1. registered-model tag ``promotion_pending.<alias>`` = ``{"version", "previous", "at"}``:
   nothing else changed yet; the tag says a promotion of that alias is under way.
2. the alias -> the candidate: the commit point. ``models:/<name>@<alias>`` resolves to the
   candidate from here on.
3. the candidate's ``promoted_at``/``promoted_from``/``promoted_to`` tags: until then the
   holder's tags are missing or left from an older promotion of it.
4. the audit event (:mod:`breastscan.registry.audit`; its id travels in the pending tag, so
   it is written once however often this step runs), then the version's ``audit.last`` tag
   and the note of this stage change in its description.
5. the classic stage mirror (best effort): until then ``models:/<name>/Production`` (old
   clients) still resolves to the previous version.
6. the pending tag is deleted: the promotion is complete.

While ``promotion_pending.<alias>`` exists, only the alias is to be trusted. A promotion
killed or failing anywhere in between leaves the old state (before 2) or the new one (from
2), and the next promotion of the model, under the lock and before reading the holder,
finishes it (:func:`finish_pending`): alias on the pending version -> writes 3-6 again
(idempotent, with the recorded ``previous``, time and event); otherwise the alias never moved
and the tag is dropped.

**Rollback** (:func:`rollback`) moves a stage back to a version that held it before, through
the same lock and writes: the no-regression gate is skipped (going back is the point), the
absolute gates (floors, every class predicted) still apply unless forced. A refused promotion
or rollback changes nothing but is an audit event too, with every gate's numbers.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import mlflow
from filelock import FileLock, Timeout

from breastscan.jsonable import fmt_number
from breastscan.registry import audit
from breastscan.registry.modelcard import report_metric
from breastscan.registry.resolver import RegistryError, alias_holder, get_version, load_bundle
from breastscan.registry.tracking import is_local_store
from breastscan.registry.versions import (
    PRODUCTION,
    STAGING,
    TAG_AUDIT_LAST,
    TAG_NEVER_PREDICTED,
    TAG_SPLIT,
    gated_metrics,
    mirror_stage,
    model_versions,
    registry_client,
    set_stage_note,
    version_metrics,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from breastscan.bundle import ModelBundle
    from breastscan.config import ModelConfig

log = logging.getLogger(__name__)

PENDING_TAG_PREFIX = "promotion_pending."
"""Registered-model tag ``promotion_pending.<alias>``: a promotion of that alias is under way
(or was interrupted); see the module docstring."""
PENDING_EVENT_LIMIT = 4000
"""Characters of the audit event in the pending tag above which its gates' sentences are left out."""
LOCK_TIMEOUT_S = 3600.0
"""How long a promotion waits for another promotion of the same model (its gates may re-score)."""


@dataclass
class PromotionResult:
    """Outcome of :func:`promote` or :func:`rollback`.

    Attributes:
        name: registered model name.
        version: the candidate version (a rollback's target).
        to: the target alias.
        passed: the alias now points at ``version``: every gate passed, or a forced
            rollback overrode the failed ones (``forced``).
        previous: the version that held the alias before (``None`` if none did).
        checks: one dict per gate: ``gate``, ``metric``, ``candidate``, ``threshold``,
            ``ok``, ``detail``.
        failures: one line per failed gate, with the numbers.
        reevaluated: the previous version was re-scored on the candidate's test split.
        kind: ``promote`` or ``rollback``.
        forced: failed gates were overridden (a rollback with ``force``).
    """

    name: str
    version: int
    to: str
    passed: bool
    previous: int | None = None
    checks: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    reevaluated: bool = False
    kind: str = "promote"
    forced: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return asdict(self)


def _check(result: PromotionResult, gate: str, metric: str | None, candidate: float | None,
           threshold: float | None, ok: bool, detail: str) -> None:
    result.checks.append({"gate": gate, "metric": metric, "candidate": candidate, "threshold": threshold,
                          "ok": ok, "detail": detail})
    if not ok:
        result.failures.append(detail)


def promote(cfg: ModelConfig, *, version: int | None = None, to: str = PRODUCTION,
            evaluate: Callable[[ModelBundle], Mapping[str, Any]] | None = None,
            reason: str | None = None, who: str | None = None) -> PromotionResult:
    """Move alias ``to`` onto a version if the quality gates pass.

    Gates (from ``cfg.gates``):

    * **floors**: each metric in ``floors`` of the candidate (its version tags) >= floor.
    * **no regression**: if another version holds ``to``, for each floored metric and the
      headline, candidate >= current - ``max_regression``, on the same test split: when
      the ``split_id`` tags differ, ``evaluate(current bundle)`` re-scores the current
      version on the candidate's split; without ``evaluate`` the promotion is refused.

    On success the alias moves, the classic stage is mirrored when supported (older
    versions archived) and the version is tagged ``promoted_at``/``promoted_from``/
    ``promoted_to``, and a ``promote`` audit event is recorded. On failure nothing changes
    but a ``refuse`` audit event, with every gate's numbers. The whole runs under
    :func:`promotion_lock` and first finishes an interrupted promotion (:func:`finish_pending`);
    see the module docstring.

    Args:
        cfg: the model's configuration (name, headline, gates).
        version: the candidate; ``None`` = the version holding ``@staging``.
        to: target alias (``production``).
        evaluate: ``bundle -> metrics`` on the candidate's test split (metric name -> value).
        reason: why, for the audit trail (optional).
        who: who acts, for the audit trail (default :func:`breastscan.registry.audit.actor`).

    Returns:
        The result; ``passed`` says whether the alias moved.

    Raises:
        RegistryError: no such version, or no version holds ``@staging``.
        ValueError: a reason longer than :data:`breastscan.registry.audit.MAX_REASON`.
        Exception: whatever ``evaluate`` raises is passed on (nothing has changed then).
    """
    audit.clean_reason(reason)
    client = registry_client()
    name = cfg.registered_name
    with promotion_lock(name):
        candidate = get_version(client, name, version, STAGING)
        finish_pending(client, name, to)
        result = _gate(client, cfg, candidate, to, evaluate)
        if result.passed and result.previous != result.version:
            _move_alias(client, result, _event(result, "promote", reason, who))
        if not result.passed:
            _record_refusal(client, result, reason, who)
    return result


def rollback(cfg: ModelConfig, *, reason: str, to_version: int | None = None, stage: str = PRODUCTION,
             force: bool = False, who: str | None = None) -> PromotionResult:
    """Move stage ``stage`` back to a version that held it before.

    The target is ``to_version``, or by default the version that held the stage before the
    current holder (:func:`rollback_target`). Only the absolute gates run (floors, every
    class predicted), on the target's registered metrics; ``force`` moves the stage despite
    failed ones (the event records it). The alias moves as in :func:`promote`, under the same
    lock and with the same resumable writes; a ``rollback`` audit event is recorded, or a
    ``rollback_refused`` one when a gate refuses.

    Args:
        cfg: the model's configuration (name, gates).
        reason: why (required; goes into the audit trail and the version's description).
        to_version: the version to go back to (default: the previous holder).
        stage: the alias (``production``).
        force: override failed gates.
        who: who acts (default :func:`breastscan.registry.audit.actor`).

    Returns:
        The result; ``passed`` says whether the alias moved, ``forced`` whether gates were overridden.

    Raises:
        ValueError: no reason, or one longer than :data:`breastscan.registry.audit.MAX_REASON`.
        RegistryError: no version holds the stage, no previous holder is on record, or
            ``to_version`` never held the stage (or holds it now).
    """
    audit.clean_reason(reason, required=True)
    client = registry_client()
    name = cfg.registered_name
    with promotion_lock(name):
        finish_pending(client, name, stage)
        current = _holder(client, name, stage)
        if current is None:
            raise RegistryError(f"no version of {name} holds @{stage}: nothing to roll back")
        target = get_version(client, name, rollback_target(client, name, stage, current, to_version), stage)
        result = PromotionResult(name=name, version=int(target.version), to=stage, passed=False,
                                 previous=current, kind="rollback")
        _check_floors(result, cfg, version_metrics(target))
        _check_every_class(result, cfg, target.tags or {})
        result.forced = force and bool(result.failures)
        result.passed = not result.failures or force
        if result.passed:
            _move_alias(client, result, _event(result, "rollback", reason, who))
        if not result.passed:
            _record_refusal(client, result, reason, who)
    return result


def rollback_target(client: MlflowClient, name: str, stage: str, current: int, to_version: int | None) -> int:
    """The version a rollback of ``stage`` goes to, checked against the stage's past holders.

    The past holders are read from the audit trail (promotions and rollbacks of the stage)
    and, for promotions older than the trail, from the versions' ``promoted_to`` /
    ``promoted_from`` tags. Without ``to_version`` the target is the version that held the
    stage before ``current``: the ``from_version`` of the last event that gave ``current``
    the stage, else ``current``'s ``promoted_from`` tag.

    Raises:
        RegistryError: no previous holder on record, or ``to_version`` is ``current`` or
            never held the stage.
    """
    events = [e for e in audit.read_events(name, stage=stage, client=client) if e.kind in audit.STAGE_KINDS]
    tagged = _tagged_holders(client, name, stage)
    if to_version is None:
        reached = [e for e in events if e.to_version == current]
        previous = reached[-1].from_version if reached else tagged.get(current)
        if previous is None:
            raise RegistryError(f"no record of a version of {name} holding @{stage} before v{current} "
                                "(audit trail, promoted_from tag): name one with --to-version")
        return previous
    held = {v for e in events for v in (e.from_version, e.to_version) if v}
    held |= set(tagged) | {v for v in tagged.values() if v}
    if to_version == current:
        raise RegistryError(f"v{to_version} of {name} holds @{stage} already: nothing to roll back")
    if to_version not in held:
        raise RegistryError(
            f"v{to_version} of {name} never held @{stage} (versions on record: "
            f"{', '.join(f'v{v}' for v in sorted(held)) or 'none'}); a rollback only returns to a past "
            f"holder: promote v{to_version} instead, through every gate")
    return to_version


def _tagged_holders(client: MlflowClient, name: str, stage: str) -> dict[int, int | None]:
    """Versions whose ``promoted_to`` tag names ``stage`` -> their ``promoted_from`` (``None``: none)."""
    out: dict[int, int | None] = {}
    for mv in model_versions(client, name):
        tags = mv.tags or {}
        if tags.get("promoted_to") == stage:
            source = tags.get("promoted_from", "none")
            out[int(mv.version)] = int(source) if source.isdigit() else None
    return out


def _event(result: PromotionResult, kind: str, reason: str | None, who: str | None) -> audit.Event:
    """The audit event of a promotion's or rollback's outcome (not written yet)."""
    return audit.new_event(result.name, kind, stage=result.to, from_version=result.previous,
                           to_version=result.version, gates=audit.gates_from_checks(result.checks),
                           reason=reason, forced=result.forced, who=who)


def _record_refusal(client: MlflowClient, result: PromotionResult, reason: str | None,
                    who: str | None) -> None:
    """Record a refused promotion or rollback (nothing else was written) and stamp the refused version."""
    kind = "rollback_refused" if result.kind == "rollback" else "refuse"
    _stamp(client, audit.write_event(_event(result, kind, reason, who), client))


def _stamp(client: MlflowClient, event: audit.Event) -> None:
    """The version's ``audit.last`` tag and, for a stage change, the note in its description."""
    if event.to_version is None:
        return
    client.set_model_version_tag(event.model, str(event.to_version), TAG_AUDIT_LAST, event.short())
    if event.kind in audit.STAGE_KINDS:
        set_stage_note(client, event.model, event.to_version, _stage_note(event))


def _stage_note(event: audit.Event) -> str:
    """``promote to @production at <when> by <who>, from v1. Reason: ... Gates: ...``."""
    verb = {"promote": "promoted", "rollback": "rolled back"}[event.kind]
    forced = f" (forced past {len(event.failed)} failed gate(s))" if event.forced else ""
    text = (f"{verb} to @{event.stage} at {event.when[:19]}Z by {event.who}{forced}, from "
            f"{_v(event.from_version)} (commit {event.git_commit[:12]}).")
    if event.reason:
        text += f" Reason: {event.reason}"
    return text + (f"\n\nGates: {event.gates_text()}." if event.gates else "")


def _gate(client: MlflowClient, cfg: ModelConfig, candidate: ModelVersion, to: str,
          evaluate: Callable[[ModelBundle], Mapping[str, Any]] | None) -> PromotionResult:
    """Run the gates of ``candidate`` against the version now holding ``to`` (nothing is written)."""
    name = cfg.registered_name
    cand_metrics = version_metrics(candidate)
    current = alias_holder(client, name, to)
    previous = int(current.version) if current is not None else None
    result = PromotionResult(name=name, version=int(candidate.version), to=to, passed=False,
                             previous=previous)
    _check_floors(result, cfg, cand_metrics)
    _check_every_class(result, cfg, candidate.tags or {})
    if current is not None and previous != result.version:
        baseline = _baseline(result, cfg, current, (candidate.tags or {}).get(TAG_SPLIT), evaluate)
        if baseline is not None:
            _check_regression(result, cfg, cand_metrics, baseline)
    result.passed = not result.failures
    if not result.passed:
        log.warning("%s v%d not promoted to @%s: %s", name, result.version, to, "; ".join(result.failures))
    elif previous == result.version:
        log.info("%s v%d already holds @%s; nothing to do", name, result.version, to)
    return result


def _check_every_class(result: PromotionResult, cfg: ModelConfig, tags: Mapping[str, str]) -> None:
    if not (cfg.gates.every_class_predicted and cfg.has_classes):
        return
    if TAG_NEVER_PREDICTED not in tags:
        _check(result, "every_class_predicted", None, None, None, False,
               f"v{result.version} does not record which classes it never predicts (registered by an "
               "older version of breastscan): re-register it")
        return
    missing = [c for c in tags[TAG_NEVER_PREDICTED].split(",") if c]
    _check(result, "every_class_predicted", None, None, None, not missing,
           f"v{result.version} never predicts {', '.join(missing)} on its test split (sensitivity 0.000)"
           if missing else f"v{result.version} predicts every class on its test split")


def _check_floors(result: PromotionResult, cfg: ModelConfig, cand_metrics: Mapping[str, float]) -> None:
    for metric, floor in cfg.gates.floors.items():
        value = cand_metrics.get(metric)
        if value is None:
            _check(result, f"floor:{metric}", metric, None, floor, False,
                   f"{metric} missing on v{result.version} (not in its registered metrics)")
        else:
            ok = value >= floor
            _check(result, f"floor:{metric}", metric, value, floor, ok,
                   f"{metric} {fmt_number(value)} {'>=' if ok else '<'} floor {fmt_number(floor)}")


def _check_regression(result: PromotionResult, cfg: ModelConfig, cand_metrics: Mapping[str, float],
                      baseline: Mapping[str, float]) -> None:
    reg, to, previous = cfg.gates.max_regression, result.to, result.previous
    for metric in gated_metrics(cfg):
        value, base = cand_metrics.get(metric), baseline.get(metric)
        gate = f"regression:{metric}"
        if base is None:
            _check(result, gate, metric, value, None, False,
                   f"{metric} unknown for {to} v{previous}: cannot compare")
        elif value is None:
            _check(result, gate, metric, None, base - reg, False,
                   f"{metric} missing on v{result.version}: cannot compare with {to} v{previous}")
        else:
            threshold = base - reg
            ok = value >= threshold - 1e-12
            _check(result, gate, metric, value, threshold, ok,
                   f"{metric} {fmt_number(value)} {'>=' if ok else '<'} {fmt_number(threshold)} "
                   f"({to} v{previous} {fmt_number(base)} - max_regression {fmt_number(reg)})")


def _move_alias(client: MlflowClient, result: PromotionResult, event: audit.Event) -> None:
    """Point the alias at the candidate and record it (with ``event``): writes 1-6 of the module docstring.

    The alias is re-read before and after it moves (the optimistic check, which is all a
    remote store gets); a move by someone else turns ``result`` into a failure.
    """
    name, to = result.name, result.to
    if not _still_held(client, result, result.previous, "while the gates ran; nothing changed"):
        return
    pending = {"version": result.version, "previous": result.previous,
               "at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "event": _pending_event(event)}
    client.set_registered_model_tag(name, PENDING_TAG_PREFIX + to, json.dumps(pending))
    client.set_registered_model_alias(name, to, str(result.version))
    if not _still_held(client, result, result.version, "right after this promotion moved it"):
        return
    _record(client, name, to, pending)


def _pending_event(event: audit.Event) -> dict[str, Any]:
    """The event as the pending tag carries it: without the gates' sentences when they would not
    fit in a registered-model tag (5000 characters in MLflow's SQL store; the numbers stay)."""
    data = event.to_dict()
    if len(json.dumps(data)) > PENDING_EVENT_LIMIT:
        data["gates"] = [{**g, "detail": ""} for g in data["gates"]]
    return data


def _still_held(client: MlflowClient, result: PromotionResult, expected: int | None, when: str) -> bool:
    """The alias is held by ``expected``; otherwise a failure is recorded on ``result``."""
    holder = _holder(client, result.name, result.to)
    if holder == expected:
        return True
    result.passed = False
    _check(result, "concurrent_promotion", None, None, None, False,
           f"@{result.to} was moved to {_v(holder)} by another promotion {when} "
           f"(expected {_v(expected)}); promote again")
    log.warning("%s v%d: %s", result.name, result.version, result.failures[-1])
    return False


def _record(client: MlflowClient, name: str, to: str, pending: Mapping[str, Any]) -> None:
    """Writes 3-6: stamp the new holder, its audit event, mirror the classic stage, drop the
    pending tag (idempotent; a pending tag written before the audit trail has no event)."""
    version, previous = int(pending["version"]), pending.get("previous")
    stamps = {"promoted_at": str(pending["at"]), "promoted_from": str(previous) if previous else "none",
              "promoted_to": to}
    for key, text in stamps.items():
        client.set_model_version_tag(name, str(version), key, text)
    if pending.get("event"):
        _stamp(client, audit.write_event(audit.Event.from_dict(pending["event"]), client))
    stage = mirror_stage(client, name, version, to)
    client.delete_registered_model_tag(name, PENDING_TAG_PREFIX + to)
    log.info("%s v%d is now @%s%s (was %s)", name, version, to,
             f" (classic stage {stage})" if stage else "", _v(previous))


def finish_pending(client: MlflowClient, name: str, to: str) -> dict[str, Any] | None:
    """Finish a promotion to ``to`` that was interrupted (call it under :func:`promotion_lock`).

    Rolls forward (writes 3-6 again) when the alias already holds the pending version, else
    drops the pending tag: the alias never moved, the old state is intact.

    Returns:
        The pending record that was found (``version``, ``previous``, ``at``), or ``None``.
    """
    text = (client.get_registered_model(name).tags or {}).get(PENDING_TAG_PREFIX + to)
    if text is None:
        return None
    pending: dict[str, Any] = json.loads(text)
    holder = _holder(client, name, to)
    if holder == int(pending["version"]):
        log.warning("%s: completing the interrupted promotion of v%s to @%s", name, pending["version"], to)
        _record(client, name, to, pending)
    else:
        log.warning("%s: dropping the interrupted promotion of v%s to @%s (the alias never moved; "
                    "it is on %s)", name, pending["version"], to, _v(holder))
        client.delete_registered_model_tag(name, PENDING_TAG_PREFIX + to)
    return pending


def _holder(client: MlflowClient, name: str, alias: str) -> int | None:
    current = alias_holder(client, name, alias)
    return int(current.version) if current is not None else None


def _v(version: int | None) -> str:
    return f"v{version}" if version else "none"


def promotion_lock_path(registry_uri: str, name: str) -> Path | None:
    """The lock file of the promotions of ``name``: beside a local store, ``None`` for a remote one.

    ``sqlite:///<db>`` -> ``<db>.locks/<name>.lock``; a file store (``file://`` or a path)
    ``<dir>`` -> ``<dir>.locks/<name>.lock``. Any other scheme (``http(s)``, a database
    server, an in-memory SQLite) has no file every promoter shares.
    """
    store = _local_store(registry_uri)
    if store is None:
        return None
    return store.parent / f"{store.name}.locks" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.lock"


def _local_store(registry_uri: str) -> Path | None:
    """The absolute path of a local store (SQLite file, file-store directory); ``None`` otherwise."""
    if not is_local_store(registry_uri):
        return None
    parsed = urlparse(registry_uri)
    if parsed.scheme == "sqlite":  # sqlite:///relative.db, sqlite:////absolute.db (SQLAlchemy's rule)
        prefix = "sqlite:///"
        database = registry_uri[len(prefix):].split("?", 1)[0] if registry_uri.startswith(prefix) else ""
        return Path(unquote(database)).resolve() if database and database != ":memory:" else None
    return Path(unquote(parsed.path) if parsed.scheme == "file" else registry_uri).resolve()


@contextmanager
def promotion_lock(name: str, registry_uri: str | None = None,
                   timeout: float | None = None) -> Iterator[Path | None]:
    """Hold the inter-process lock of the promotions of registered model ``name``.

    A no-op (yielding ``None``) for a remote store, where :func:`promote` relies on its
    optimistic check. The lock is an ``flock``, released by the kernel when its holder dies.

    Args:
        name: registered model name.
        registry_uri: the registry (default: the one MLflow is configured with).
        timeout: seconds to wait for another promotion (default :data:`LOCK_TIMEOUT_S`).

    Yields:
        The lock file, or ``None`` when there is none.

    Raises:
        RegistryError: another promotion held the lock for longer than ``timeout``.
    """
    path = promotion_lock_path(registry_uri or mlflow.get_registry_uri(), name)
    if path is None:
        yield None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for %s: another promotion of %s is under way", path, name)
        try:
            lock.acquire(timeout=LOCK_TIMEOUT_S if timeout is None else timeout)
        except Timeout:
            raise RegistryError(f"another promotion of {name} held {path} for more than "
                                f"{LOCK_TIMEOUT_S if timeout is None else timeout:g} s") from None
    try:
        yield path
    finally:
        lock.release()


def _baseline(result: PromotionResult, cfg: ModelConfig, current: ModelVersion, cand_split: str | None,
              evaluate: Callable[[ModelBundle], Mapping[str, Any]] | None) -> dict[str, float] | None:
    """The current version's metrics on the candidate's test split, or None (failure recorded)."""
    cur_version = int(current.version)
    cur_split = (current.tags or {}).get(TAG_SPLIT)
    if cand_split and cur_split == cand_split:
        _check(result, "same_split", None, None, None, True,
               f"v{result.version} and {result.to} v{cur_version} were tested on split {cand_split}")
        return version_metrics(current)
    if evaluate is None:
        _check(result, "same_split", None, None, None, False,
               f"test split differs: v{result.version} on {cand_split or 'unknown'}, {result.to} "
               f"v{cur_version} on {cur_split or 'unknown'}; re-evaluate v{cur_version} on the "
               f"candidate's split (pass evaluate=) to compare")
        return None
    log.info("test splits differ (%s vs %s): re-evaluating %s v%d on the candidate's split",
             cand_split, cur_split, result.name, cur_version)
    bundle = load_bundle(f"{result.name}/{cur_version}")
    report = evaluate(bundle)
    result.reevaluated = True
    _check(result, "same_split", None, None, None, True,
           f"{result.to} v{cur_version} (tested on {cur_split or 'unknown'}) re-evaluated on the "
           f"candidate's split {cand_split or 'unknown'}")
    out: dict[str, float] = {}
    for metric in gated_metrics(cfg):
        value = report_metric(report, metric)
        if value is not None:
            out[metric] = value
    return out


def rescore_on_split(cfg: ModelConfig, splits_csv: Path, dataset_root: Path,
                     expected_split: str | None) -> Callable[[ModelBundle], Mapping[str, Any]]:
    """An ``evaluate(bundle) -> metrics`` callback for :func:`promote`: the scoring core on a test split.

    The bundle is scored as stored (its own calibration), with the metrics its declaration
    reports, on the ``test`` rows of ``splits_csv``: the same numbers the evaluate stage
    writes for a model evaluated on that split.

    Args:
        cfg: the model's declaration.
        splits_csv: the prepare stage's ``splits.csv`` of this checkout.
        dataset_root: the dataset the split's paths are relative to.
        expected_split: the candidate's ``split_id``; a different split here is refused.

    Raises:
        RegistryError: (when called) the split artefact is missing or is not the candidate's.
    """
    from breastscan.data.loading import load_split
    from breastscan.data.splits import split_id
    from breastscan.evaluation.scoring import Scoring, score_bundle

    def evaluate(bundle: ModelBundle) -> Mapping[str, Any]:
        if not splits_csv.is_file():
            raise RegistryError(f"{splits_csv} is missing: run `dvc repro prepare@{cfg.dataset}` first")
        here = split_id(splits_csv, "test")
        if expected_split and here != expected_split:
            raise RegistryError(
                f"the test split here ({here}) is not the one the candidate was evaluated on "
                f"({expected_split}); check out the commit that produced it (git checkout + dvc checkout)")
        test = load_split(splits_csv, dataset_root, cfg, "test")
        return score_bundle(bundle, test, scoring=Scoring.from_config(cfg), n_boot=0).metrics

    return evaluate
