"""Stage ``prepare@<dataset>``: near-duplicate grouping, label conflicts, leak-free splits.

Reads the validated manifest and writes

* ``artifacts/prepared/<dataset>/splits.csv``: the manifest plus ``dup_group``,
  ``dup_cluster``, ``split`` (train/val/test/excluded), ``exclusion`` and the MD5 of each
  image and mask file (so that a pixel change reaches the models downstream); the
  versioned split artefact;
* ``reports/prepare/<dataset>.json``: counts (a DVC metrics file);
* ``reports/prepare/<dataset>_details.json``: every near-duplicate pair and label conflict.

A pool of sites (``sites:`` in the dataset's entry) splits every site on its own with the
same settings and stacks them with a ``site`` column (:func:`breastscan.data.pools.prepare_pool`).

Run: ``python -m pipelines.prepare --dataset ultrasound``
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pandas as pd

from breastscan.config import DatasetConfig, SplitConfig
from breastscan.data.manifest import content_hashes, normalize_manifest, read_manifest
from breastscan.data.pools import prepare_pool
from breastscan.data.splits import prepare_splits
from pipelines._stage import REPORTS, parse, splits_csv, validation_report

log = logging.getLogger("pipelines.prepare")


def split_dataset(dataset: DatasetConfig, cfg: SplitConfig) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The split rows (with each file's MD5) and the report of a dataset or a pool of sites."""
    if dataset.is_pool:
        return prepare_pool(dataset, cfg)
    manifest = normalize_manifest(read_manifest(dataset.path))
    splits, report = prepare_splits(manifest, dataset.path, labels=dataset.labels, stratify=dataset.stratify,
                                    dedup=dataset.dedup, cfg=cfg)
    # Pixel changes that leave the manifest alone must still retrain the models downstream.
    splits["image_md5"], splits["mask_md5"] = content_hashes(splits, dataset.path)
    return splits, report


def main(argv: list[str] | None = None) -> int:
    """Prepare the splits of the dataset named on the command line; return the exit code."""
    args = parse(__doc__, "dataset", argv)
    params = args.params
    dataset = params.dataset(args.name)
    validation = validation_report(dataset.name)
    if not validation.is_file() or not json.loads(validation.read_text()).get("success"):
        log.error("%s has not passed validation (see %s); run the validate stage", dataset.name, validation)
        return 1

    splits, report = split_dataset(dataset, params.prepare)
    out = splits_csv(dataset.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    splits.to_csv(out, index=False)
    reports = REPORTS / "prepare"
    reports.mkdir(parents=True, exist_ok=True)
    (reports / f"{dataset.name}.json").write_text(json.dumps(report["summary"], indent=2) + "\n")
    (reports / f"{dataset.name}_details.json").write_text(json.dumps(report["details"], indent=2) + "\n")
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
