"""Stage ``eight_category``: the 8-category view (benign/malignant x density A-D) on a mammogram.

An older tool reported one of eight categories per mammogram; here it is derived from the
density and tumor models (see :func:`breastscan.evaluation.eight_category`), each applying
its own preprocessing spec and calibration, on the test split the two models share.
Writes ``reports/eight_category/predictions.csv`` and the metrics
``reports/eight_category/metrics.json`` (accuracy over the test images that have a lesion,
where the true category is defined).

Run: ``python -m pipelines.eight_category``
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from breastscan.bundle import ModelBundle
from breastscan.config import load_params
from breastscan.datasets import load_split
from breastscan.evaluation import batched_logits, eight_category
from breastscan.labels import class_display_names
from breastscan.logs import configure_logging
from pipelines._stage import REPORTS, model_dir, model_reports, splits_csv

log = logging.getLogger("pipelines.eight_category")


def _calibrated(name: str) -> ModelBundle:
    bundle = ModelBundle.load(model_dir(name))
    metrics = json.loads((model_reports(name) / "metrics.json").read_text())
    return bundle.with_temperature(float(metrics["temperature"]))


def main(argv: list[str] | None = None) -> int:
    """Write the 8-category predictions and metrics; return the exit code."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--params", default="params.yaml", type=Path)
    args = parser.parse_args(argv)
    configure_logging()
    params = load_params(args.params)
    names = params.raw.get("eight_category") or {}
    density_cfg, tumor_cfg = params.model(names["density"]), params.model(names["tumor"])
    if density_cfg.dataset != tumor_cfg.dataset:
        log.error("the density (%s) and tumor (%s) models must share a dataset", density_cfg.dataset,
                  tumor_cfg.dataset)
        return 1
    dataset = params.dataset(tumor_cfg.dataset)
    splits = splits_csv(dataset.name)
    density, tumor = _calibrated(density_cfg.name), _calibrated(tumor_cfg.name)
    d_test = load_split(splits, dataset.path, density_cfg, "test")
    t_test = load_split(splits, dataset.path, tumor_cfg, "test")
    if list(d_test.frame["image"]) != list(t_test.frame["image"]):
        log.error("the two models' test rows differ; both need labels on every test image")
        return 1
    rows = eight_category(density.probabilities(batched_logits(density, d_test.images)),
                          tumor.probabilities(batched_logits(tumor, t_test.images)),
                          tumor.contract.class_names, density_names=density.contract.class_names)
    frame = d_test.frame.reset_index(drop=True)
    letters = class_display_names("density", frame["density"])
    truth = [f"{p}-{d}" if p in ("benign", "malignant") else None
             for p, d in zip(frame["pathology"], letters, strict=True)]
    out = pd.DataFrame({
        "image": frame["image"], "true_category": truth,
        "category": [r["category"] for r in rows], "finding": [r["finding"] for r in rows],
        "p_malignant": [r["p_malignant"] for r in rows], "p_normal": [r["p_normal"] for r in rows],
        "confidence": [r["confidence"] for r in rows],
    })
    defined = out["true_category"].notna()
    hits = (out.loc[defined, "true_category"] == out.loc[defined, "category"]).to_numpy()
    pathology_hits = [t.split("-")[0] == c.split("-")[0] for t, c in
                      zip(out.loc[defined, "true_category"], out.loc[defined, "category"], strict=True)]
    metrics = {
        "n_test": int(len(out)), "n_with_lesion": int(defined.sum()),
        "accuracy_8": float(np.mean(hits)) if len(hits) else None,
        "pathology_accuracy": float(np.mean(pathology_hits)) if pathology_hits else None,
    }
    reports = REPORTS / "eight_category"
    reports.mkdir(parents=True, exist_ok=True)
    out.to_csv(reports / "predictions.csv", index=False)
    (reports / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("8-category view on %d test images with a lesion: accuracy %s", metrics["n_with_lesion"],
             "n/a" if metrics["accuracy_8"] is None else f"{metrics['accuracy_8']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
