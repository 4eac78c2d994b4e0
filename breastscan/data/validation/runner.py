"""Run the suites of :mod:`breastscan.data.validation.suites` and turn results into a report."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from breastscan.config import DatasetConfig, ValidationRules
from breastscan.data.manifest import MANIFEST_NAME, read_manifest
from breastscan.data.validation.images import inspect_images

log = logging.getLogger(__name__)

MAX_EXAMPLES = 10
"""Offending rows listed per failed expectation in the summary (the JSON holds them all)."""


@dataclass
class Failure:
    """One failed expectation, in words.

    Attributes:
        expectation: Great Expectations type, e.g. ``expect_column_values_to_be_in_set``.
        column: the column checked, if any.
        meaning: what the expectation demands, in plain words.
        count: how many rows broke it (0 for table-level expectations).
        rows: offending rows: image path plus the bad value or the decoder's message.
        observed: the observed value of a table-level expectation.
    """

    expectation: str
    column: str | None
    meaning: str
    count: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    observed: Any = None

    def line(self) -> str:
        """One readable line, with a few offending rows."""
        where = f" [{self.column}]" if self.column else ""
        head = f"FAILED{where}: {self.meaning}"
        if self.count:
            head += f" -- {self.count} row(s) break it"
        elif self.observed is not None:
            head += f" -- observed {self.observed}"
        examples = [
            "; ".join(f"{k}={v}" for k, v in row.items() if v is not None)
            for row in self.rows[:MAX_EXAMPLES]
        ]
        more = len(self.rows) - len(examples)
        body = "".join(f"\n      {e}" for e in examples)
        return head + body + (f"\n      ... and {more} more" if more > 0 else "")


@dataclass
class ValidationReport:
    """Outcome of validating one dataset.

    Attributes:
        dataset: dataset name from params.yaml.
        root: dataset directory.
        success: every expectation passed.
        n_rows: rows in the manifest.
        failures: the failed expectations.
        statistics: counts of expectations evaluated / passed / failed, label counts.
        gx_results: Great Expectations' own result documents (JSON-able).
    """

    dataset: str
    root: str
    success: bool
    n_rows: int
    failures: list[Failure]
    statistics: dict[str, Any]
    gx_results: list[dict[str, Any]]
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())

    def summary(self) -> str:
        """Readable multi-line summary: the verdict, then each failure with offending rows."""
        verdict = "PASSED" if self.success else "FAILED"
        lines = [
            f"validation of {self.dataset} ({self.root}): {verdict} -- {self.n_rows} rows, "
            f"{self.statistics.get('evaluated', 0)} expectations, {len(self.failures)} failed"
        ]
        lines += ["  " + f.line() for f in self.failures]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The JSON report (the artefact of record)."""
        return {
            "dataset": self.dataset,
            "root": self.root,
            "success": self.success,
            "n_rows": self.n_rows,
            "created": self.created,
            "statistics": self.statistics,
            "failures": [f.__dict__ for f in self.failures],
            "gx_results": self.gx_results,
        }

    def write(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON, creating parent directories."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=_json_default) + "\n")
        return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, (pd.Timestamp, datetime)):
        return obj.isoformat()
    if obj is pd.NA or (isinstance(obj, float) and np.isnan(obj)):
        return None
    return str(obj)


def _context() -> Any:
    # GX sends usage statistics unless told not to; this must be set before the import.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        progress_bars=ProgressBarsConfig(globally=False),
        analytics_enabled=False,
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _run(context: Any, frame: pd.DataFrame, suite: Any, id_column: str | None) -> dict[str, Any]:
    source = context.data_sources.add_or_update_pandas(name=suite.name)
    asset = source.add_dataframe_asset(name="rows")
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(
        batch_parameters={"dataframe": frame}
    )
    fmt: dict[str, Any] = {"result_format": "COMPLETE"}
    if id_column:
        fmt["unexpected_index_column_names"] = [id_column]
    return batch.validate(suite, result_format=fmt).to_json_dict()


def _failures(result: dict[str, Any], frame: pd.DataFrame, id_column: str | None) -> list[Failure]:
    out: list[Failure] = []
    for r in result["results"]:
        if r["success"]:
            continue
        cfg = r["expectation_config"]
        kwargs = cfg.get("kwargs", {})
        column = kwargs.get("column")
        res = r.get("result") or {}
        rows: list[dict[str, Any]] = []
        for entry in res.get("unexpected_index_list") or []:
            row = dict(entry) if isinstance(entry, dict) else {"row": entry}
            if id_column and "image_error" in frame and id_column in row:
                hit = frame.loc[frame[id_column] == row[id_column], "image_error"]
                if len(hit) and isinstance(hit.iloc[0], str):
                    row["error"] = hit.iloc[0]
            rows.append({k: _json_default(v) if not isinstance(v, str) else v for k, v in row.items()})
        exc = r.get("exception_info") or {}
        observed = res.get("observed_value", res.get("details"))
        if exc.get("raised_exception"):
            observed = exc.get("exception_message")
        out.append(
            Failure(
                expectation=cfg["type"],
                column=column,
                meaning=cfg.get("description") or cfg["type"],
                count=int(res.get("unexpected_count") or 0),
                rows=rows,
                observed=observed,
            )
        )
    return out


