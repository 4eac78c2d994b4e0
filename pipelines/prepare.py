"""Stage ``prepare@<dataset>``: near-duplicate grouping, label conflicts, leak-free splits.

Reads the validated manifest and writes

* ``artifacts/prepared/<dataset>/splits.csv``: the manifest plus ``dup_group``, ``split``
  (train/val/test/excluded) and ``exclusion``; the versioned split artefact;
* ``reports/prepare/<dataset>.json``: counts (a DVC metrics file);
* ``reports/prepare/<dataset>_details.json``: every near-duplicate pair and label conflict.

Run: ``python -m pipelines.prepare --dataset ultrasound``
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from breastscan.config import load_params
from breastscan.logs import configure_logging
from breastscan.manifest import normalize_manifest, read_manifest
from breastscan.splits import prepare_splits
from pipelines.validate import report_path

log = logging.getLogger("pipelines.prepare")


def main(argv: list[str] | None = None) -> int:
    """Prepare the splits of the dataset named on the command line; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="a key under `datasets:` in params.yaml")
    parser.add_argument("--params", default="params.yaml", type=Path)
    args = parser.parse_args(argv)
    configure_logging()

    params = load_params(args.params)
    dataset = params.dataset(args.dataset)
    validation = report_path(dataset.name)
    if not validation.is_file() or not json.loads(validation.read_text()).get("success"):
        log.error("%s has not passed validation (see %s); run the validate stage", dataset.name, validation)
        return 1

    manifest = normalize_manifest(read_manifest(dataset.path))
    splits, report = prepare_splits(
        manifest,
        dataset.path,
        labels=dataset.labels,
        stratify=dataset.stratify,
        dedup=dataset.dedup,
        cfg=params.prepare,
    )
    out_dir = Path("artifacts/prepared") / dataset.name
    out_dir.mkdir(parents=True, exist_ok=True)
    splits.to_csv(out_dir / "splits.csv", index=False)
    reports = Path("reports/prepare")
    reports.mkdir(parents=True, exist_ok=True)
    (reports / f"{dataset.name}.json").write_text(json.dumps(report["summary"], indent=2) + "\n")
    (reports / f"{dataset.name}_details.json").write_text(json.dumps(report["details"], indent=2) + "\n")
    log.info("wrote %s", out_dir / "splits.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
