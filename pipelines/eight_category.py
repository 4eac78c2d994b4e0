"""Stage ``eight_category``: the 8-category view (benign/malignant x density A-D) on a mammogram.

An older tool reported one of eight categories per mammogram; here it is derived from the
density and tumor models (see :func:`breastscan.evaluation.combined.eight_category`) on the test
split the two models share. It combines the calibrated probabilities that
``evaluate@<density>`` and ``evaluate@<tumor>`` wrote to their ``predictions.csv`` (the
probabilities the service returns), so no model is run again here.
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

from breastscan.config import ModelConfig, load_params
from breastscan.evaluation.combined import eight_category
from breastscan.logs import configure_logging
from pipelines._stage import REPORTS, model_reports

log = logging.getLogger("pipelines.eight_category")


def _predictions(cfg: ModelConfig) -> tuple[pd.DataFrame, np.ndarray]:
    """A classifier's test predictions and its ``(n, k)`` probabilities in class order."""
    frame = pd.read_csv(model_reports(cfg.name) / "predictions.csv", dtype={"true": str, "pred": str})
    columns = [f"prob_{name}" for name in cfg.class_names]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{model_reports(cfg.name) / 'predictions.csv'} lacks {', '.join(missing)}")
    return frame, frame[columns].to_numpy(np.float64)


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
    density, d_probs = _predictions(density_cfg)
    tumor, t_probs = _predictions(tumor_cfg)
    if list(density["image"]) != list(tumor["image"]):
        log.error("the two models' test rows differ; both need labels on every test image")
        return 1
    rows = eight_category(d_probs, t_probs, tumor_cfg.class_names, density_names=density_cfg.class_names)
    truth = [f"{p}-{d}" if p in ("benign", "malignant") else None
             for p, d in zip(tumor["true"], density["true"], strict=True)]
    out = pd.DataFrame({
        "image": density["image"], "true_category": truth,
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
