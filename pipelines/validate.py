"""Stage ``validate@<dataset>``: run the Great Expectations suites; broken data stops the DAG.

A pool of sites (``sites:`` in the dataset's entry) validates every site with the same
suites; it passes when every site passes.

Writes ``reports/validation/<dataset>.json`` (the artefact of record) whether the data pass
or not, logs a readable summary naming each defect, and exits 1 when anything failed so
that ``dvc repro`` runs nothing downstream.

Run: ``python -m pipelines.validate --dataset mammography``
"""

from __future__ import annotations

import logging

from breastscan.data.validation import validate_dataset, validate_pool
from pipelines._stage import parse, validation_report

log = logging.getLogger("pipelines.validate")


def main(argv: list[str] | None = None) -> int:
    """Validate the dataset named on the command line; return the process exit code."""
    args = parse(__doc__, "dataset", argv)
    dataset = args.params.dataset(args.name)
    if dataset.is_pool:
        report = validate_pool(dataset, args.params.validate)
    else:
        report = validate_dataset(dataset.path, dataset, args.params.validate)
    out = report.write(validation_report(dataset.name))
    if not report.success:
        log.error("data validation failed; nothing downstream will run. Report: %s", out)
        return 1
    log.info("data validation passed: %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
