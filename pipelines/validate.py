"""Stage ``validate@<dataset>``: run the Great Expectations suites; broken data stops the DAG.

Writes ``reports/validation/<dataset>.json`` (the artefact of record) whether the data pass
or not, logs a readable summary naming each defect, and exits 1 when anything failed so
that ``dvc repro`` runs nothing downstream.

Run: ``python -m pipelines.validate --dataset mammography``
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from breastscan.config import load_params
from breastscan.logs import configure_logging
from breastscan.validation import validate_dataset

log = logging.getLogger("pipelines.validate")


def report_path(dataset: str) -> Path:
    """Where the stage writes its JSON report."""
    return Path("reports/validation") / f"{dataset}.json"


def main(argv: list[str] | None = None) -> int:
    """Validate the dataset named on the command line; return the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="a key under `datasets:` in params.yaml")
    parser.add_argument("--params", default="params.yaml", type=Path)
    args = parser.parse_args(argv)
    configure_logging()

    params = load_params(args.params)
    dataset = params.dataset(args.dataset)
    report = validate_dataset(dataset.path, dataset, params.validate)
    out = report.write(report_path(dataset.name))
    if not report.success:
        log.error("data validation failed; nothing downstream will run. Report: %s", out)
        return 1
    log.info("data validation passed: %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