def _mask_facts(manifest: pd.DataFrame, facts: pd.DataFrame) -> pd.DataFrame:
    """Facts that need labels and files together: masks present for lesions, empty for normal."""
    lesion = manifest["pathology"].isin(["benign", "malignant"])
    normal = manifest["pathology"] == "normal"
    has_mask = manifest["mask"].notna() & (facts["mask_exists"] == True)  # noqa: E712
    out = pd.DataFrame(index=manifest.index)
    out["mask_present"] = has_mask.astype(object).where(lesion, None)
    out["normal_mask_empty"] = (facts["mask_empty"] == True).astype(object).where(normal & has_mask, None)  # noqa: E712
    return out


def _label_counts(manifest: pd.DataFrame, labels: tuple[str, ...]) -> pd.DataFrame:
    rows = [
        {"label": col, "value": str(value), "count": int(n)}
        for col in labels
        if col in manifest
        for value, n in manifest[col].dropna().value_counts().sort_index().items()
    ]
    return pd.DataFrame(rows, columns=["label", "value", "count"])


def validate_dataset(
    root: str | Path, dataset: DatasetConfig, rules: ValidationRules
) -> ValidationReport:
    """Validate a dataset directory against its suites.

    Args:
        root: directory holding ``manifest.csv`` and the files it names.
        dataset: the dataset's declaration in params.yaml.
        rules: validation thresholds.

    Returns:
        The report; ``report.success`` is False when any expectation failed (including a
        missing or unreadable manifest, reported as a failure rather than raised).
    """
    from breastscan.data.validation import suites

    root = Path(root)
    try:
        manifest = read_manifest(root)
    except (FileNotFoundError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        failure = Failure("manifest_readable", None, f"{MANIFEST_NAME} can be read", observed=str(exc))
        return ValidationReport(dataset.name, str(root), False, 0, [failure], {"evaluated": 1}, [])

    context = _context()
    results: list[dict[str, Any]] = []
    failures: list[Failure] = []

    columns_result = _run(context, manifest, suites.columns_suite(dataset.name), None)
    results.append(columns_result)
    failures += _failures(columns_result, manifest, None)
    if not failures:
        facts = inspect_images(manifest, root)
        joined = pd.concat([manifest, facts, _mask_facts(manifest, facts)], axis=1)
        res = _run(context, joined, suites.manifest_suite(dataset, rules), "image")
        results.append(res)
        failures += _failures(res, joined, "image")
        counts = _label_counts(manifest, dataset.labels)
        if len(counts):
            res = _run(context, counts, suites.class_count_suite(dataset, rules), None)
            results.append(res)
            for f in _failures(res, counts, None):
                # Name the classes that are too small rather than their row numbers.
                small = counts[counts["count"] < rules.min_class_count]
                f.rows = [{str(k): v for k, v in rec.items()} for rec in small.to_dict("records")]
                failures.append(f)
        label_counts = {
            col: {str(k): int(v) for k, v in manifest[col].dropna().value_counts().sort_index().items()}
            for col in dataset.labels
        }
    else:
        label_counts = {}

    evaluated = sum(r["statistics"]["evaluated_expectations"] for r in results)
    report = ValidationReport(
        dataset=dataset.name,
        root=str(root),
        success=not failures,
        n_rows=len(manifest),
        failures=failures,
        statistics={
            "evaluated": evaluated,
            "failed": len(failures),
            "passed": evaluated - len(failures),
            "label_counts": label_counts,
        },
        gx_results=results,
    )
    log.log(logging.INFO if report.success else logging.ERROR, "%s", report.summary())
    return report


def validate_pool(pool: DatasetConfig, rules: ValidationRules) -> ValidationReport:
    """Validate every site of a pool (:attr:`DatasetConfig.sites`) with the pool's suites.

    Each site is validated as a dataset of its own (:func:`validate_dataset` of
    :meth:`DatasetConfig.site`); the pool passes when every site passes. A class-count rule
    applies per site: a site need not have every class (a site without ``normal`` images is
    a site, not a defect), but the classes it has need ``min_class_count`` rows.

    Args:
        pool: a dataset declaration with ``sites``.
        rules: validation thresholds.

    Returns:
        One report: failures of every site (each naming its site in ``column``'s place of
        ``meaning``), statistics per site under ``sites``, GX documents of every site.
    """
    sites = {name: validate_dataset(pool.sites[name], pool.site(name), rules) for name in pool.sites}
    failures: list[Failure] = []
    for name, report in sites.items():
        for failure in report.failures:
            failure.meaning = f"[site {name}] {failure.meaning}"
            failures.append(failure)
    evaluated = sum(int(r.statistics.get("evaluated", 0)) for r in sites.values())
    report = ValidationReport(
        dataset=pool.name, root=str(pool.path), success=all(r.success for r in sites.values()),
        n_rows=sum(r.n_rows for r in sites.values()), failures=failures,
        statistics={"evaluated": evaluated, "failed": len(failures), "passed": evaluated - len(failures),
                    "sites": {name: {"root": r.root, "success": r.success, "n_rows": r.n_rows, **r.statistics}
                              for name, r in sites.items()}},
        gx_results=[doc for r in sites.values() for doc in r.gx_results],
    )
    log.log(logging.INFO if report.success else logging.ERROR, "%s", report.summary())
    return report
