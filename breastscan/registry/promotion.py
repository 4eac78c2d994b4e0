"""Promotion through quality gates: move a registry stage (alias) only when the gates pass.

Gates come from the model's declaration in params.yaml (``gates``): **floors** on the
candidate's registered metrics, and **no regression** beyond ``max_regression`` against
the version now holding the stage, compared on the same test split (the current version is
re-scored on the candidate's split when the two differ, through the one scoring core).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from breastscan.jsonable import fmt_number
from breastscan.registry.resolver import RegistryError, alias_holder, get_version, load_bundle
from breastscan.registry.versions import (
    PRODUCTION,
    STAGING,
    TAG_NEVER_PREDICTED,
    TAG_SPLIT,
    gated_metrics,
    mirror_stage,
    registry_client,
    report_metric,
    version_metrics,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from breastscan.config import ModelConfig
    from breastscan.registry.bundle import ModelBundle

log = logging.getLogger(__name__)


@dataclass
class PromotionResult:
    """Outcome of :func:`promote`.

    Attributes:
        name: registered model name.
        version: the candidate version.
        to: the target alias.
        passed: every gate passed and the alias now points at ``version``.
        previous: the version that held the alias before (``None`` if none did).
        checks: one dict per gate: ``gate``, ``metric``, ``candidate``, ``threshold``,
            ``ok``, ``detail``.
        failures: one line per failed gate, with the numbers.
        reevaluated: the previous version was re-scored on the candidate's test split.
    """

    name: str
    version: int
    to: str
    passed: bool
    previous: int | None = None
    checks: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    reevaluated: bool = False

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
            evaluate: Callable[[ModelBundle], Mapping[str, Any]] | None = None) -> PromotionResult:
    """Move alias ``to`` onto a version if the quality gates pass.

    Gates (from ``cfg.gates``):

    * **floors**: each metric in ``floors`` of the candidate (its version tags) >= floor.
    * **no regression**: if another version holds ``to``, for each floored metric and the
      headline, candidate >= current - ``max_regression``, on the same test split: when
      the ``split_id`` tags differ, ``evaluate(current bundle)`` re-scores the current
      version on the candidate's split; without ``evaluate`` the promotion is refused.

    On success the alias moves, the classic stage is mirrored when supported (older
    versions archived) and the version is tagged ``promoted_at``/``promoted_from``/
    ``promoted_to``. On failure nothing changes.

    Args:
        cfg: the model's configuration (name, headline, gates).
        version: the candidate; ``None`` = the version holding ``@staging``.
        to: target alias (``production``).
        evaluate: ``bundle -> metrics`` on the candidate's test split (metric name -> value).

    Returns:
        The result; ``passed`` says whether the alias moved.

    Raises:
        RegistryError: no such version, or no version holds ``@staging``.
        Exception: whatever ``evaluate`` raises is passed on (nothing has changed then).
    """
    client = registry_client()
    name = cfg.registered_name
    candidate = get_version(client, name, version, STAGING)
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
    else:
        _move_alias(client, result)
    return result


def _check_every_class(result: PromotionResult, cfg: ModelConfig, tags: Mapping[str, str]) -> None:
    if not (cfg.gates.every_class_predicted and cfg.task == "classification"):
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


def _move_alias(client: MlflowClient, result: PromotionResult) -> None:
    """Point the alias at the candidate, mirror the classic stage, stamp the version."""
    name, version, previous = result.name, result.version, result.previous
    client.set_registered_model_alias(name, result.to, str(version))
    stage = mirror_stage(client, name, version, result.to)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    stamps = {"promoted_at": now, "promoted_from": str(previous) if previous else "none",
              "promoted_to": result.to}
    for key, text in stamps.items():
        client.set_model_version_tag(name, str(version), key, text)
    log.info("%s v%d is now @%s%s (was %s)", name, version, result.to,
             f" (classic stage {stage})" if stage else "", f"v{previous}" if previous else "none")


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
